"""Reading /proc: a process's cgroup, parent and liveness."""

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from machined.core.errors import ErrnoError
from machined.linux import cgroups, process

HYBRID = (b"9:name=systemd:/machine.slice/x.scope\n8:pids:/\n4:memory:/a/b\n"
          b"0::/machine.slice/y.scope\n")


@pytest.mark.parametrize(("content", "expected"), [
    (b"0::/machine.slice/a.scope\n", "/machine.slice/a.scope"),  # unified host
    (b"0::/no/newline", "/no/newline"),
    (HYBRID, "/machine.slice/y.scope"),  # the cgroup2 line wins, wherever it is
    (b"1:name=systemd:/legacy.scope\n2:cpu:/\n", "/legacy.scope"),  # legacy host
    (b"0::/\n", "/"),
])
def test_pid_cgroup_parses(monkeypatch: pytest.MonkeyPatch, content: bytes,
                           expected: str) -> None:
    monkeypatch.setattr(cgroups, "read_proc", lambda pid, name: content)
    assert cgroups.pid_cgroup(1234) == expected


def test_pid_cgroup_without_a_usable_hierarchy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "read_proc", lambda pid, name: b"3:cpu:/\n10::/x\n")
    with pytest.raises(ErrnoError) as e:
        cgroups.pid_cgroup(1234)
    assert e.value.errno == errno.ENOMEDIUM


def test_pid_cgroup_of_a_gone_process() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(ErrnoError) as e:
        cgroups.pid_cgroup(p.pid)
    assert e.value.errno == errno.ESRCH


def test_pid_cgroup_matches_the_kernel() -> None:
    text = Path(f"/proc/{os.getpid()}/cgroup").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("0::"))
    assert cgroups.pid_cgroup(os.getpid()) == line[3:]


def test_read_proc_reads_files_longer_than_one_read() -> None:
    big = "x" * 50_000
    p = subprocess.Popen(["sleep", "30"], env={"BIG": big})
    try:
        deadline = time.monotonic() + 10
        expected = b""
        while not expected and time.monotonic() < deadline:  # until the exec has set it up
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                expected = f.read()
        assert len(expected) > 50_000
        assert process.read_proc(p.pid, "environ") == expected
    finally:
        p.kill()
        p.wait()


def test_parent_and_liveness() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert process.parent_pid(p.pid) == os.getpid()
        assert process.pid_exists(p.pid)
    finally:
        p.kill()
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # a zombie now, not reaped
    assert process.pid_exists(p.pid) is False  # a zombie does not count
    p.wait()
    assert process.parent_pid(p.pid) == 0
    assert process.pid_exists(p.pid) is False


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_started_after() -> None:
    before = monotonic_usec()
    child = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.05)
        # a process that ran at a time is never taken for a later one
        assert not process.started_after(child.pid, before)
        assert not process.started_after(child.pid, monotonic_usec())
        assert not process.started_after(os.getpid(), before)
        # one that started a second after a time did start after it
        assert process.started_after(child.pid, before - 1_000_000)
    finally:
        child.kill()
        child.wait()
    assert not process.started_after(child.pid, 0)  # gone: nothing to tell


def test_started_after_reads_the_start_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command may hold spaces and parentheses; the start time is field 22."""
    ticks = os.sysconf("SC_CLK_TCK")
    boot_lead = (time.clock_gettime_ns(time.CLOCK_BOOTTIME)
                 - time.clock_gettime_ns(time.CLOCK_MONOTONIC)) // 1000
    start = 100 * ticks + boot_lead * ticks // 1_000_000  # 100 s of CLOCK_MONOTONIC
    stat = (b"42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 "
            + str(start).encode() + b" 1000 100 18446744073709551615\n")
    monkeypatch.setattr(process, "read_proc", lambda pid, name: stat)
    assert process.started_after(42, 90_000_000)
    assert not process.started_after(42, 100_000_000)
    monkeypatch.setattr(process, "read_proc", lambda pid, name: b"42 (a) S 1\n")
    assert not process.started_after(42, 0)
