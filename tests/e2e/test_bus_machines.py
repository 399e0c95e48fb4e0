"""Machines with a plain process as leader, driven through busctl: RegisterMachine and
CreateMachine (cgroupfs backend), GetMachineByPID, MachineNew/MachineRemoved, TerminateMachine,
KillMachine, UnregisterMachine."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, busctl, cgroup2_mount, wait_for

from .support import (
    DEST,
    MANAGER,
    MANAGER_PATH,
    Monitor,
    Processes,
    assert_machine_gone,
    assert_state_file,
    cgroup_of,
    cgroup_pids,
    create_args,
    create_machine,
    machine_names,
    machine_path,
    machine_prop,
    mcall,
    mcall_data,
    mirror_scope_dir,
    pid_alive,
    register_machine,
    scope_dir,
    scope_name,
    unique_name,
    unit_link,
)

MACHINE_ID = bytes(range(0x10, 0x20))


def forking_leader(procs: Processes) -> subprocess.Popen[str]:
    """A shell that forks a `sleep` child only when told to (so the child is born in whatever
    scope the leader was moved to); prints the child's PID."""
    return procs.spawn(["sh", "-c", "read line; sleep 60 & echo $!; wait"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def fork_child(leader: subprocess.Popen[str]) -> int:
    assert leader.stdin is not None and leader.stdout is not None
    leader.stdin.write("go\n")
    leader.stdin.flush()
    return int(leader.stdout.readline())


def assert_in_scope(name: str, pid: int) -> None:
    unit = scope_name(name)
    assert cgroup_of(pid) == f"/machine.slice/{unit}"
    assert pid in cgroup_pids(scope_dir(name))


def test_register_machine(bus: BusDaemon, machined: Machined, monitor: Monitor,
                          procs: Processes) -> None:
    """RegisterMachine of a process in no unit: the daemon gives it machine-NAME.scope."""
    name = unique_name("reg")
    unit = scope_name(name)
    leader = forking_leader(procs)
    path = register_machine(bus, name, leader.pid, machine_id=MACHINE_ID, root="/srv/e2e")
    assert path == machine_path(name)
    assert monitor.wait_signal("MachineNew", lambda a: a[0] == name) == [name, path]
    assert machine_prop(bus, name, "Unit") == unit
    assert machine_prop(bus, name, "Leader") == leader.pid
    assert machine_prop(bus, name, "State") == "running"
    assert machine_prop(bus, name, "Id") == list(MACHINE_ID)
    assert_in_scope(name, leader.pid)
    data = assert_state_file(name, {"NAME": name, "SCOPE": unit, "SERVICE": "e2e-test",
                                    "ROOT": "/srv/e2e", "ID": MACHINE_ID.hex(),
                                    "LEADER": str(leader.pid), "CLASS": "container"})
    assert list(data) == ["NAME", "SCOPE", "SERVICE", "ROOT", "ID", "LEADER", "CLASS",
                          "REALTIME", "MONOTONIC"]
    assert os.readlink(unit_link(unit)) == name

    # GetMachineByPID: the leader (leader table) and a child born in the scope (its cgroup)
    child = fork_child(leader)
    assert_in_scope(name, child)
    assert mcall_data(bus, "GetMachineByPID", "u", leader.pid) == [path]
    assert mcall_data(bus, "GetMachineByPID", "u", child) == [path]
    outsider = procs.sleeper()
    out = mcall(bus, "GetMachineByPID", "u", outsider.pid, check=False)
    assert out.returncode != 0
    assert f"PID {outsider.pid} does not belong to any known machine" in out.stderr
    # PID 0 is the caller's PID: busctl from inside the scope, then from the host
    inside = subprocess.run(
        ["sh", "-c", f"echo $$ > {scope_dir(name)}/cgroup.procs && exec busctl --system "
         f"--json=short call {DEST} {MANAGER_PATH} {MANAGER} GetMachineByPID u 0"],
        env=bus.env(), capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(inside.stdout)["data"] == [path]
    out = mcall(bus, "GetMachineByPID", "u", 0, check=False)
    assert out.returncode != 0
    assert re.search(r"PID [1-9]\d* does not belong to any known machine", out.stderr), out.stderr

    # TerminateMachine: SIGTERM to the scope, the machine goes, the scope cgroup too
    mcall(bus, "TerminateMachine", "s", name)
    assert monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=3) == [name,
                                                                                        path]
    wait_for(lambda: not pid_alive(child), 3, what="the child to die")
    assert leader.wait(3) == -signal.SIGTERM
    wait_for(lambda: not scope_dir(name).exists(), 3, what="the scope cgroup to go")
    assert_machine_gone(bus, name, unit)


def test_create_machine_empty_properties(bus: BusDaemon, machined: Machined, monitor: Monitor,
                                         procs: Processes) -> None:
    name = unique_name("-cr")  # a dash: the unit name escapes it
    unit = scope_name(name)
    assert "\\x2d" in unit
    leader = procs.sleeper()
    path = create_machine(bus, name, leader.pid, props=["0"], cls="vm", service="qemu")
    assert path == machine_path(name)
    assert monitor.wait_signal("MachineNew", lambda a: a[0] == name) == [name, path]
    assert machine_prop(bus, name, "Unit") == unit
    assert machine_prop(bus, name, "Class") == "vm"
    assert machine_prop(bus, name, "Service") == "qemu"
    assert machine_prop(bus, name, "State") == "running"
    assert_in_scope(name, leader.pid)
    # SCOPE= is C-escaped (§7.2): the backslash of \x2d is doubled
    data = assert_state_file(name, {"NAME": name, "SCOPE": unit.replace("\\", "\\\\"),
                                    "SERVICE": "qemu",
                                    "LEADER": str(leader.pid), "CLASS": "vm"})
    assert "ROOT" not in data and "ID" not in data and "SCOPE_JOB" not in data
    assert os.readlink(unit_link(unit)) == name
    assert mcall_data(bus, "GetMachineByPID", "u", leader.pid) == [path]

    # The leader dies on its own: machine and scope go.
    os.kill(leader.pid, signal.SIGKILL)
    leader.wait(3)
    assert monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=2) == [name,
                                                                                        path]
    wait_for(lambda: not scope_dir(name).exists(), 2, what="the scope cgroup to go")
    assert_machine_gone(bus, name, unit)


def test_create_machine_refuses_bad_scope_properties(bus: BusDaemon, machined: Machined,
                                                     procs: Processes) -> None:
    """In cgroupfs mode the daemon stands in for systemd's StartTransientUnit: a property it
    applies with a bad value is refused in systemd's words, before any scope is made or the
    leader moved."""
    leader = procs.sleeper()
    before = cgroup_of(leader.pid)
    name = unique_name("-badprop")
    for props, error in (
            (["1", "KillSignal", "s", "x"], "No such device or address"),
            (["1", "KillSignal", "i", "0"], "Invalid KillSignal setting: 0"),
            (["1", "KillMode", "s", "bogus"], "Invalid KillMode setting: bogus"),
            (["1", "Slice", "s", "bogus"], "Invalid unit name 'bogus'"),
            (["1", "Slice", "s", "foo.service"], "Unit name 'foo.service' is not a slice"),
            (["1", "TimeoutStopUSec", "s", "x"], "No such device or address")):
        out = mcall(bus, "CreateMachine", "sayssusa(sv)", *create_args(name, leader.pid),
                    *props, check=False)
        assert out.returncode != 0 and error in out.stderr, (props, out.stderr)
        assert cgroup_of(leader.pid) == before and not scope_dir(name).exists()
    assert name not in machine_names(bus)


def test_kill_machine(bus: BusDaemon, machined: Machined, monitor: Monitor,
                      procs: Processes) -> None:
    name = unique_name("kill")
    leader = forking_leader(procs)
    create_machine(bus, name, leader.pid)
    child = fork_child(leader)
    assert_in_scope(name, child)

    def state(pid: int) -> str:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2]

    # who=leader: only the leader
    mcall(bus, "KillMachine", "ssi", name, "leader", signal.SIGSTOP)
    wait_for(lambda: state(leader.pid) == "T", 3, what="the leader to stop")
    assert state(child) == "S"
    # who=all: everything in the scope
    mcall(bus, "KillMachine", "ssi", name, "all", signal.SIGSTOP)
    wait_for(lambda: state(child) == "T", 3, what="the child to stop")
    # who="" means all
    mcall(bus, "KillMachine", "ssi", name, "", signal.SIGCONT)
    wait_for(lambda: state(leader.pid) == "S" and state(child) == "S", 3,
             what="both to continue")
    assert machine_prop(bus, name, "State") == "running"
    monitor.sync()
    assert monitor.signals("MachineRemoved") == []

    mcall(bus, "KillMachine", "ssi", name, "all", signal.SIGKILL)
    monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=3)
    assert leader.wait(3) == -signal.SIGKILL
    assert not pid_alive(child)
    wait_for(lambda: not scope_dir(name).exists(), 2, what="the scope cgroup to go")
    assert_machine_gone(bus, name, scope_name(name))


def test_kill_and_terminate_with_a_threaded_cgroup_in_the_scope(
        bus: BusDaemon, machined: Machined, monitor: Monitor, procs: Processes) -> None:
    # The payload may make a threaded cgroup in its delegated subtree; reading its
    # cgroup.procs fails (EOPNOTSUPP), its processes are the threaded domain's.
    name = unique_name("thr")
    leader = procs.sleeper()
    create_machine(bus, name, leader.pid)
    threaded = scope_dir(name) / "t"
    threaded.mkdir()
    try:
        (threaded / "cgroup.type").write_text("threaded")
        mcall(bus, "KillMachine", "ssi", name, "all", signal.SIGCONT)
        mcall(bus, "TerminateMachine", "s", name)
        monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=5)
        assert leader.wait(3) == -signal.SIGTERM
    finally:
        with contextlib.suppress(OSError):
            threaded.rmdir()
    wait_for(lambda: not scope_dir(name).exists(), 3, what="the scope cgroup to go")


def test_a_scope_joined_as_it_goes_is_removed_once_left(bus: BusDaemon, machined: Machined,
                                                         monitor: Monitor,
                                                         procs: Processes) -> None:
    # A shell's helper may enter the machine's cgroups just as its scope is found empty: the
    # rmdir then fails, and is tried again. Here a process sits in the scope's mirror in the
    # name=systemd hierarchy (as nspawn makes it) when the cgroup2 scope empties.
    name = unique_name("join")
    mirror = mirror_scope_dir(name)
    if mirror is None:
        pytest.skip("no name=systemd hierarchy (not a hybrid host)")
    leader = procs.sleeper()
    create_machine(bus, name, leader.pid)
    mirror.mkdir(parents=True)
    joiner = procs.sleeper()
    try:
        (mirror / "cgroup.procs").write_text(str(joiner.pid))
        leader.kill()
        monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=5)
        wait_for(lambda: not scope_dir(name).exists(), 3, what="the cgroup2 scope to go")
        time.sleep(0.5)
        assert mirror.exists()  # still held
    finally:
        joiner.kill()
        joiner.wait()
    wait_for(lambda: not mirror.exists(), 10, what="the mirror to go once left")


def test_unregister_keeps_scope_running(bus: BusDaemon, machined: Machined, monitor: Monitor,
                                        procs: Processes) -> None:
    name = unique_name("unreg")
    unit = scope_name(name)
    leader = procs.sleeper()
    path = register_machine(bus, name, leader.pid, netif=[3])
    assert_state_file(name, {"NETIF": "3"})
    mcall(bus, "UnregisterMachine", "s", name)
    assert monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=2) == [name,
                                                                                        path]
    assert_machine_gone(bus, name, unit)
    # the scope keeps running
    time.sleep(0.5)
    assert pid_alive(leader.pid)
    assert_in_scope(name, leader.pid)
    out = mcall(bus, "GetMachineByPID", "u", leader.pid, check=False)
    assert out.returncode != 0 and "does not belong to any known machine" in out.stderr
    # the name is free again
    assert mcall(bus, "GetMachine", "s", name, check=False).returncode != 0
    # we stop it ourselves; the now empty scope does not linger
    leader.kill()
    leader.wait(3)
    wait_for(lambda: not scope_dir(name).exists(), 3, what="the empty scope to be removed")
    assert monitor.signals("MachineRemoved").count([name, path]) == 1
    assert monitor.signals("MachineNew").count([name, path]) == 1


def test_machine_self_path(bus: BusDaemon, machined: Machined, procs: Processes) -> None:
    """/org/freedesktop/machine1/machine/self is the caller's own machine (by its PID's cgroup
    here: busctl is a child born in the scope); from the host it is an unknown object."""
    name = unique_name("self")
    leader = procs.spawn(
        ["sh", "-c", "read line; busctl get-property org.freedesktop.machine1 "
         "/org/freedesktop/machine1/machine/self org.freedesktop.machine1.Machine Name"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=bus.env())
    register_machine(bus, name, leader.pid)
    out, _ = leader.communicate("go\n", timeout=30)
    assert out.strip() == f's "{name}"'

    host = busctl(bus, "get-property", "org.freedesktop.machine1",
                  "/org/freedesktop/machine1/machine/self", "org.freedesktop.machine1.Machine",
                  "Name", check=False)
    assert host.returncode != 0
    assert "Unknown object '/org/freedesktop/machine1/machine/self'" in host.stderr
    tree = busctl(bus, "tree", "--list", "org.freedesktop.machine1").stdout.split()
    assert "/org/freedesktop/machine1/machine/self" not in tree


def test_foreign_scope_emptied_removes_machine(bus: BusDaemon, machined: Machined,
                                               monitor: Monitor, procs: Processes) -> None:
    """A machine registered in a scope somebody else made goes when that scope empties, even
    though its leader lives on elsewhere (as 252 drops it when systemd's unit goes)."""
    name = unique_name("foreign")
    slice_dir = Path(cgroup2_mount()) / "machine.slice"
    made_slice = not slice_dir.exists()
    theirs, elsewhere = slice_dir / f"{name}.scope", slice_dir / f"{name}-elsewhere.scope"
    leader = procs.sleeper()
    try:
        for cgroup in (theirs, elsewhere):
            cgroup.mkdir(parents=True)
        (theirs / "cgroup.procs").write_text(str(leader.pid))
        path = register_machine(bus, name, leader.pid)
        assert machine_prop(bus, name, "Unit") == f"{name}.scope"
        (elsewhere / "cgroup.procs").write_text(str(leader.pid))  # the scope is empty now
        assert monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=2) == \
            [name, path]
        assert pid_alive(leader.pid)
        assert theirs.exists()  # not ours to remove
    finally:
        leader.kill()
        leader.wait()
        for cgroup in (theirs, elsewhere):
            wait_for(lambda c=cgroup: not c.exists() or not cgroup_pids(c), 5)
            if cgroup.exists():
                cgroup.rmdir()
        if made_slice:
            with contextlib.suppress(OSError):
                slice_dir.rmdir()
