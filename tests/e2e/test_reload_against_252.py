"""The real 252 decides how state files read back: the same /run/systemd/machines, written by
hand, loaded by systemd's machined 252 and by ours at start-up, must give the same machines
(what each one makes of the network interfaces and the clocks of a file).

Only machines both daemons keep are compared: ours drops one that cannot start, where 252
keeps it for good, and one whose leader PID names a process started after the machine
(docs/compatibility.md); the unit tests pin what 252 makes of those.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.client import MACHINE as MACH
from tests.helpers.client import MANAGER as MGR
from tests.helpers.client import MANAGER_PATH as M
from tests.helpers.client import PROPERTIES as PROPS
from tests.helpers.client import connect, outcome
from tests.helpers.daemon import Machined, wait_for
from tests.helpers.real252 import RealMachined, difference, leaders_beside_252

from .support import Monitor

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, mounts)")

INFINITY = "18446744073709551615"
# A machine's start in an hour: after its leader's, as a real machine's start always is (the
# leader runs when it registers), and far from "now" (see now_or).
LATER = time.monotonic_ns() // 1000 + 3_600_000_000
# machine name: the lines of its file after SCOPE, LEADER and CLASS
CASES: dict[str, str] = {
    "netif-escaped": "NETIF=3\\\\4 5\n",  # the value is 3\4 5: words "34" and "5"
    "netif-vtab": "NETIF=1\x0b2 9\n",  # \v does not separate
    "netif-formfeed": "NETIF=1\x0c2\n",
    "netif-escaped-blank": "NETIF=7\\\\ 3 9\n",  # "7 3" is no number
    "netif-trailing": "NETIF='7 3\\'\n",  # a trailing backslash ends the list
    "clock-infinite": f"REALTIME={INFINITY}\nMONOTONIC=0\n",
    "clock-infinite-mono": f"REALTIME=0\nMONOTONIC={INFINITY}\n",
    "clock-one-set": f"REALTIME={INFINITY}\nMONOTONIC={LATER}\n",
    "clock-plain": f"REALTIME=1700000000000000\nMONOTONIC={LATER}\n",
    # started 123 µs after boot, long before its leader: the PID is another process's now
    "clock-before-leader": "REALTIME=1700000000000000\nMONOTONIC=123\n",
}
DROPPED_BY_OURS = {"clock-before-leader"}  # 252 adopts the process (docs/compatibility.md)


def now_or(value: Any) -> Any:
    """A clock within a minute of now (each daemon takes its own start time) reads as "now";
    the clocks the files give are far from it or below a second."""
    minute = 60_000_000
    if isinstance(value, int) and not isinstance(value, bool) and value > 1_000_000 and (
            abs(value - time.time_ns() // 1000) < minute
            or abs(value - time.monotonic_ns() // 1000) < minute):
        return "now"
    return value


def machines(bus: BusDaemon) -> dict[str, Any]:
    conn = connect(bus)
    try:
        kind, value = outcome(conn, M, MGR, "ListMachines")
        assert kind == "ok", value
        seen: dict[str, Any] = {}
        for name, _cls, _service, path in sorted(value[0]):
            if name == ".host":
                continue
            kind, props = outcome(conn, path, PROPS, "GetAll", "s", MACH)
            seen[name] = (kind, {k: (sig, now_or(v)) for k, (sig, v) in props[0].items()}
                          if kind == "ok" else props)
        return seen
    finally:
        conn.close()


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    with leaders_beside_252() as (slice_dir, leaders):
        d = tmp_path / "machines"
        d.mkdir()
        for i, (name, lines) in enumerate(CASES.items()):
            pid = leaders.sleeper(slice_dir / f"reloadtest-{i}.scope")
            (d / name).write_bytes(
                f"SCOPE=reloadtest-{i}.scope\nLEADER={pid}\nCLASS=container\n{lines}".encode())
            (d / f"unit:reloadtest-{i}.scope").symlink_to(name)
        yield d


# The match most clients use: MachineNew from the sender org.freedesktop.machine1, which only
# matches once the daemon owns that name.
FROM_THE_NAME = ("type='signal',sender='org.freedesktop.machine1',"
                 "interface='org.freedesktop.machine1.Manager',member='MachineNew'")


def test_state_files_read_back_as_252_reads_them(state: Path, tmp_path: Path) -> None:
    seen = {}
    real_bus, ours_bus = BusDaemon("open"), BusDaemon("open")
    monitors = {who: Monitor(bus, FROM_THE_NAME)
                for who, bus in (("real", real_bus), ("ours", ours_bus))}
    real = ours = None
    try:
        real = RealMachined(real_bus, state=state)
        ours_dir = tmp_path / "ours"
        shutil.copytree(state, ours_dir, symlinks=True)
        ours = Machined(ours_bus, "--scope-backend=cgroupfs", f"--state-dir={ours_dir}")
        wait_for(lambda: len(machines(ours_bus)) == len(CASES) - len(DROPPED_BY_OURS), 10,
                 what="ours' machines")
        seen = {"real": machines(real_bus), "ours": machines(ours_bus)}
        # each reloaded machine is announced, from the name clients match on
        for who, monitor in monitors.items():
            wait_for(lambda m=monitor, w=who: sorted(a[0] for a in m.signals("MachineNew"))
                     == sorted(seen[w]), 10, what=f"{who}'s MachineNew from org.freedesktop.machine1")
    finally:
        for daemon in (real, ours):
            if daemon is not None:
                daemon.stop()
        for monitor in monitors.values():
            monitor.stop()
        real_bus.stop()
        ours_bus.stop()
    assert sorted(seen["real"]) == sorted(CASES), seen["real"]
    assert sorted(seen["ours"]) == sorted(set(CASES) - DROPPED_BY_OURS), seen["ours"]
    differ = [difference(name, seen["real"][name], seen["ours"].get(name))
              for name in CASES if name not in DROPPED_BY_OURS
              and seen["real"][name] != seen["ours"].get(name)]
    assert not differ, "\n".join(differ)
