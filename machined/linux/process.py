"""Processes: pidfd watches (a leader's exit is seen at once) and signals through pidfds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)


def pid_exists(pid: int) -> bool:
    """True if pid runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def parent_pid(pid: int) -> int:
    """The parent of pid, or 0 if pid is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


class PidfdWatcher:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._fds: dict[int, int] = {}

    def watch(self, pid: int, on_exit: Callable[[], None]) -> bool:
        if pid in self._fds:
            self.unwatch(pid)
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False

        def readable() -> None:
            self._loop.remove_reader(fd)
            try:
                on_exit()
            except Exception:
                log.exception("Exit handler of PID %d failed", pid)

        self._fds[pid] = fd
        self._loop.add_reader(fd, readable)
        return True

    def unwatch(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)

    def alive(self, pid: int) -> bool:
        fd = self._fds.get(pid)
        if fd is None:
            return pid_exists(pid)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return not poller.poll(0)

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


def dies_with_daemon(argv: list[str]) -> list[str]:
    """argv run so that it gets SIGKILL when the daemon's thread that started it dies: a
    daemon killed with SIGKILL in the middle of a clone leaves no cp behind (systemd's unit
    would kill the whole cgroup, but the daemon also runs without it)."""
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv]

