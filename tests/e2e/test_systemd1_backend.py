"""The systemd1 scope backend against a fake org.freedesktop.systemd1 (python-dbusmock with
tests/e2e/fake_systemd1.py): StartTransientUnit and its job, StopUnit, KillUnit, UnrefUnit, and
the failures (JobFailed, no systemd1 at all)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, cgroup2_mount, wait_for

from .conftest import run_machined
from .support import (
    DEST,
    MANAGER,
    MANAGER_PATH,
    FakeSystemd1,
    Monitor,
    Processes,
    assert_machine_gone,
    assert_state_file,
    cgroup_of,
    create_args,
    create_machine,
    dbus_call_error,
    machine_names,
    machine_path,
    machine_prop,
    mcall,
    mcall_data,
    pid_alive,
    scope_name,
    state_items,
    unique_name,
)

# The caller's scope properties: several variant types, in this order.
CALLER_PROPS = ["4",
                "DevicePolicy", "s", "closed",
                "DeviceAllow", "a(ss)", "2", "/dev/net/tun", "rwm", "char-pts", "rw",
                "KillSignal", "i", "10",
                "TimeoutStopUSec", "t", "5000000"]
CALLER_PROPS_RECORDED = [
    ["DevicePolicy", "s", "closed"],
    ["DeviceAllow", "a(ss)", [["/dev/net/tun", "rwm"], ["char-pts", "rw"]]],
    ["KillSignal", "i", 10],
    ["TimeoutStopUSec", "t", 5000000],
]


def fixed_props(name: str, leader: int, description: str | None = None) -> list[list[object]]:
    return [
        ["Slice", "s", "machine.slice"],
        ["Description", "s", description or f"Container {name}"],
        ["PIDs", "au", [leader]],
        ["Delegate", "b", True],
        ["CollectMode", "s", "inactive-or-failed"],
        ["AddRef", "b", True],
        ["TasksMax", "t", 16384],
    ]


def wait_calls(fake: FakeSystemd1, method: str, count: int = 1,
               timeout: float = 5) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []

    def enough() -> bool:
        found[:] = fake.calls(method)
        return len(found) >= count

    wait_for(enough, timeout, 0.05, f"{count} call(s) of {method}")
    return found


def test_auto_backend_picks_systemd1(bus: BusDaemon, fake_systemd1: FakeSystemd1,
                                     machined_systemd1: Machined) -> None:
    assert "Using the systemd1 scope backend" in machined_systemd1.log
    assert "Using the cgroupfs scope backend" not in machined_systemd1.log
    wait_calls(fake_systemd1, "Subscribe")


def test_create_machine_waits_for_start_job(bus: BusDaemon, fake_systemd1: FakeSystemd1,
                                            machined_systemd1: Machined, monitor: Monitor,
                                            procs: Processes) -> None:
    fake_systemd1.mock("SetJobMode", "s", "manual")
    name = unique_name("job")
    unit = scope_name(name)
    path = machine_path(name)
    leader = procs.sleeper()
    # busctl in the background: the call must stay pending until the job is done
    call = procs.spawn(["busctl", "--system", "--json=short", "call", DEST, MANAGER_PATH, MANAGER,
                        "CreateMachine", "sayssusa(sv)",
                        *create_args(name, leader.pid), *CALLER_PROPS],
                       env=bus.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (start,) = wait_calls(fake_systemd1, "StartTransientUnit")
    assert start["args"] == [unit, "fail", fixed_props(name, leader.pid) + CALLER_PROPS_RECORDED,
                             []]
    # the fake did what PID 1 does with PIDs=
    assert cgroup_of(leader.pid) == f"/machine.slice/{unit}"

    (job,) = fake_systemd1.mock("PendingJobs")[0]
    time.sleep(0.5)
    assert call.poll() is None, "CreateMachine replied before the start job finished"
    # the machine is already there, in state "opening", its job in the state file
    assert machine_prop(bus, name, "State") == "opening"
    assert machine_prop(bus, name, "Unit") == unit
    assert dict(state_items(name)).get("SCOPE_JOB") == job
    assert monitor.wait_signal("MachineNew", lambda a: a[0] == name) == [name, path]

    fake_systemd1.mock("FinishJob", "os", job, "done")
    out, err = call.communicate(timeout=5)
    assert call.returncode == 0, err
    assert json.loads(out)["data"] == [path]
    assert machine_prop(bus, name, "State") == "running"
    data = assert_state_file(name, {"NAME": name, "SCOPE": unit, "LEADER": str(leader.pid),
                                    "CLASS": "container"})
    assert "SCOPE_JOB" not in data

    # on the wire: JobRemoved for that job came before the method return
    monitor.sync()
    msgs = monitor.snapshot()
    removed = [i for i, m in enumerate(msgs) if m.get("member") == "JobRemoved"
               and m["payload"]["data"][1:] == [job, unit, "done"]]
    replied = [i for i, m in enumerate(msgs) if m.get("type") == "method_return"
               and m.get("payload", {}).get("data") == [path]]
    assert removed and replied and removed[0] < replied[0], (removed, replied)

    # no stop, no unref while it runs
    assert fake_systemd1.calls("StopUnit") == []
    assert fake_systemd1.calls("UnrefUnit") == []


def test_create_machine_whose_machine_goes_while_its_job_runs(
        bus: BusDaemon, fake_systemd1: FakeSystemd1, machined_systemd1: Machined,
        monitor: Monitor, procs: Processes) -> None:
    """252 never answers such a CreateMachine; ours says why (docs/compatibility.md)."""
    fake_systemd1.mock("SetJobMode", "s", "manual")
    name = unique_name("gone")
    leader = procs.sleeper()
    call = procs.spawn(["busctl", "--system", "call", DEST, MANAGER_PATH, MANAGER,
                        "CreateMachine", "sayssusa(sv)", *create_args(name, leader.pid), "0"],
                       env=bus.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_calls(fake_systemd1, "StartTransientUnit")
    monitor.wait_signal("MachineNew", lambda a: a[0] == name)
    mcall(bus, "UnregisterMachine", "s", name)
    out, err = call.communicate(timeout=5)
    assert (call.returncode, out) == (1, "")
    assert err.strip() == f"Call failed: Machine {name} went away before it started"
    monitor.wait_signal("MachineRemoved", lambda a: a[0] == name)
    assert name not in machine_names(bus)
    # the job ending afterwards changes nothing
    (job,) = fake_systemd1.mock("PendingJobs")[0]
    fake_systemd1.mock("FinishJob", "os", job, "done")
    wait_calls(fake_systemd1, "UnrefUnit")
    assert name not in machine_names(bus)


def test_create_machine_job_failed(bus: BusDaemon, fake_systemd1: FakeSystemd1,
                                   machined_systemd1: Machined, monitor: Monitor,
                                   procs: Processes) -> None:
    fake_systemd1.mock("SetStartResult", "s", "failed")
    name = unique_name("fail")
    unit = scope_name(name)
    leader = procs.sleeper()
    err = dbus_call_error(bus, DEST, MANAGER_PATH, MANAGER, "CreateMachine", "sayssusa(sv)",
                          [name, [], "e2e-test", "container", leader.pid, "", []])
    assert err == ("org.freedesktop.systemd1.JobFailed",
                   f"Start job for unit {unit} failed with 'failed'")
    wait_for(lambda: name not in machine_names(bus), 3, what="the machine to go")
    assert_machine_gone(bus, name, unit)
    # it had been started (announced), so its removal is announced too
    monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=3)
    wait_calls(fake_systemd1, "UnrefUnit")
    assert [c["args"] for c in fake_systemd1.calls("UnrefUnit")] == [[unit]]


def test_terminate_calls_stop_unit(bus: BusDaemon, fake_systemd1: FakeSystemd1,
                                   machined_systemd1: Machined, monitor: Monitor,
                                   procs: Processes) -> None:
    name = unique_name("stop")
    unit = scope_name(name)
    leader = procs.sleeper()
    path = create_machine(bus, name, leader.pid, props=["0"])
    (start,) = fake_systemd1.calls("StartTransientUnit")
    assert start["args"][2] == fixed_props(name, leader.pid)  # nothing added: empty a(sv)

    mcall(bus, "TerminateMachine", "s", name)
    (stop,) = wait_calls(fake_systemd1, "StopUnit")
    assert stop["args"] == [unit, "fail"]
    assert monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=5) == [name,
                                                                                        path]
    assert leader.wait(5) == -signal.SIGTERM  # the fake stopped the scope
    assert_machine_gone(bus, name, unit)
    (unref,) = wait_calls(fake_systemd1, "UnrefUnit")
    assert unref["args"] == [unit]
    assert len(fake_systemd1.calls("StopUnit")) == 1
    assert fake_systemd1.calls("KillUnit") == []


def test_kill_machine_calls_kill_unit(bus: BusDaemon, fake_systemd1: FakeSystemd1,
                                      machined_systemd1: Machined, monitor: Monitor,
                                      procs: Processes) -> None:
    name = unique_name("kill")
    unit = scope_name(name)
    leader = procs.sleeper()
    create_machine(bus, name, leader.pid, cls="vm")
    assert fake_systemd1.calls("StartTransientUnit")[0]["args"][2][1] == [
        "Description", "s", f"Virtual Machine {name}"]

    def state() -> str:
        stat = Path(f"/proc/{leader.pid}/stat").read_text()
        return stat[stat.rfind(")") + 2]

    mcall(bus, "KillMachine", "ssi", name, "all", signal.SIGSTOP)
    mcall(bus, "KillMachine", "ssi", name, "", signal.SIGCONT)
    assert [c["args"] for c in fake_systemd1.calls("KillUnit")] == [
        [unit, "all", signal.SIGSTOP], [unit, "all", signal.SIGCONT]]
    # who=leader does not go through systemd
    mcall(bus, "KillMachine", "ssi", name, "leader", signal.SIGSTOP)
    wait_for(lambda: state() == "T", 3, what="the leader to stop")
    assert len(fake_systemd1.calls("KillUnit")) == 2
    assert machine_prop(bus, name, "State") == "running"
    os.kill(leader.pid, signal.SIGCONT)


def test_leader_death_removes_machine(bus: BusDaemon, fake_systemd1: FakeSystemd1,
                                      machined_systemd1: Machined, monitor: Monitor,
                                      procs: Processes) -> None:
    name = unique_name("dead")
    unit = scope_name(name)
    leader = procs.sleeper()
    path = create_machine(bus, name, leader.pid)
    assert mcall_data(bus, "GetMachineByPID", "u", leader.pid) == [path]
    leader.kill()
    leader.wait(3)
    t0 = time.monotonic()
    assert monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=3) == [name,
                                                                                        path]
    assert time.monotonic() - t0 < 2
    assert_machine_gone(bus, name, unit)
    (unref,) = wait_calls(fake_systemd1, "UnrefUnit")
    assert unref["args"] == [unit]
    assert not pid_alive(leader.pid)


@pytest.fixture
def machined_without_systemd1(bus: BusDaemon) -> Iterator[Machined]:
    yield from run_machined(bus, "--scope-backend=systemd1")


def test_create_machine_without_systemd1(bus: BusDaemon, machined_without_systemd1: Machined,
                                         monitor: Monitor, procs: Processes) -> None:
    assert "Using the systemd1 scope backend" in machined_without_systemd1.log
    name = unique_name("nosd")
    leader = procs.sleeper()
    err = dbus_call_error(bus, DEST, MANAGER_PATH, MANAGER, "CreateMachine", "sayssusa(sv)",
                          [name, [], "e2e-test", "container", leader.pid, "", []])
    assert err[0] == "org.freedesktop.DBus.Error.ServiceUnknown", err
    assert "org.freedesktop.systemd1" in err[1]
    wait_for(lambda: name not in machine_names(bus), 3, what="the half-made machine to go")
    assert_machine_gone(bus, name, scope_name(name))
    monitor.sync()
    assert not any(a[0] == name for a in monitor.signals("MachineNew"))
    assert not any(a[0] == name for a in monitor.signals("MachineRemoved"))
    assert pid_alive(leader.pid)
    # the daemon still works
    assert mcall(bus, "ListMachines").returncode == 0


def test_terminate_with_slow_systemd1_stops_unit_once(bus: BusDaemon,
                                                     fake_systemd1: FakeSystemd1,
                                                     machined_systemd1: Machined,
                                                     monitor: Monitor,
                                                     procs: Processes) -> None:
    """PID 1 is busy: it stops the scope (the leader dies) but its StopUnit reply comes 0.5 s
    later. 252 calls StopUnit synchronously, so a machine is stopped once; the daemon must not
    send a second StopUnit from garbage collection while the first is still in flight."""
    fake_systemd1.mock("SetStopReplyDelay", "u", 500)
    name = unique_name("slow")
    unit = scope_name(name)
    leader = procs.sleeper()
    path = create_machine(bus, name, leader.pid)
    mcall(bus, "TerminateMachine", "s", name)
    assert monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=5) == [name,
                                                                                        path]
    assert leader.wait(5) == -signal.SIGTERM
    wait_calls(fake_systemd1, "UnrefUnit")
    time.sleep(0.7)  # a second StopUnit, if any, has been answered by now
    assert [c["args"] for c in fake_systemd1.calls("StopUnit")] == [[unit, "fail"]]
    assert_machine_gone(bus, name, unit)


def test_a_reloaded_machine_has_its_scope_stopped_when_its_leader_dies(
        bus: BusDaemon, fake_systemd1: FakeSystemd1, machined_systemd1: Machined,
        monitor: Monitor, procs: Processes) -> None:
    """The scope a daemon made before a restart is still one of ours: when the leader dies,
    what is left in it is stopped, as without the restart. The AddRef reference went with
    the old daemon's connection, so no UnrefUnit (252 sends none for a reloaded machine)."""
    name = unique_name("rel")
    unit = scope_name(name)
    leader = procs.sleeper()
    create_machine(bus, name, leader.pid)
    stray = procs.sleeper()  # a process of the machine that outlives its leader
    scope_dir = Path(cgroup2_mount()) / cgroup_of(leader.pid).lstrip("/")
    (scope_dir / "cgroup.procs").write_text(str(stray.pid))
    machined_systemd1.kill9()
    machined_systemd1.start()
    assert name in machine_names(bus)
    leader.kill()
    leader.wait(3)
    monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=5)
    assert [c["args"] for c in wait_calls(fake_systemd1, "StopUnit")] == [[unit, "fail"]]
    assert stray.wait(5) == -signal.SIGTERM
    time.sleep(0.3)  # an UnrefUnit, if any, has been sent by now
    assert fake_systemd1.calls("UnrefUnit") == []
    assert_machine_gone(bus, name, unit)


def test_stopping_the_daemon_leaves_its_scopes_alone(
        bus: BusDaemon, fake_systemd1: FakeSystemd1, machined_systemd1: Machined,
        procs: Processes) -> None:
    """SIGTERM: no StopUnit, no UnrefUnit (the AddRef goes with the connection), as 252; the
    next daemon takes the machine back."""
    name = unique_name("term")
    leader = procs.sleeper()
    create_machine(bus, name, leader.pid)
    assert machined_systemd1.stop() == 0
    assert fake_systemd1.calls("StopUnit") == fake_systemd1.calls("UnrefUnit") == []
    assert pid_alive(leader.pid)
    machined_systemd1.start()
    assert name in machine_names(bus)


def test_scope_errors_are_logged_as_252_logs_them(bus: BusDaemon, fake_systemd1: FakeSystemd1,
                                                  machined_systemd1: Machined,
                                                  procs: Processes) -> None:
    name = unique_name("logged")
    unit = scope_name(name)
    create_machine(bus, name, procs.sleeper().pid)
    fake_systemd1.mock("SetUnitCallError", "s", "org.freedesktop.systemd1.ShuttingDown")
    try:
        assert mcall(bus, "TerminateMachine", "s", name, check=False).returncode != 0
    finally:
        fake_systemd1.mock("SetUnitCallError", "s", "")
    mcall(bus, "UnregisterMachine", "s", name)  # its scope stays with systemd1
    assert mcall(bus, "CreateMachine", "sayssusa(sv)", *create_args(name, procs.sleeper().pid),
                 "0", check=False).returncode != 0
    log = machined_systemd1.log
    assert "ERROR Failed to stop machine scope: Refused by the test." in log, log
    assert f"ERROR Failed to start machine scope: Unit {unit} already exists." in log, log


def test_a_forged_job_removed_is_ignored(bus: BusDaemon, fake_systemd1: FakeSystemd1,
                                         machined_systemd1: Machined, procs: Processes) -> None:
    """Any client may send the daemon a signal directly: only systemd1's own count. (252 fails
    the CreateMachine on this forged JobRemoved.)"""
    fake_systemd1.mock("SetJobMode", "s", "manual")
    name = unique_name("forged")
    call = procs.spawn(["busctl", "--system", "--json=short", "call", DEST, MANAGER_PATH, MANAGER,
                        "CreateMachine", "sayssusa(sv)", *create_args(name, procs.sleeper().pid),
                        "0"], env=bus.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    wait_calls(fake_systemd1, "StartTransientUnit")
    (job,) = fake_systemd1.mock("PendingJobs")[0]
    subprocess.run(["dbus-send", "--system", f"--dest={DEST}", "--type=signal",
                    "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager.JobRemoved",
                    "uint32:1", f"objpath:{job}", f"string:{scope_name(name)}", "string:failed"],
                   env=bus.env(), check=True)
    time.sleep(0.5)
    assert call.poll() is None, call.communicate()
    assert machine_prop(bus, name, "State") == "opening"
    fake_systemd1.mock("FinishJob", "os", job, "done")
    out, err = call.communicate(timeout=5)
    assert call.returncode == 0, err
    assert machine_prop(bus, name, "State") == "running"
    assert "which is not systemd1" in machined_systemd1.log
