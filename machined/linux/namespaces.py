"""Entering a machine: namespace fds opened in the daemon, children forked into them, results
and file descriptors sent back over a socketpair (spec §8 "Entering the container").

Python 3.11 has no os.setns: setns, prctl and unlockpt-free PTY calls go through libc (ctypes).
A forked child never returns to the event loop: it runs one function and ends with os._exit().
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import gc
import os
import signal
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.eager import keep_task
from ..core.errors import ErrnoError

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = {"user": CLONE_NEWUSER, "mnt": CLONE_NEWNS, "pid": CLONE_NEWPID,
              "uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC, "net": CLONE_NEWNET,
              "cgroup": CLONE_NEWCGROUP}
ALL = tuple(NAMESPACES)

_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2
_PR_SET_NAME = 15
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]

# Exit codes of a child (besides 0): an errno was sent first, or a code the caller defines.
EXIT_ERRNO = 1
_MAX_MSG = 65536




def setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def ns_id(pid: int | str, ns: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{ns}")


def shares_namespace(pid: int, ns: str) -> bool:
    """True if pid is in the same namespace of this type as we are."""
    try:
        return ns_id(pid, ns) == ns_id("self", ns)
    except FileNotFoundError:
        return True  # the kernel has no such namespace type
    except OSError as e:
        raise ErrnoError.from_oserror(e) from None


@dataclass
class Target:
    """What a child needs to enter a machine, opened in the daemon before forking (so that the
    leader cannot be swapped for another process in between): a pidfd, the namespaces in which
    the leader differs from us, and its root directory."""

    leader: int
    pidfd: int
    flags: int
    enters_user: bool
    root_fd: int = -1
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, leader: int, namespaces: tuple[str, ...], root: bool) -> Target:
        if leader <= 0:
            raise ErrnoError(errno.EINVAL)
        try:
            pidfd = os.pidfd_open(leader)
        except OSError as e:
            raise ErrnoError.from_oserror(e) from None
        try:
            flags = 0
            for ns in namespaces:
                if not shares_namespace(leader, ns):
                    flags |= NAMESPACES[ns]
            root_fd = os.open(f"/proc/{leader}/root", os.O_PATH | os.O_DIRECTORY
                              | os.O_CLOEXEC) if root else -1
        except OSError as e:
            os.close(pidfd)
            raise ErrnoError.from_oserror(e) from None
        except BaseException:
            os.close(pidfd)
            raise
        return cls(leader, pidfd, flags, bool(flags & CLONE_NEWUSER), root_fd)

    @property
    def fds(self) -> tuple[int, ...]:
        """What a child needs to keep open for enter()."""
        return (self.pidfd, self.root_fd) if self.root_fd >= 0 else (self.pidfd,)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.pidfd)
            if self.root_fd >= 0:
                os.close(self.root_fd)

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- in the child
    def enter(self) -> None:
        """Join the namespaces (all at once through the pidfd), become root of the user
        namespace, chroot to the leader's root. Only in a forked child."""
        death_signal = ctypes.c_int(0)
        _libc.prctl(_PR_GET_PDEATHSIG, ctypes.addressof(death_signal), 0, 0, 0)
        if self.flags:
            setns(self.pidfd, self.flags)
        if self.enters_user:
            os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        if death_signal.value:
            # The kernel forgets the parent-death signal when credentials change, as they do
            # on entering a user namespace: set it again, or a child holding a shell open
            # outlives a killed daemon (and keeps its bus connection, bus name and all).
            _libc.prctl(_PR_SET_PDEATHSIG, death_signal.value, 0, 0, 0)
            if os.getppid() != _parent:  # the daemon died before that
                os._exit(127)
        if self.root_fd >= 0:
            os.fchdir(self.root_fd)
            os.chroot(".")
            os.chdir("/")
            os.close(self.root_fd)
            self.root_fd = -1
        os.close(self.pidfd)
        self._closed = True


# ---------------------------------------------------------------------------- children
_parent = 0  # in a child: the daemon's PID


def reset_child(die_with_parent: bool = True) -> None:
    """In a freshly forked child of the daemon: forget the event loop's signal wiring."""
    global _parent
    _parent = os.getppid()
    signal.set_wakeup_fd(-1)
    for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE,
                  signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signo, signal.SIG_DFL)
    if die_with_parent:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_PR_CAPBSET_DROP = 24


def capability_bounding_set(pid: int) -> int:
    """The CapBnd mask of pid."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                return int(line.split()[1], 16)
    raise ErrnoError(errno.ESRCH)


def limit_bounding_set(mask: int) -> None:
    """Drop from our capability bounding set what mask lacks (what a container's own processes
    may never have, its leader's set, is then never ours or our children's)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if not mask & (1 << cap) and _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def set_name(name: str) -> None:
    """The child's comm, as 252 names its workers ("(sd-copy)")."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(_PR_SET_NAME, ctypes.cast(buf, ctypes.c_void_p).value or 0, 0, 0, 0)


def send(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def send_errno(sock: socket.socket, err: int) -> None:
    with contextlib.suppress(OSError):
        sock.send(b"E" + struct.pack("=i", err))


def fork_child(work: Callable[[socket.socket], int | None], keep: Iterable[int] = (),
               die_with_parent: bool = True) -> tuple[int, socket.socket]:
    """Fork a child that runs work(sock) and exits with its return value (0 if None); an
    OSError in it is sent as an errno message and gives EXIT_ERRNO. The child has only its
    stdio, its end of the socket and the fds in keep. Returns (pid, our end)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 127
        try:
            # Nothing of the daemon's may be finalized here: its fds are closed below and their
            # numbers used again, so a socket object collected now would close one of ours.
            gc.disable()
            reset_child(die_with_parent)
            # Not the daemon's fds: a child that outlives the daemon (its shell's, say) would
            # keep the bus connection, and the bus name with it, and the userdb socket.
            _close_fds_except(0, 1, 2, theirs.fileno(), *keep)
            result = work(theirs)
            code = 0 if result is None else result
        except OSError as e:
            send_errno(theirs, e.errno or errno.EIO)
            code = EXIT_ERRNO
        except ErrnoError as e:
            send_errno(theirs, e.errno)
            code = EXIT_ERRNO
        except BaseException:  # noqa: BLE001 - a child must not unwind into the daemon's code
            code = 127
        finally:
            os._exit(code)
    theirs.close()
    return pid, ours


def _close_fds_except(*keep: int) -> None:
    start = 0
    for fd in sorted(set(k for k in keep if k >= 0)):
        if start < fd:  # os.closerange(0, 0) would be close_range(0, ~0): every fd
            os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, os.sysconf("SC_OPEN_MAX"))  # close_range(2): one system call


@dataclass
class ChildResult:
    status: int  # a wait status
    messages: list[bytes]
    fds: list[int]

    @property
    def exited(self) -> bool:
        return os.WIFEXITED(self.status)

    @property
    def code(self) -> int:
        return os.WEXITSTATUS(self.status) if self.exited else -1

    @property
    def errno(self) -> int | None:
        """The errno the child sent, if it sent one."""
        for m in self.messages:
            if len(m) == 5 and m[:1] == b"E":
                return int(struct.unpack("=i", m[1:])[0])
        return None

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


async def receive(pid: int, sock: socket.socket) -> tuple[list[bytes], list[int]]:
    """Read everything child pid sends until it closes its end, without blocking the event
    loop. If we are cancelled, the child is killed and reaped."""
    loop = asyncio.get_running_loop()
    messages: list[bytes] = []
    fds: list[int] = []
    sock.setblocking(False)
    try:
        while True:
            try:
                msg, anc, _flags, _addr = sock.recvmsg(_MAX_MSG, socket.CMSG_SPACE(4 * 16))
            except BlockingIOError:
                await _readable(loop, sock.fileno())
                continue
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
            if not msg and not anc:
                return messages, fds
            messages.append(msg)
    except BaseException:
        kill_and_reap(pid)
        for fd in fds:
            os.close(fd)
        raise
    finally:
        sock.close()


async def collect(pid: int, sock: socket.socket) -> ChildResult:
    """Everything the child sends, then its exit status. If we are cancelled, the child is
    killed and reaped."""
    messages, fds = await receive(pid, sock)
    try:
        status = await reap(pid)
    except BaseException:
        kill_and_reap(pid)
        for fd in fds:
            os.close(fd)
        raise
    return ChildResult(status, messages, fds)


_reapers: set[asyncio.Task[Any]] = set()


def reap_later(pid: int) -> None:
    """Reap child pid whenever it exits (a child that outlives the call it served)."""
    keep_task(reap(pid), _reapers)


async def reap(pid: int) -> int:
    """Wait for our child pid to exit (through a pidfd, so no SIGCHLD handler is needed)."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = -1
    try:
        while True:
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid:
                return status
            if pidfd < 0:  # cannot happen for our own unreaped child; be safe anyway
                await asyncio.sleep(0.01)
            else:
                await _readable(loop, pidfd)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def kill_and_reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    fut = loop.create_future()
    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def run_child(work: Callable[[socket.socket], int | None],
                    keep: Iterable[int] = ()) -> ChildResult:
    pid, sock = fork_child(work, keep)
    return await collect(pid, sock)

