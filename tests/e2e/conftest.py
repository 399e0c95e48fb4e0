"""Fixtures of the end-to-end tests (on top of tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import STATE_DIR, Machined, clean_state, have

from .support import PREFIX, FakeSystemd1, Monitor, Processes, kill_test_cgroups


def _remove_our_leftovers() -> None:
    kill_test_cgroups()
    if STATE_DIR.exists():
        for entry in STATE_DIR.iterdir():
            if entry.name.startswith((PREFIX, f"unit:machine-{PREFIX}")):
                with contextlib.suppress(OSError):
                    entry.unlink()
    propagate = Path("/run/systemd/nspawn/propagate")
    if propagate.exists():
        for entry in propagate.glob(f"{PREFIX}*"):
            shutil.rmtree(entry, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _e2e_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("the end-to-end tests need root")
    # machinectl refuses to run without it; it stays (other test runs may rely on it too).
    Path("/run/systemd/system").mkdir(parents=True, exist_ok=True)


@pytest.fixture(autouse=True)
def _e2e_cleanup() -> Iterator[None]:
    """Set up first, torn down last: whatever a test left of its machines (processes in their
    scopes, cgroups, state files) goes, also when the test failed."""
    yield
    _remove_our_leftovers()


@pytest.fixture
def procs() -> Iterator[Processes]:
    p = Processes()
    yield p
    p.cleanup()


@pytest.fixture
def monitor(bus: BusDaemon) -> Iterator[Monitor]:
    m = Monitor(bus)
    yield m
    m.stop()


@pytest.fixture
def fake_systemd1(bus: BusDaemon) -> Iterator[FakeSystemd1]:
    f = FakeSystemd1(bus)
    yield f
    f.stop()


def run_machined(bus: BusDaemon, *args: str) -> Iterator[Machined]:
    clean_state()
    d = Machined(bus, *args)
    try:
        yield d
    finally:
        d.stop()
        errors = d.unexpected_errors()
        clean_state()
    assert not errors, "machined logged unexpected errors:\n" + "\n".join(errors)


@pytest.fixture
def machined_systemd1(bus: BusDaemon, fake_systemd1: FakeSystemd1) -> Iterator[Machined]:
    """The daemon with --scope-backend=auto while the fake systemd1 owns its name."""
    yield from run_machined(bus, "--stop-timeout=3", "--scope-backend=auto")


@pytest.fixture
def need_nspawn() -> None:
    if not have("systemd-nspawn") or not have("machinectl"):
        pytest.skip("systemd-container is not installed")
