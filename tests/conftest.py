"""Shared fixtures: a private system bus and the daemon from this checkout."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, clean_state

# A run started in the background by a shell (`./scripts/test.sh &`) inherits SIGINT and SIGQUIT
# ignored, and so would every process the tests start; some tests stop them with those signals
# (KillSignal=SIGINT). Python's own handler for SIGINT and the default for SIGQUIT are reset to
# the default in the children at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.fixture
def bus() -> Iterator[BusDaemon]:
    b = BusDaemon("open")
    yield b
    b.stop()


@pytest.fixture
def in_process_bus(bus: BusDaemon, monkeypatch: pytest.MonkeyPatch) -> BusDaemon:
    """The private bus, also for sd-bus connections opened by the test itself."""
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    return bus


@pytest.fixture
def system_bus() -> Iterator[BusDaemon]:
    """A bus that enforces Debian's default-deny policy plus our shipped policy file."""
    b = BusDaemon("system")
    yield b
    b.stop()


@pytest.fixture
def machined(bus: BusDaemon) -> Iterator[Machined]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    clean_state()
    d = Machined(bus, "--stop-timeout=3", "--scope-backend=cgroupfs")
    yield d
    d.stop()
    errors = d.unexpected_errors()
    clean_state()
    assert not errors, "machined logged unexpected errors:\n" + "\n".join(errors)


@pytest.fixture(scope="session")
def busybox_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minimal container tree: static busybox, os-release, hostname."""
    root = tmp_path_factory.mktemp("tiny")
    for d in ("bin", "dev", "etc", "proc", "root", "run", "sys", "tmp", "usr/lib", "var/log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("busybox-static is not installed")
    subprocess.run(["cp", str(busybox), str(root / "bin/busybox")], check=True)
    for applet in ("sh", "cat", "echo", "hostname", "ip", "ls", "login", "mount", "ps", "sleep",
                   "true"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "usr/lib/os-release").write_text(
        'ID=tiny\nNAME="Tiny"\nPRETTY_NAME="Tiny busybox OS"\nVERSION_ID=1\n')
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "etc/hostname").write_text("tinyhost\n")
    (root / "etc/localtime").write_text("")
    return root
