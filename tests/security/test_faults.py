"""Faults: the daemon killed with SIGKILL in the middle of registrations and of a clone, the bus
daemon going away, leaders dying while their machine is created or while the daemon stops.
Afterwards no machine is lost, no half-made image is visible, and no helper process or cgroup
is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.client import DEST, MANAGER, MANAGER_PATH, RawClient
from tests.helpers.daemon import STATE_DIR, Machined, cgroup2_mount, wait_for

from .conftest import (
    Sleepers,
    make_image,
    start_daemon,
    stop_daemon,
)

SLICE = Path(cgroup2_mount()) / "machine.slice" if os.geteuid() == 0 else Path("/nonexistent")


@pytest.fixture
def sleepers() -> Iterator[Sleepers]:
    s = Sleepers()
    yield s
    s.close()


@pytest.fixture
def daemon(bus: BusDaemon, images: Path, sleepers: Sleepers) -> Iterator[Machined]:
    d = start_daemon(bus, images)
    try:
        yield d
    finally:
        sleepers.close()  # leaders first: the daemon collects their machines and scopes
        try:
            if d.proc is not None and d.proc.poll() is None:
                wait_for(lambda: not list(SLICE.glob("machine-sec*.scope")), 10,
                         what="the test's scopes to go")
        finally:
            errors = stop_daemon(d)
    assert not errors, "machined logged unexpected errors:\n" + "\n".join(errors)


def busctl_call(bus: BusDaemon, member: str, sig: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["busctl", "--system", "call", DEST, MANAGER_PATH, MANAGER, member,
                             sig, *args], env=bus.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def machine_names(bus: BusDaemon) -> set[str]:
    c = RawClient(bus)
    try:
        answer = c.manager("ListMachines")
    finally:
        c.close()
    assert answer[0] == "ok", answer
    return {m[0] for m in answer[1][0]}


def test_sigkill_during_registrations(bus: BusDaemon, daemon: Machined,
                                      sleepers: Sleepers) -> None:
    leaders = {f"secreg{i}": sleepers.start_orphan() for i in range(40)}
    calls = {name: busctl_call(bus, "RegisterMachine", "sayssus", name, "0", "sec", "container",
                               str(pid), "")
             for name, pid in leaders.items()}
    wait_for(lambda: sum(p.poll() is not None for p in calls.values()) >= 10, 30,
             what="some registrations to be answered")
    daemon.kill9()
    for p in calls.values():
        p.communicate(timeout=30)
    confirmed = {name for name, p in calls.items() if p.returncode == 0}
    assert len(confirmed) >= 10
    daemon.start()
    present = {n for n in machine_names(bus) if n.startswith("secreg")}
    assert confirmed <= present, "a confirmed registration was lost"
    for name in present:
        assert (STATE_DIR / name).exists()
        assert f"LEADER={leaders[name]}\n" in (STATE_DIR / name).read_text()
    # Registrations cut short may have left a scope with the leader in it (made before the
    # state file was written): the restarted daemon removes it once it is empty.
    for name in set(leaders) - present:
        assert not (STATE_DIR / name).exists()
        os.kill(leaders[name], signal.SIGKILL)
    for name in set(leaders) - present:
        wait_for(lambda n=name: not (SLICE / f"machine-{n}.scope").exists(), 10,
                 what=f"the scope of the unregistered {name} to go")


UNFINISHED = ".#machined-clone-secbig2."  # where the clone copies (linux/imagefs.py)


def test_sigkill_during_a_clone(bus: BusDaemon, daemon: Machined, images: Path) -> None:
    pool = images / "var/lib/machines"
    big = make_image(images, "secbig")
    block = os.urandom(1 << 16)
    for i in range(4096):  # 256 MiB in many files: cp takes a while
        (big / f"f{i}").write_bytes(block)
    call = busctl_call(bus, "CloneImage", "ssb", "secbig", "secbig2", "false")
    try:
        wait_for(lambda: any(e.name.startswith(UNFINISHED) for e in pool.iterdir()), 30, 0.005,
                 what="the clone to start")
        daemon.kill9()
    finally:
        call.communicate(timeout=30)
    temps = [e for e in pool.iterdir() if e.name.startswith(".#")]
    # its cp dies with it (no helper left behind)
    wait_for(lambda: not subprocess.run(["pgrep", "-f", f"{pool}/{UNFINISHED}"],
                                        capture_output=True).stdout, 10,
             what="the clone's cp to die")
    assert temps, "the killed clone left no copy to test the clean-up with"
    daemon.start()
    # the next start removes what the killed clone had copied (no machinectl verb sees it)
    wait_for(lambda: not any(e.name.startswith(".#") for e in pool.iterdir()), 30,
             what="the unfinished copy to be removed")
    c = RawClient(bus)
    try:
        answer = c.manager("ListImages")
        assert answer[0] == "ok"
        listed = {i[0] for i in answer[1][0]}
        assert "secbig" in listed and "secbig2" not in listed
        assert not any(n.startswith(".#") for n in listed)
        for t in temps:
            assert c.manager("GetImage", "s", t.name)[1] == \
                "org.freedesktop.machine1.NoSuchImage"
        # nothing stale blocks the same clone again (its lock died with the daemon)
        assert c.manager("CloneImage", "ssb", "secbig", "secbig2", False) == ("ok", ())
        assert len(list((pool / "secbig2").iterdir())) == 4096 + 1  # the files and etc/
    finally:
        c.close()


def test_sigterm_during_a_clone(bus: BusDaemon, daemon: Machined, images: Path) -> None:
    """Stopping the daemon cuts a clone short: its cp is killed rather than waited for, the
    caller gets no reply (as when 252 exits), nothing is logged as unexpected, and what it had
    copied is removed by the next start (in the background: a start is not held up by it)."""
    pool = images / "var/lib/machines"
    big = make_image(images, "secbig")
    block = os.urandom(1 << 16)
    for i in range(4096):
        (big / f"f{i}").write_bytes(block)
    call = busctl_call(bus, "CloneImage", "ssb", "secbig", "secbig2", "false")
    try:
        wait_for(lambda: any(e.name.startswith(UNFINISHED) for e in pool.iterdir()), 30, 0.005,
                 what="the clone to start")
        assert daemon.stop() == 0
    finally:
        _out, err = call.communicate(timeout=30)
    assert "disconnected from message bus without replying" in err, err
    assert not (pool / "secbig2").exists()
    assert not subprocess.run(["pgrep", "-f", f"{pool}/{UNFINISHED}"], capture_output=True).stdout
    assert not daemon.unexpected_errors(), daemon.log
    daemon.start()
    wait_for(lambda: not any(e.name.startswith(".#") for e in pool.iterdir()), 30,
             what="the unfinished copy to be removed")


def test_sigterm_during_a_removal(bus: BusDaemon, daemon: Machined, images: Path) -> None:
    """Stopping the daemon stops a RemoveImage where it is, as 252's removal child dies with
    it: the rest of the image stays (visible, to be removed again), the caller gets no reply,
    and the stop does not wait for the whole tree. It used to: the removal's thread held the
    daemon's exit up, and a client call in between made systemd cancel the stop job."""
    pool = images / "var/lib/machines"
    big = make_image(images, "secrm")
    dirs = 300
    for i in range(dirs):
        (big / f"d{i}").mkdir()
        for j in range(200):
            (big / f"d{i}" / f"f{j}").touch()
    call = busctl_call(bus, "RemoveImage", "s", "secrm")
    try:
        wait_for(lambda: sum(1 for e in big.iterdir() if e.name.startswith("d")) < dirs, 30,
                 0.002, what="the removal to start")
        assert daemon.stop() == 0
    finally:
        _out, err = call.communicate(timeout=30)
    assert "disconnected from message bus without replying" in err, err
    assert any(big.iterdir()), "the removal ran to its end after the stop"
    assert not daemon.unexpected_errors(), daemon.log
    daemon.start()
    c = RawClient(bus)
    try:
        assert c.manager("RemoveImage", "s", "secrm") == ("ok", ())
    finally:
        c.close()
    assert not (pool / "secrm").exists()


def test_bus_daemon_going_away(images: Path) -> None:
    """The daemon cannot be reached any more: it exits with an error (the unit's Restart= or
    bus activation starts it again), quickly, and its machines survive in the state files."""
    bus = BusDaemon("open")
    sleepers = Sleepers()
    d = start_daemon(bus, images)
    try:
        leader = sleepers.start_orphan()
        c = RawClient(bus)
        assert c.manager("RegisterMachine", "sayssus", "secbus", b"", "", "container", leader,
                         "")[0] == "ok"
        c.close()
        bus.proc.kill()
        bus.proc.wait()
        assert d.proc is not None
        d.proc.wait(30)
        assert d.proc.returncode == 1
        assert "Lost the connection to the bus" in d.log
        assert f"LEADER={leader}\n" in (STATE_DIR / "secbus").read_text()
        # a new bus, a new daemon: the machine is back
        bus.stop()
        bus = BusDaemon("open")
        d = start_daemon(bus, images, clean=False)
        assert "secbus" in machine_names(bus)
    finally:
        sleepers.close()
        try:
            if d.proc is not None and d.proc.poll() is None:
                wait_for(lambda: not (SLICE / "machine-secbus.scope").exists(), 10,
                         what="the scope to go")
        finally:
            errors = stop_daemon(d)
            bus.stop()
    assert not [e for e in errors if "Lost the connection" not in e]


@pytest.mark.parametrize("how", ["zombie", "killed-at-once"])
def test_leader_dying_during_create(bus: BusDaemon, daemon: Machined, how: str) -> None:
    c = RawClient(bus)
    try:
        for i in range(10):
            name = f"secdie{i}"
            p = subprocess.Popen(["sleep", "600"])
            if how == "zombie":
                p.kill()
                wait_for(lambda p=p: Path(f"/proc/{p.pid}/stat").read_text().split(") ")[1][0]
                         == "Z", 5, what="a zombie")
            answer = c.manager("CreateMachine", "sayssusa(sv)", name, b"", "", "container",
                               p.pid, "", [])
            if how == "killed-at-once":
                p.kill()
            p.wait()
            # whatever the answer, the machine does not outlive its leader
            assert answer[0] in ("ok", "error"), answer
            wait_for(lambda n=name: n not in machine_names(bus), 10, what=f"{name} to go")
            wait_for(lambda n=name: not (SLICE / f"machine-{n}.scope").exists(), 10,
                     what="its scope to go")
            assert not (STATE_DIR / name).exists()
    finally:
        c.close()


def test_leaders_dying_while_the_daemon_stops(bus: BusDaemon, images: Path,
                                              sleepers: Sleepers) -> None:
    """Leaders that die while the daemon shuts down are collected by the next start, and the
    shutdown logs no traceback (it used to collect them after closing the bus)."""
    d = start_daemon(bus, images)
    c = RawClient(bus)
    for i in range(20):
        assert c.manager("RegisterMachine", "sayssus", f"secstop{i}", b"", "", "container",
                         sleepers.start_orphan(), "")[0] == "ok"
    c.close()
    sleepers.close()
    errors = stop_daemon(d)
    assert not errors, "\n".join(errors)
    d = start_daemon(bus, images)
    try:
        assert not {n for n in machine_names(bus) if n.startswith("secstop")}
        assert not list(STATE_DIR.glob("secstop*"))
        wait_for(lambda: not list(SLICE.glob("machine-secstop*.scope")), 10,
                 what="the dead machines' scopes to go")
    finally:
        errors = stop_daemon(d)
    assert not errors, "\n".join(errors)


def test_scope_of_a_registration_cut_short_goes_when_empty(bus: BusDaemon, images: Path,
                                                           sleepers: Sleepers) -> None:
    """What a SIGKILL between making the scope and writing the state file leaves: a scope with
    the leader in it and no state file. The next daemon removes the scope once it empties."""
    scope = SLICE / "machine-seccut.scope"
    scope.mkdir(parents=True)
    leader = sleepers.start_orphan()
    (scope / "cgroup.procs").write_text(str(leader))
    d = start_daemon(bus, images)
    try:
        assert "seccut" not in machine_names(bus)
        os.kill(leader, signal.SIGKILL)
        wait_for(lambda: not scope.exists(), 10, what="the orphaned scope to go")
    finally:
        errors = stop_daemon(d)
        if scope.exists():
            scope.rmdir()
    assert not errors, "\n".join(errors)


def copies_running() -> bool:
    """A copy child of any machined: named "(sd-copy)" like 252's."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "(sd-copy)":
                return True
        except OSError:
            continue
    return False


def test_sigkill_during_a_copy(bus: BusDaemon, daemon: Machined, busybox_tree: Path,
                               tmp_path: Path) -> None:
    """CopyToMachine of 512 MiB, the daemon killed mid-way: its copy child dies with it, the
    machine is back after the restart, and copies work again."""
    assert not Path("/big").exists() and not Path("/small").exists()
    tree = tmp_path / "tree"
    subprocess.run(["cp", "-a", str(busybox_tree), str(tree)], check=True)
    leader = subprocess.Popen(["chroot", str(tree), "/bin/sleep", "600"],
                              start_new_session=True)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        chunk = os.urandom(8 << 20)
        for _ in range(64):
            f.write(chunk)
    c = RawClient(bus)
    try:
        wait_for(lambda: os.readlink(f"/proc/{leader.pid}/root") == str(tree), 5, what="chroot")
        answer = c.manager("RegisterMachine", "sayssus", "seccopy", b"", "sec", "container",
                           leader.pid, str(tree))
        assert answer[0] == "ok", answer
        call = busctl_call(bus, "CopyToMachine", "sss", "seccopy", str(big), "/big")
        try:
            wait_for(lambda: (tree / "big").exists(), 30, 0.002, what="the copy to start")
            assert copies_running()
            daemon.kill9()
        finally:
            call.communicate(timeout=30)
        wait_for(lambda: not copies_running(), 10, what="the copy child to die with the daemon")
        assert (tree / "big").stat().st_size < big.stat().st_size  # cut short, as it should be

        daemon.start()
        assert "seccopy" in machine_names(bus)
        (tmp_path / "small").write_text("after the restart\n")
        c.close()
        c = RawClient(bus)
        assert c.manager("CopyToMachine", "sss", "seccopy", str(tmp_path / "small"),
                         "/small") == ("ok", ())
        assert (tree / "small").read_text() == "after the restart\n"
        assert not Path("/big").exists() and not Path("/small").exists()  # the host's root
    finally:
        c.close()
        leader.kill()
        leader.wait()


def test_terminate_at_the_fd_limit_fails_then_works(bus: BusDaemon, daemon: Machined,
                                                    sleepers: Sleepers) -> None:
    """A terminate that cannot list its scope's processes (no fd left: each machine holds a
    pidfd, so registrations can use up a lowered limit) fails, instead of answering success
    with nothing signalled, and works once an fd is free again."""
    c = RawClient(bus)
    names = ["secfd0", "secfd1"]
    for name in names:
        assert c.manager("RegisterMachine", "sayssus", name, b"", "sec", "container",
                         sleepers.start_orphan(), "")[0] == "ok"
    fds = f"/proc/{daemon.pid}/fd"
    wait_for(lambda: len(os.listdir(fds)) >= 17 + len(names), 5, what="the leaders' pidfds")
    soft = subprocess.run(["prlimit", f"--pid={daemon.pid}", "--nofile", "--raw",
                           "--noheadings", "--output=SOFT"], capture_output=True, text=True,
                          check=True).stdout.strip()
    used = {int(fd) for fd in os.listdir(fds)}
    lowest_free = min(set(range(len(used) + 1)) - used)
    subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={lowest_free}:"], check=True)
    try:
        assert c.manager("TerminateMachine", "s", names[0]) == (
            "error", "System.Error.EMFILE", "Too many open files")
        assert c.manager("KillMachine", "ssi", names[0], "all", 18) == (
            "error", "System.Error.EMFILE", "Too many open files")
        assert names[0] in machine_names(bus)
    finally:
        subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={soft}:"], check=True)
        c.close()
    c = RawClient(bus)
    try:
        assert c.manager("TerminateMachine", "s", names[0]) == ("ok", ())
        wait_for(lambda: names[0] not in machine_names(bus), 10, what="the machine to go")
    finally:
        c.close()
