"""The drop-in mode, the real 252 decides: 252 and ours (systemd1 backend), each on a bus of its
own with the fake org.freedesktop.systemd1 (tests/e2e/fake_systemd1.py), get the same calls;
what they ask systemd1 (StartTransientUnit's properties in order, StopUnit, KillUnit, UnrefUnit,
Subscribe) and what they answer must be the same. The machines get names of their own per
daemon ("dsysreal…", "dsysours…"), because both fakes make their scopes in the one cgroup
hierarchy; the names are compared with that part taken out."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sdbus.sd_bus_internals import SdBus

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.client import MANAGER as MGR
from tests.helpers.client import MANAGER_PATH as M
from tests.helpers.client import connect, outcome
from tests.helpers.daemon import cgroup2_mount, wait_for
from tests.helpers.leaders import CgroupLeaders
from tests.helpers.real252 import (
    REAL_MACHINED,
    difference,
    host_dirs,
    map_strings,
    side_by_side,
)

from .support import FakeSystemd1, Monitor, Processes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, mounts)")

WHO = ("real", "ours")
SCOPE_PROPS = [("Description", ("s", "a scope of the caller's")), ("KillSignal", ("i", 10)),
               ("TimeoutStopUSec", ("t", 5_000_000)),
               ("DeviceAllow", ("a(ss)", [("/dev/net/tun", "rwm")]))]


@dataclass
class Side:
    who: str
    bus: BusDaemon
    conn: SdBus
    fake: FakeSystemd1
    leaders: CgroupLeaders
    procs: Processes

    def leader(self) -> int:
        return self.procs.sleeper(600).pid

    def scoped_leader(self) -> int:
        """A sleeper in a scope of its own that systemd1 (the fake) knows nothing of."""
        return self.leaders.sleeper(Path(cgroup2_mount()) / f"machine.slice/dsys{self.who}reg.scope")


@pytest.fixture(scope="module")
def sides() -> Iterator[dict[str, Side]]:
    if not os.path.exists(REAL_MACHINED):
        pytest.fail(f"{REAL_MACHINED} is missing: the set-up installs systemd-container")
    slice_dir = Path(cgroup2_mount()) / "machine.slice"
    leaders = CgroupLeaders()
    procs = Processes()
    fakes: dict[BusDaemon, FakeSystemd1] = {}
    out: dict[str, Side] = {}

    def start_fake(bus: BusDaemon) -> FakeSystemd1:
        fakes[bus] = FakeSystemd1(bus)
        return fakes[bus]

    with host_dirs(slice_dir):
        try:
            for i in range(6):
                for who in WHO:  # the scopes the fakes make
                    leaders.track(slice_dir / f"machine-dsys{who}{i}.scope")
            with side_by_side("--scope-backend=auto", "--stop-timeout=3",
                              on_bus=start_fake) as two:
                assert two.real_bus is not None
                for who, bus in (("real", two.real_bus), ("ours", two.ours_bus)):
                    out[who] = Side(who, bus, connect(bus), fakes[bus], leaders, procs)
                yield out
        finally:
            procs.cleanup()
            leaders.close()


def plain(value: Any, who: str) -> Any:
    """`value` with the daemon's own part of the names taken out."""
    return map_strings(value, lambda v: v.replace(f"dsys{who}", "dsysWHO"))


def calls_of(side: Side, who: str, since: int) -> list[Any]:
    calls = plain(side.fake.calls()[since:], who)
    for c in calls:  # the leaders are each daemon's own processes
        if c["method"] == "StartTransientUnit":
            for prop in c["args"][2]:
                if prop[0] == "PIDs":
                    prop[2] = ["PID"]
    return calls


def both(sides: dict[str, Side], member: str, sig: str, *args: Any) -> dict[str, Any]:
    """The call to each daemon; "{who}" in string arguments becomes its tag, "{leader}" a new
    sleeper of that side, "{scoped}" one in a scope of its own."""
    answers = {}
    for who, side in sides.items():
        leader = (side.leader() if "{leader}" in args
                  else side.scoped_leader() if "{scoped}" in args else 0)
        filled = [a.replace("{who}", who) if isinstance(a, str) else a for a in args]
        filled = [leader if a in ("{leader}", "{scoped}") else a for a in filled]
        answers[who] = plain(outcome(side.conn, M, MGR, member, sig, *filled), who)
    return answers


def test_start_up_calls(sides: dict[str, Side]) -> None:
    for side in sides.values():
        wait_for(lambda s=side: s.fake.calls("Subscribe"), 10, what="Subscribe")
    assert calls_of(sides["real"], "real", 0) == calls_of(sides["ours"], "ours", 0)


def test_a_machine_from_creation_to_termination(sides: dict[str, Side]) -> None:
    since = {who: len(side.fake.calls()) for who, side in sides.items()}
    steps: list[tuple[str, str, tuple[Any, ...]]] = [
        ("CreateMachine", "sayssusa(sv)",
         ("dsys{who}0", bytes(range(16)), "svc", "container", "{leader}", "/srv", SCOPE_PROPS)),
        ("CreateMachineWithNetwork", "sayssusaia(sv)",
         ("dsys{who}1", b"", "", "vm", "{leader}", "", [4, 2], [])),
        ("CreateMachine", "sayssusa(sv)",  # a property systemd1 rejects is passed on as it is
         ("dsys{who}2", b"", "", "container", "{leader}", "", [("Bogus", ("s", "x"))])),
        ("CreateMachine", "sayssusa(sv)",  # the name is taken
         ("dsys{who}0", b"", "", "container", "{leader}", "", [])),
        ("KillMachine", "ssi", ("dsys{who}0", "all", 18)),
        ("KillMachine", "ssi", ("dsys{who}0", "leader", 18)),
        ("GetMachine", "s", ("dsys{who}1",)),
        ("TerminateMachine", "s", ("dsys{who}1",)),
        ("TerminateMachine", "s", ("dsys{who}0",)),
        ("RegisterMachine", "sayssus", ("dsys{who}3", b"", "reg", "container", "{scoped}", "/")),
        ("KillMachine", "ssi", ("dsys{who}3", "all", 18)),
        ("TerminateMachine", "s", ("dsys{who}3",)),
    ]
    differ = []
    for member, sig, args in steps:
        answers = both(sides, member, sig, *args)
        if answers["real"] != answers["ours"]:
            differ.append(difference(f"{member} {args}", answers["real"], answers["ours"]))
        if member == "TerminateMachine" and args[0] != "dsys{who}3":  # one at a time
            for who, side in sides.items():
                name = args[0].replace("{who}", who)
                wait_for(lambda c=side.conn, n=name: outcome(c, M, MGR, "GetMachine", "s", n)[0]
                         == "error", 10, what=f"{name} to go")
    real, ours = (calls_of(sides[who], who, since[who]) for who in WHO)
    if real != ours:
        differ.append("calls to systemd1:\n  252:  " + "\n        ".join(map(str, real))
                      + "\n  ours: " + "\n        ".join(map(str, ours)))
    assert not differ, "\n".join(differ)
    assert [c["method"] for c in real if c["method"] == "StartTransientUnit"] == \
        ["StartTransientUnit"] * 3, real
    assert [c["method"] for c in real].count("StopUnit") == 3, real


# Errors of systemd1 that 252 keeps only the errno of (sd-bus's map of systemd's error names).
UNIT_CALL_ERRORS = ["org.freedesktop.systemd1.UnitMasked", "org.freedesktop.systemd1.ShuttingDown",
                    "org.freedesktop.systemd1.NoSuchJob", "org.freedesktop.systemd1.NotReferenced",
                    "org.freedesktop.systemd1.ScopeNotRunning", "org.freedesktop.machine1.NoSuchMachine",
                    "org.freedesktop.login1.NoSuchSession", "org.example.Unknown"]


def test_kill_and_terminate_errors_of_systemd1(sides: dict[str, Side]) -> None:
    assert both(sides, "CreateMachine", "sayssusa(sv)", "dsys{who}5", b"", "", "container",
                "{leader}", "", [])["ours"][0] == "ok"
    try:
        for name in UNIT_CALL_ERRORS:
            for side in sides.values():
                side.fake.mock("SetUnitCallError", "s", name)
            for member, sig, args in (("KillMachine", "ssi", ("dsys{who}5", "all", 18)),
                                      ("TerminateMachine", "s", ("dsys{who}5",))):
                answers = both(sides, member, sig, *args)
                assert answers["real"] == answers["ours"], (name, member, answers)
    finally:
        for side in sides.values():
            side.fake.mock("SetUnitCallError", "s", "")
        both(sides, "TerminateMachine", "s", "dsys{who}5")


def test_the_unit_reference_is_dropped_after_the_unregistration_is_answered(
        sides: dict[str, Side]) -> None:
    """252 finalizes a machine in UnregisterMachine (MachineRemoved goes out before the reply)
    and frees it in the GC pass after the call, where UnrefUnit is sent."""
    assert both(sides, "CreateMachine", "sayssusa(sv)", "dsys{who}4", b"", "", "container",
                "{leader}", "", [])["ours"][0] == "ok"
    orders = {}
    for who, side in sides.items():
        monitor = Monitor(side.bus)
        try:
            assert outcome(side.conn, M, MGR, "UnregisterMachine", "s", f"dsys{who}4")[0] == "ok"
            wait_for(lambda s=side: s.fake.calls("UnrefUnit"), 10, what="UnrefUnit")
            monitor.sync()
            messages = monitor.snapshot()
        finally:
            monitor.stop()
        call = next(m for m in messages if m.get("member") == "UnregisterMachine")
        order = []
        for m in messages:
            if m.get("type") == "method_return" and m.get("reply_cookie") == call["cookie"]:
                order.append("reply")
            elif m.get("member") in ("MachineRemoved", "UnrefUnit"):
                order.append(m["member"])
        orders[who] = order
    assert orders["real"] == ["MachineRemoved", "reply", "UnrefUnit"], orders
    assert orders["ours"] == orders["real"]
