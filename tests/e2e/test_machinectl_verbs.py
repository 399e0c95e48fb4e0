"""machinectl terminate / kill / poweroff / reboot against a running busybox container
(systemd-nspawn --register=yes, cgroupfs backend, --stop-timeout=3)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, wait_for

from .support import (
    Monitor,
    Nspawn,
    Processes,
    assert_machine_gone,
    machine_path,
    machine_prop,
    machinectl,
    method_calls,
    pid_alive,
    scope_dir,
    scope_name,
    unique_name,
)

LOOP = "while :; do sleep 0.2; done"
SIGRTMIN_4 = 38  # busybox sh knows no RTMIN+4 name, but traps the number


def start(bus: BusDaemon, procs: Processes, tree: Path, tmp_path: Path, tag: str,
          script: str) -> Nspawn:
    ct = Nspawn(bus, procs, tree, unique_name(tag), ["/bin/sh", "-c", script], tmp_path)
    ct.wait_registered()
    # the trap is set up once the loop's first sleep runs
    wait_for(lambda: any(Path(f"/proc/{ct.leader}/task/{ct.leader}/children").read_text().split()),
             5, what="the container's loop to start")
    return ct


def assert_gone_after_exit(bus: BusDaemon, monitor: Monitor, ct: Nspawn) -> None:
    monitor.wait_signal("MachineRemoved", lambda a: a[0] == ct.name, timeout=3)
    wait_for(lambda: not scope_dir(ct.name).exists(), 3, what="the scope cgroup to go")
    assert_machine_gone(bus, ct.name, scope_name(ct.name))
    assert not pid_alive(ct.leader)


@pytest.mark.usefixtures("need_nspawn")
def test_terminate_sigkills_after_stop_timeout(bus: BusDaemon, machined: Machined,
                                              monitor: Monitor, procs: Processes,
                                              busybox_tree: Path, tmp_path: Path) -> None:
    # busybox sh as PID 1 ignores SIGTERM: the daemon must SIGKILL after --stop-timeout=3.
    ct = start(bus, procs, busybox_tree, tmp_path, "term", LOOP)
    t0 = time.monotonic()
    machinectl(bus, "terminate", ct.name)
    assert method_calls(monitor, "TerminateMachine") == [[ct.name]]
    assert machine_prop(bus, ct.name, "State") == "closing"
    assert machinectl(bus, "show", "-p", "State", ct.name).stdout.strip() == "State=closing"
    time.sleep(1)
    assert pid_alive(ct.leader), "SIGTERM alone should not stop busybox sh as PID 1"
    assert ct.wait_exit(10) != 0
    elapsed = time.monotonic() - t0
    assert 2.5 <= elapsed < 8, elapsed
    assert "terminated by signal KILL" in ct.output, ct.output
    assert_gone_after_exit(bus, monitor, ct)
    assert "did not stop in time" in machined.log


@pytest.mark.usefixtures("need_nspawn")
def test_kill_sigkill_all(bus: BusDaemon, machined: Machined, monitor: Monitor,
                          procs: Processes, busybox_tree: Path, tmp_path: Path) -> None:
    ct = start(bus, procs, busybox_tree, tmp_path, "kill", LOOP)
    t0 = time.monotonic()
    machinectl(bus, "kill", "--signal=SIGKILL", ct.name)
    assert method_calls(monitor, "KillMachine") == [[ct.name, "all", 9]]
    assert ct.wait_exit(5) != 0
    assert time.monotonic() - t0 < 2
    assert "terminated by signal KILL" in ct.output, ct.output
    assert_gone_after_exit(bus, monitor, ct)


@pytest.mark.usefixtures("need_nspawn")
def test_kill_leader_only(bus: BusDaemon, machined: Machined, monitor: Monitor,
                          procs: Processes, busybox_tree: Path, tmp_path: Path) -> None:
    ct = start(bus, procs, busybox_tree, tmp_path, "kl",
               f'trap "echo leader-got-usr1; exit 7" USR1; {LOOP}')
    machinectl(bus, "kill", "--kill-whom=leader", "--signal=SIGUSR1", ct.name)
    assert method_calls(monitor, "KillMachine") == [[ct.name, "leader", 10]]
    assert ct.wait_exit(5) == 7, ct.output
    assert "leader-got-usr1" in ct.output
    assert_gone_after_exit(bus, monitor, ct)


@pytest.mark.usefixtures("need_nspawn")
def test_kill_whom_leader_versus_all(bus: BusDaemon, machined: Machined, monitor: Monitor,
                                     procs: Processes, busybox_tree: Path,
                                     tmp_path: Path) -> None:
    """SIGSTOP with --kill-whom=leader stops PID 1 only; the default (all) reaches a
    long-running child as well; SIGCONT to all resumes both."""
    ct = start(bus, procs, busybox_tree, tmp_path, "ks", f"sleep 1000 & {LOOP}")

    def children() -> list[int]:
        return [int(p) for p in
                Path(f"/proc/{ct.leader}/task/{ct.leader}/children").read_text().split()]

    def cmdline(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()

    def state(pid: int) -> str:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2]

    # the shell forks the child before it execs sleep
    wait_for(lambda: any(cmdline(p) == "sleep 1000" for p in children()), 5,
             what="the child to run sleep")
    (child,) = [p for p in children() if cmdline(p) == "sleep 1000"]
    machinectl(bus, "kill", "--kill-whom=leader", "--signal=SIGSTOP", ct.name)
    wait_for(lambda: state(ct.leader) == "T", 3, what="the leader to stop")
    time.sleep(0.2)
    assert state(child) == "S"
    machinectl(bus, "kill", "--signal=SIGSTOP", ct.name)
    wait_for(lambda: state(child) == "T", 3, what="the child to stop")
    machinectl(bus, "kill", "--signal=SIGCONT", ct.name)
    wait_for(lambda: state(ct.leader) != "T" and state(child) != "T", 3,
             what="both to continue")
    assert method_calls(monitor, "KillMachine") == [[ct.name, "leader", 19],
                                                    [ct.name, "all", 19],
                                                    [ct.name, "all", 18]]
    assert machine_prop(bus, ct.name, "State") == "running"
    assert ct.proc.poll() is None
    machinectl(bus, "kill", "--signal=SIGKILL", ct.name)
    ct.wait_exit(5)
    assert_gone_after_exit(bus, monitor, ct)
    assert not pid_alive(child)


@pytest.mark.usefixtures("need_nspawn")
def test_poweroff_sends_sigrtmin4_to_leader(bus: BusDaemon, machined: Machined,
                                            monitor: Monitor, procs: Processes,
                                            busybox_tree: Path, tmp_path: Path) -> None:
    ct = start(bus, procs, busybox_tree, tmp_path, "po",
               f'trap "echo got-rtmin4; exit 0" {SIGRTMIN_4}; {LOOP}')
    machinectl(bus, "poweroff", ct.name)
    assert method_calls(monitor, "KillMachine") == [[ct.name, "leader", SIGRTMIN_4]]
    assert ct.wait_exit(5) == 0, ct.output
    assert "got-rtmin4" in ct.output
    assert_gone_after_exit(bus, monitor, ct)


@pytest.mark.usefixtures("need_nspawn")
def test_reboot_sends_sigint_to_leader(bus: BusDaemon, machined: Machined, monitor: Monitor,
                                       procs: Processes, busybox_tree: Path,
                                       tmp_path: Path) -> None:
    ct = start(bus, procs, busybox_tree, tmp_path, "rb", f'trap "echo got-int; exit 3" INT; {LOOP}')
    machinectl(bus, "reboot", ct.name)
    assert method_calls(monitor, "KillMachine") == [[ct.name, "leader", 2]]
    assert ct.wait_exit(5) == 3, ct.output
    assert "got-int" in ct.output
    assert_gone_after_exit(bus, monitor, ct)
    assert monitor.signals("MachineRemoved").count([ct.name, machine_path(ct.name)]) == 1
