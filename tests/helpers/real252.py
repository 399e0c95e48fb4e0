"""systemd's own machined 252, run beside ours so that tests can compare the two on the wire."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from .busdaemon import BusDaemon
from .daemon import Machined, busctl, cgroup2_mount, clean_state, wait_for
from .leaders import CgroupLeaders
from .process import stop_process

REAL_MACHINED = "/lib/systemd/systemd-machined"
STATE_DIR = Path("/run/systemd/machines")
USERDB_DIR = Path("/run/systemd/userdb")
POOL = Path("/var/lib/machines")


class RealMachined:
    """252 in a mount namespace of its own, with tmpfs over its state and userdb directories
    (the state directory filled with a copy of `state`'s files, when given, and `pool`, when
    given, bind-mounted over /var/lib/machines), so that it never touches the host's; `env` is
    added to its environment. Needs `host_dirs()` around it for the mount points."""

    def __init__(self, bus: BusDaemon, pool: Path | None = None,
                 state: Path | None = None, env: dict[str, str] | None = None) -> None:
        steps = [f"mount -t tmpfs -o mode=0755 tmpfs {STATE_DIR}",
                 f"mount -t tmpfs -o mode=0755 tmpfs {USERDB_DIR}"]
        if state is not None:
            steps.append(f"cp -a {shlex.quote(str(state))}/. {STATE_DIR}/")
        if pool is not None:
            steps.append(f"mount --bind {shlex.quote(str(pool))} {POOL}")
        environ = {**bus.env(), "SYSTEMD_LOG_TARGET": "console", **(env or {})}
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             " && ".join([*steps, 'exec "$@"']), "sh", REAL_MACHINED],
            env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: os.path.exists(self.userdb_socket), 15, what="252's userdb socket")
        wait_for(lambda: busctl(bus, "status", "org.freedesktop.machine1",
                                check=False).returncode == 0, 15, what="252 on the bus")

    @property
    def userdb_socket(self) -> str:
        return f"/proc/{self.proc.pid}/root{USERDB_DIR}/io.systemd.Machine"

    def stop(self) -> None:
        stop_process(self.proc, 10)


@contextlib.contextmanager
def host_dirs(*extra: Path) -> Iterator[None]:
    """The mount points 252's tmpfs and pool need, and `extra` directories (machine.slice, say);
    made if missing and removed again (if empty)."""
    made = [d for d in (STATE_DIR, USERDB_DIR, POOL, *extra) if not d.exists()]
    for d in made:
        d.mkdir(mode=0o755, parents=True)
    try:
        yield
    finally:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()


@contextlib.contextmanager
def leaders_beside_252() -> Iterator[tuple[Path, CgroupLeaders]]:
    """For a test of 252 beside ours (252 must be installed): the machine.slice directory of
    the cgroup2 hierarchy, where 252 takes leaders, with host_dirs() around it, and leaders
    that are all gone afterwards."""
    if not os.path.exists(REAL_MACHINED):
        pytest.fail(f"{REAL_MACHINED} is missing: the set-up installs systemd-container")
    slice_dir = Path(cgroup2_mount()) / "machine.slice"
    leaders = CgroupLeaders()
    with host_dirs(slice_dir):
        try:
            yield slice_dir, leaders
        finally:
            leaders.close()


_SINCE = re.compile(r"\w{3} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+(; [^\n]*? ago)?")


def without_times(text: str) -> str:
    """machinectl's output with the times of day taken out, which are each daemon's own (it
    registered its machines at its own time): dates with their "… ago", the Timestamp
    properties of `show`, and the timestamps of JSON output."""
    text = re.sub(r'"(Timestamp|TimestampMonotonic|created)" *: *\d+', r'"\1": TIME', text)
    text = re.sub(r"^(Timestamp|TimestampMonotonic)=.*$", r"\1=TIME", text, flags=re.M)
    return _SINCE.sub("TIME", text)


def map_strings(value: Any, f: Callable[[str], str], drop_keys: tuple[str, ...] = ()) -> Any:
    """`value` with `f` applied to every string in it (tuples, lists and dicts walked, their
    types kept) and the `drop_keys` of its dicts left out: what is each daemon's own (names,
    paths, times) taken out of an answer before it is compared with the other's."""
    if isinstance(value, str):
        return f(value)
    if isinstance(value, tuple | list):
        return type(value)(map_strings(v, f, drop_keys) for v in value)
    if isinstance(value, dict):
        return {k: map_strings(v, f, drop_keys) for k, v in value.items() if k not in drop_keys}
    return value


def difference(what: str, real: Any, ours: Any) -> str:
    """One line of a test's report of answers that differ."""
    return f"{what}\n  252:  {real}\n  ours: {ours}"


class Stoppable(Protocol):
    def stop(self) -> Any: ...


@dataclass
class SideBySide:
    real: RealMachined | None  # None where systemd-container is not installed
    real_bus: BusDaemon | None
    ours: Machined
    ours_bus: BusDaemon


@contextlib.contextmanager
def side_by_side(*ours_args: str, pool: Path | None = None,
                 on_bus: Callable[[BusDaemon], Stoppable] | None = None) -> Iterator[SideBySide]:
    """252 (with `pool`, see RealMachined) and ours (with `ours_args`), each on a private bus
    of its own, where `on_bus` may start a service first (a fake systemd1, say); all stopped
    afterwards, and ours must have logged no unexpected error. Needs `host_dirs()` around it."""
    buses: list[BusDaemon] = []
    services: list[Stoppable] = []
    real: RealMachined | None = None
    ours: Machined | None = None
    errors: list[str] = []

    def new_bus() -> BusDaemon:
        buses.append(BusDaemon("open"))
        if on_bus is not None:
            services.append(on_bus(buses[-1]))
        return buses[-1]

    try:
        if os.path.exists(REAL_MACHINED):
            real = RealMachined(new_bus(), pool=pool)
        bus = new_bus()
        clean_state()
        ours = Machined(bus, *ours_args)
        yield SideBySide(real, buses[0] if real else None, ours, bus)
    finally:
        for d in (real, ours):
            if d is not None:
                d.stop()
        if ours is not None:
            errors = ours.unexpected_errors()
        for service in services:
            service.stop()
        for b in buses:
            b.stop()
        clean_state()
    assert not errors, "machined logged unexpected errors:\n" + "\n".join(errors)
