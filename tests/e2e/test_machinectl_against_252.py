"""The unchanged machinectl shows machines registered with odd values as it shows them with
252: the same machines (odd services, roots, network interfaces, ids, names at the length
limit) registered in 252 and in ours, each on a bus of its own, then list, status and show as
root and as nobody. The leaders' PIDs, their cgroups' names and the times of day are the only
things taken out."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.client import MANAGER as MGR
from tests.helpers.client import MANAGER_PATH as M
from tests.helpers.client import connect, outcome
from tests.helpers.real252 import leaders_beside_252, side_by_side, without_times

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, mounts)")

ID = bytes(range(1, 17))
# name, id, service, class, root directory, network interfaces (None: RegisterMachine)
MACHINES = [
    ("mc-ct", b"", "nspawn", "container", "/", None),
    ("mc-vm", ID, "qemu", "vm", "", [1]),
    ("mc-net", bytes(16), "svc", "container", "/srv", [1, 999]),
    ("mc-big-ifindex", b"", "svc", "vm", "", [2**31 - 1, 1, 1]),
    ("mc-no-ifindex", b"", "svc", "container", "", []),
    ("mc-nosvc", b"", "", "container", "/x//y/", None),
    ("mc.dots-x", ID, "odd service!@#%", "vm", "/x/../y", None),
    ("mc-utf", b"", "s\u00e9rvice\u2603", "container", "/a b", None),
    ("mc-ctl", b"", "line\nbreak\ttab\x01", "container", "/srv/", None),
    ("l" * 64, b"", "x", "container", "", None),
    (("a" * 30 + "." + "b" * 30 + "-x")[:64], b"", "x", "vm", "", None),
]
NAMES = [m[0] for m in MACHINES]
COMMANDS = [
    ["list"], ["list", "--all", "-l"], ["list", "--no-legend"], ["list", "--output=json"],
    ["list", "--output=json-pretty"], ["list", "--max-addresses=0"],
    ["status", "-n", "0", *NAMES], ["status", "-n", "0", "mc-ct", "nope", ".host"],
    *(["show", name] for name in NAMES),
    ["show", "-a", "mc-net"], ["show", "--value", "-p", "Service", *NAMES],
    ["show", "-p", "NetworkInterfaces", "-p", "RootDirectory", "-p", "Id", *NAMES],
]


@dataclass
class Side:
    tag: str
    bus: BusDaemon
    pids: dict[int, str] = field(default_factory=dict)

    def machinectl(self, args: list[str], user: str) -> str:
        cmd = ["machinectl", "--no-pager", *args]
        if user != "root":
            cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
        env = {**self.bus.env(), "SYSTEMD_COLORS": "0", "COLUMNS": "200", "LC_ALL": "C.UTF-8"}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL, errors="replace")
        return self.plain(f"rc={out.returncode}\n{out.stdout}\n{out.stderr}")

    def plain(self, text: str) -> str:
        """`text` without what must differ between the two daemons' machines."""
        text = text.replace(f"mc{self.tag}-", "mcX-")
        for pid, name in self.pids.items():
            text = re.sub(rf"(?<!\d){pid}(?!\d)", f"<leader of {name}>", text)
        return without_times(text)


@pytest.fixture(scope="module")
def sides() -> Iterator[list[Side]]:
    with leaders_beside_252() as (slice_dir, leaders), \
            side_by_side("--scope-backend=cgroupfs") as two:
        assert two.real_bus is not None
        out = [Side("r", two.real_bus), Side("o", two.ours_bus)]
        for side in out:
            conn = connect(side.bus)
            for i, (name, id_, service, cls, root, ifindices) in enumerate(MACHINES):
                # 252 takes a leader only in a scope of its own
                pid = leaders.sleeper(slice_dir / f"mc{side.tag}-{i}.scope")
                side.pids[pid] = name
                got = (outcome(conn, M, MGR, "RegisterMachine", "sayssus", name, id_, service,
                               cls, pid, root) if ifindices is None else
                       outcome(conn, M, MGR, "RegisterMachineWithNetwork", "sayssusai", name,
                               id_, service, cls, pid, root, ifindices))
                assert got[0] == "ok", (side.tag, name, got)
            conn.close()
        yield out


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_odd_machines_look_as_with_252(sides: list[Side], user: str) -> None:
    differ = []
    for args in COMMANDS:
        real, ours = (side.machinectl(args, user) for side in sides)
        if real != ours:
            differ.append(f"machinectl {' '.join(args)}\n--- 252:\n{real}\n--- ours:\n{ours}")
    assert not differ, "\n".join(differ)
