"""Processes: pidfd watches (a leader's exit is seen at once) and signals through pidfds."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


_PROC_READ_SIZE = 16384

# The soft RLIMIT_NOFILE the daemon was started with, once raise_fd_limit() has lifted it.
_nofile_soft_at_start: int | None = None


def raise_fd_limit() -> None:
    """One pidfd per leader: lift the soft RLIMIT_NOFILE (often 1024) to the hard limit."""
    global _nofile_soft_at_start
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        _nofile_soft_at_start = soft


def restore_fd_limit() -> None:
    """In a child about to run a program: the soft limit the daemon was started with, as systemd
    gives its services a soft limit of 1024 whatever its own (programs using select() need it)."""
    if _nofile_soft_at_start is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (_nofile_soft_at_start, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def read_proc(pid: int, name: str) -> bytes:
    """/proc/PID/NAME in one read where it fits: open() and read() of a file object read a
    second time to see the end, and each read of these files makes the kernel generate all of
    it again. This runs for every registration and lookup by PID."""
    fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, _PROC_READ_SIZE)
        if len(data) < _PROC_READ_SIZE:
            return data
        chunks = [data]
        while chunk := os.read(fd, _PROC_READ_SIZE):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _stat_after_command(pid: int) -> bytes | None:
    """/proc/PID/stat from field 3 (the state) on, past the command, which may hold spaces and
    parentheses; None if pid is gone."""
    try:
        stat = read_proc(pid, "stat")
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :]


def pid_exists(pid: int) -> bool:
    """True if pid runs and is not a zombie."""
    fields = _stat_after_command(pid)
    return fields is not None and fields[:1] not in (b"Z", b"X")


_TICK_USEC = 1_000_000 // os.sysconf("SC_CLK_TCK")


def started_after(pid: int, monotonic_usec: int) -> bool:
    """True if pid is, for sure, a process that started after that time of CLOCK_MONOTONIC
    (µs), so not one that was running then.

    /proc gives the start in clock ticks of CLOCK_BOOTTIME, which is ahead of CLOCK_MONOTONIC by
    the time spent suspended. The time is moved onto CLOCK_BOOTTIME with today's lead, the
    largest it has been, so a process that did run then is never taken for a later one (one
    that started after a suspend that came after that time may be missed); one tick more is
    allowed for the readings."""
    ticks = start_ticks(pid)
    if ticks is None:
        return False
    lead = (time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            - time.clock_gettime_ns(time.CLOCK_MONOTONIC)) // 1000
    return ticks * _TICK_USEC > monotonic_usec + lead + _TICK_USEC


def start_ticks(pid: int) -> int | None:
    """When pid started (clock ticks since boot, field 22 of /proc/PID/stat); None if it is
    gone. With the PID, it names one process for good."""
    fields = _stat_after_command(pid)
    try:
        return None if fields is None else int(fields.split()[19])
    except (IndexError, ValueError):
        return None


def parent_pid(pid: int) -> int:
    """The parent of pid, or 0 if pid is gone."""
    fields = _stat_after_command(pid)
    return 0 if fields is None else int(fields.split()[1])


class PidfdWatcher:
    """Leaders' pidfds in an epoll set of our own, which the event loop watches as one fd:
    watching a leader is then two system calls, not an asyncio reader registration each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._fds: dict[int, int] = {}  # pid -> pidfd
        self._on_exit: dict[int, tuple[int, Callable[[], None]]] = {}  # pidfd -> (pid, handler)
        loop.add_reader(self._epoll.fileno(), self._exited)

    def watch(self, pid: int, on_exit: Callable[[], None]) -> bool:
        if pid in self._fds:
            self.unwatch(pid)
        try:
            fd = os.pidfd_open(pid)
        except OSError as e:
            if e.errno != errno.ESRCH:  # alive, but its exit is seen through its unit only
                log.warning("Cannot watch PID %d: %s", pid, e.strerror)
            return False
        self._fds[pid] = fd
        self._on_exit[fd] = (pid, on_exit)
        self._epoll.register(fd, select.EPOLLIN)
        return True

    def _exited(self) -> None:
        for fd, _events in self._epoll.poll(0):
            entry = self._on_exit.pop(fd, None)
            if entry is None:
                continue
            self._epoll.unregister(fd)  # once is enough; the pidfd stays open until unwatch
            pid, on_exit = entry
            try:
                on_exit()
            except Exception:
                log.exception("Exit handler of PID %d failed", pid)

    def unwatch(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is not None:
            self._on_exit.pop(fd, None)
            os.close(fd)  # which also takes it out of the epoll set

    def alive(self, pid: int) -> bool:
        fd = self._fds.get(pid)
        if fd is None:
            return pid_exists(pid)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return not poller.poll(0)

    def started_after(self, pid: int, monotonic_usec: int) -> bool:
        return started_after(pid, monotonic_usec)

    def signal(self, pid: int, signo: int) -> None:
        fd = self._fds.get(pid)
        if fd is not None:
            signal.pidfd_send_signal(fd, signo)
        else:
            os.kill(pid, signo)

    def close(self) -> None:
        for pid in list(self._fds):
            with contextlib.suppress(Exception):
                self.unwatch(pid)
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()


class WorkerChildren:
    """Programs the worker threads run (cp for clones): shutdown kills them rather than wait
    for them, so the threads end at once, and starts no more."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[str]] = set()
        self._stopping = False

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        with self._lock:
            if self._stopping:
                raise OSError(errno.ECANCELED, os.strerror(errno.ECANCELED))
            proc = subprocess.Popen(dies_with_daemon(argv), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            self._running.add(proc)
        try:
            out, err = proc.communicate()
        finally:
            with self._lock:
                self._running.discard(proc)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def kill_all(self) -> None:
        with self._lock:
            self._stopping = True
            for proc in self._running:
                with contextlib.suppress(OSError):
                    proc.kill()


WORKER_CHILDREN = WorkerChildren()


def dies_with_daemon(argv: list[str]) -> list[str]:
    """argv run so that it gets SIGKILL when the daemon's thread that started it dies: a
    daemon killed with SIGKILL in the middle of a clone leaves no cp behind (systemd's unit
    would kill the whole cgroup, but the daemon also runs without it)."""
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv]

