"""The daemon is killed with SIGKILL and started again (cgroupfs backend): machines whose leader
still runs come back from their state files (same timestamp, MachineNew again), the others are
dropped with their files."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, cgroup2_mount, wait_for

from .support import (
    Monitor,
    Processes,
    assert_machine_gone,
    create_machine,
    machine_names,
    machine_path,
    machine_prop,
    mcall,
    mcall_data,
    pid_alive,
    register_machine,
    scope_dir,
    scope_name,
    state_file,
    state_items,
    unique_name,
    unit_link,
)

PROPS = ("Name", "Id", "Timestamp", "TimestampMonotonic", "Service", "Unit", "Leader", "Class",
         "RootDirectory", "NetworkInterfaces", "State")


@pytest.mark.parametrize("survivor_kind", ["created", "registered"])
def test_restart_after_sigkill(bus: BusDaemon, machined: Machined, monitor: Monitor,
                               procs: Processes, survivor_kind: str) -> None:
    keep = procs.sleeper()
    doomed = procs.sleeper()
    keep_name, doomed_name = unique_name("keep"), unique_name("gone")
    if survivor_kind == "created":
        create_machine(bus, keep_name, keep.pid, root="/srv/keep",
                       machine_id=bytes(range(16)))
        register_machine(bus, doomed_name, doomed.pid, netif=[4])
    else:
        register_machine(bus, keep_name, keep.pid, netif=[2, 5], root="/srv/keep",
                         machine_id=bytes(range(16)))
        create_machine(bus, doomed_name, doomed.pid)
    before = {p: machine_prop(bus, keep_name, p) for p in PROPS}
    keep_file = state_items(keep_name)
    assert before["State"] == "running"

    machined.kill9()
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(5)
    assert state_file(keep_name).exists() and state_file(doomed_name).exists()
    monitor.sync()
    seen_before = len(monitor.signals("MachineNew"))

    machined.start()
    path = machine_path(keep_name)
    # the survivor is back, announced again, unchanged
    wait_for(lambda: [keep_name, path] in monitor.signals("MachineNew")[seen_before:], 5,
             what="MachineNew of the survivor after the restart")
    assert mcall_data(bus, "GetMachine", "s", keep_name) == [path]
    after = {p: machine_prop(bus, keep_name, p) for p in PROPS}
    assert after == before
    assert state_items(keep_name) == keep_file
    assert mcall_data(bus, "GetMachineByPID", "u", keep.pid) == [path]
    assert "Ready: 1 machine(s) registered." in machined.log

    # the dead one is gone, files and all, without being announced again
    assert sorted(machine_names(bus)) == sorted([".host", keep_name])
    assert_machine_gone(bus, doomed_name)
    monitor.sync()
    assert not any(a[0] == doomed_name for a in monitor.signals("MachineNew")[seen_before:])

    # the reloaded machine is fully managed: terminate it
    mcall(bus, "TerminateMachine", "s", keep_name)
    monitor.wait_signal("MachineRemoved", lambda a: a[0] == keep_name, timeout=5)
    assert keep.wait(5) == -signal.SIGTERM
    wait_for(lambda: not scope_dir(keep_name).exists(), 3, what="the survivor's scope to go")
    assert_machine_gone(bus, keep_name, scope_name(keep_name))
    assert not unit_link(scope_name(keep_name)).is_symlink()

    # §7.4: the dropped machine's files are unlinked, its unit symlink too (else sd-login's
    # sd_pid_get_machine_name() still names it for processes of a unit of that name)
    doomed_link = unit_link(scope_name(doomed_name))
    assert not doomed_link.is_symlink(), f"{doomed_link} left behind"


def test_restart_drops_empty_scope_of_dead_machine(bus: BusDaemon, machined: Machined,
                                                   procs: Processes) -> None:
    """The daemon made the dead machine's scope (cgroupfs backend plays systemd's part); when it
    finds it empty after a restart, it removes it as systemd would collect such a scope."""
    leader = procs.sleeper()
    name = unique_name("empty")
    create_machine(bus, name, leader.pid)
    assert scope_dir(name).is_dir()
    machined.kill9()
    leader.kill()
    leader.wait(5)
    assert not pid_alive(leader.pid)
    machined.start()
    assert_machine_gone(bus, name)
    wait_for(lambda: not scope_dir(name).exists(), 3, what="the empty scope cgroup to go")


def test_restart_drops_empty_scope_in_another_slice(bus: BusDaemon, machined: Machined,
                                                    procs: Processes) -> None:
    """A scope the caller's Slice= put elsewhere is found and removed too, with its slices."""
    leader = procs.sleeper()
    name = unique_name("slice")
    top = f"{unique_name('e2e')}.slice"
    nested = top.removesuffix(".slice") + "-sub.slice"
    create_machine(bus, name, leader.pid, props=["1", "Slice", "s", nested])
    slice_dir = Path(cgroup2_mount()) / top / nested
    assert (slice_dir / scope_name(name)).is_dir()
    machined.kill9()
    leader.kill()
    leader.wait(5)
    machined.start()
    assert_machine_gone(bus, name)
    wait_for(lambda: not (Path(cgroup2_mount()) / top).exists(), 3,
             what="the empty scope and its slices to go")


def test_stop_settings_survive_restart(bus: BusDaemon, machined: Machined,
                                       procs: Processes) -> None:
    """KillSignal=, KillMode= and TimeoutStopUSec= of CreateMachine still apply to a machine
    reloaded after a restart: no PID 1 keeps them in cgroupfs mode, the scope's cgroup does."""
    leader = procs.sleeper()
    stray = procs.sleeper()  # another process in the scope: KillMode=mixed spares it SIGINT
    name = unique_name("stop")
    create_machine(bus, name, leader.pid, props=[
        "3", "KillSignal", "i", str(int(signal.SIGINT)), "KillMode", "s", "mixed",
        "TimeoutStopUSec", "t", "500000"])
    (scope_dir(name) / "cgroup.procs").write_text(str(stray.pid))
    machined.kill9()
    machined.start()  # the fixture's daemon stops scopes after 3 s by default
    wait_for(lambda: name in machine_names(bus), 5, what="the machine to be reloaded")
    started = time.monotonic()
    mcall(bus, "TerminateMachine", "s", name)
    assert leader.wait(5) == -signal.SIGINT
    assert stray.wait(5) == -signal.SIGKILL
    assert time.monotonic() - started < 2.5, "SIGKILL came after the daemon's timeout"
    wait_for(lambda: not scope_dir(name).exists(), 3, what="the scope to go")


def test_restart_removes_orphan_scope_in_another_slice(bus: BusDaemon,
                                                       machined: Machined) -> None:
    """A scope of ours that no state file names (the daemon was killed between making it and
    writing the file) is collected in whatever slice it is."""
    top = Path(cgroup2_mount()) / f"{unique_name('e2e')}.slice"
    orphan = top / scope_name(unique_name("orphan"))
    orphan.mkdir(parents=True)
    try:
        machined.kill9()
        machined.start()
        wait_for(lambda: not top.exists(), 3, what="the orphan scope and its slice to go")
    finally:
        for d in (orphan, top):
            with contextlib.suppress(OSError):
                d.rmdir()




def test_second_daemon_gives_up_the_name(bus: BusDaemon, machined: Machined,
                                         procs: Processes) -> None:
    """A daemon started while another owns org.freedesktop.machine1 says so and exits (252
    logs the same words, then lingers with its connection closed); the first serves on."""
    leader = procs.sleeper()
    name = unique_name("owned")
    path = create_machine(bus, name, leader.pid)
    with pytest.raises(RuntimeError, match="Failed to acquire org.freedesktop.machine1: "
                                           "Requested service name already owned."):
        Machined(bus, "--stop-timeout=3", "--scope-backend=cgroupfs")
    assert mcall_data(bus, "GetMachine", "s", name) == [path]
    assert state_file(name).exists()  # the second one's start-up left the machine alone


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_stop_in_progress_survives_restart(bus: BusDaemon, machined: Machined,
                                           procs: Processes, how: str) -> None:
    """A terminate whose SIGTERM is ignored still ends in SIGKILL at its deadline when the
    daemon is restarted meanwhile: in cgroupfs mode the daemon plays PID 1's part, and PID 1's
    stop job would not be forgotten."""
    leader = procs.spawn(["sh", "-c", "trap '' TERM; exec sleep 1000"])
    name = unique_name("stopping")
    create_machine(bus, name, leader.pid)
    wait_for(lambda: _ignores_sigterm(leader.pid), 5, what="the leader to ignore SIGTERM")
    mcall(bus, "TerminateMachine", "s", name)
    if how == "sigkill":
        machined.kill9()
    else:
        machined.stop()
    assert leader.poll() is None
    machined.start()  # the fixture's daemon gives a stop 3 s before SIGKILL
    assert leader.wait(10) == -signal.SIGKILL
    wait_for(lambda: name not in machine_names(bus), 5, what="the machine to go")
    wait_for(lambda: not scope_dir(name).exists(), 5, what="its scope to go")


def _ignores_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(ignored, 16) & (1 << (signal.SIGTERM - 1)))
