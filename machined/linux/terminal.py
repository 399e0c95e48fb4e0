"""Terminals in a machine: a PTY from the machine's own devpts, and a shell or login program
started on it inside all of the machine's namespaces and its cgroup (spec §8.5-8.7).

This needs nothing inside the machine but a /dev/ptmx, an /etc/passwd and the program: it
works in containers that run no systemd and no D-Bus."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import struct
import termios
from dataclasses import dataclass

from ..core.errors import ErrnoError, Failed
from . import namespaces as ns
from . import process

TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NO_USER = 3  # exit codes of the shell child: the user does not exist inside,
NO_PROGRAM = 4  # no program of the given paths exists inside
_TERMINAL = ("mnt", "user", "pid")


def open_ptmx() -> tuple[int, int]:
    """A new PTY master from the /dev/ptmx of our mount namespace, unlocked; (fd, number)."""
    fd = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TIOCSPTLCK, struct.pack("i", 0))
        (number,) = struct.unpack("I", fcntl.ioctl(fd, TIOCGPTN, b"\0" * 4))
    except BaseException:
        os.close(fd)
        raise
    return fd, number


def pty_path(number: int) -> str:
    return f"/dev/pts/{number}"


def host_pty() -> tuple[int, str]:
    fd, number = open_ptmx()
    return fd, pty_path(number)


async def container_pty(leader: int) -> tuple[int, str]:
    with ns.Target.open(leader, _TERMINAL, root=True) as target:
        def work(sock: socket.socket) -> None:
            target.enter()
            fd, number = open_ptmx()
            ns.send(sock, struct.pack("=I", number), [fd])

        result = await ns.run_child(work, target.fds)
    if result.code != 0 or len(result.fds) != 1:
        result.close_fds()
        raise ErrnoError(errno.EIO)
    (number,) = struct.unpack("=I", result.messages[0][:4])
    return result.fds[0], pty_path(number)


# ---------------------------------------------------------------------------- users
@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...]


def lookup_user(name: str, passwd: str = "/etc/passwd", group: str = "/etc/group") -> User | None:
    """The user from the files of the root we are in (a container's own, after chroot): we
    cannot load the container's NSS modules, its files are the common ground."""
    try:
        with open(passwd) as f:
            entries = [line.rstrip("\n").split(":") for line in f]
    except FileNotFoundError:
        entries = []
    found = None
    for e in entries:
        if len(e) >= 7 and (e[0] == name or (name.isdigit() and e[2] == name)):
            found = e
            break
    if found is None:
        if name in ("root", "0"):  # root exists even where /etc/passwd does not
            return User("root", 0, 0, "/root", "/bin/sh", ())
        return None
    groups = []
    try:
        with open(group) as f:
            for line in f:
                g = line.rstrip("\n").split(":")
                if len(g) >= 4 and found[0] in g[3].split(",") and g[2].isdigit():
                    groups.append(int(g[2]))
    except FileNotFoundError:
        pass
    return User(found[0], int(found[2]), int(found[3]), found[5] or "/", found[6] or "/bin/sh",
                tuple(groups))


# ---------------------------------------------------------------------------- programs
@dataclass(frozen=True)
class Program:
    user: str
    path: str
    argv: list[str]
    environment: list[str]  # NAME=value, added last
    alternatives: tuple[str, ...] = ()  # tried in turn when path does not exist inside


def _environment(user: User, extra: list[str]) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": user.home, "LOGNAME": user.name, "USER": user.name,
           "SHELL": user.shell, "TERM": "vt220"}
    for assignment in extra:
        key, _, value = assignment.partition("=")
        env[key] = value
    return env


def _refuse(code: int, program: Program, machine: str) -> None:
    """The errors of a child that found no such user (NO_USER) or program (NO_PROGRAM)."""
    if code == NO_USER:
        raise Failed(f"User '{program.user}' does not exist in machine '{machine}'.")
    if code == NO_PROGRAM:
        raise ErrnoError(errno.ENOENT, f"There is no {program.path} in machine {machine}.")


def check_host_program(program: Program) -> None:
    """On the host, what the shell child would refuse up front (see start_program)."""
    found = _find(program)
    if isinstance(found, int):
        _refuse(found, program, ".host")


def _fork_program(tty: int, user: User, path: str, program: Program) -> int:
    """Fork the program, as session leader with tty as its controlling terminal and stdio."""
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        os.setsid()
        fcntl.ioctl(tty, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(tty, fd)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # every fd the daemon may have had
        process.restore_fd_limit()
        os.setgroups(list(user.groups))
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, user.uid)
        try:
            os.chdir(user.home)
        except OSError:
            os.chdir("/")
        os.execve(path, program.argv, _environment(user, program.environment))
    except OSError as e:
        os.write(2, f"Failed to execute {path}: {e.strerror}\r\n".encode())
    finally:
        os._exit(127)


def _program_path(program: Program) -> str | None:
    return next((p for p in (program.path, *program.alternatives) if os.path.exists(p)), None)


def _find(program: Program) -> tuple[User, str] | int:
    """The user and the program's path in the root we are in, or the exit code of a child
    that refuses it (NO_USER, NO_PROGRAM; see _refuse)."""
    user = lookup_user(program.user)
    if user is None:
        return NO_USER
    path = _program_path(program)
    if path is None:
        return NO_PROGRAM
    return user, path


def _open_pty() -> tuple[int, int, int]:
    """A new PTY of the devpts we are in: (master, slave, number)."""
    master, number = open_ptmx()
    return master, os.open(pty_path(number), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC), number


async def open_terminal_in(leader: int, program: Program, machine: str) -> tuple[int, int, str]:
    """A PTY inside the container (master, slave, path inside), once it is known that the
    user and the program are there: for a program that the host's service manager starts on
    the slave (see run_in_container)."""
    with ns.Target.open(leader, _TERMINAL, root=True) as target:
        def work(sock: socket.socket) -> int:
            target.enter()
            found = _find(program)
            if isinstance(found, int):
                return found
            master, slave, number = _open_pty()
            ns.send(sock, struct.pack("=I", number), [master, slave])
            return 0

        pid, sock = ns.fork_child(work, target.fds)
        result = await ns.collect(pid, sock)
    if result.code == 0 and len(result.fds) == 2 and len(result.messages) == 1 \
            and len(result.messages[0]) == 4:
        (number,) = struct.unpack("=I", result.messages[0])
        return result.fds[0], result.fds[1], pty_path(number)
    result.close_fds()
    _refuse(result.code, program, machine)
    raise ErrnoError(result.errno or errno.EIO)


def run_in_container(leader: int, program: Program, cgroup_procs: list[str]) -> int:
    """In a process the host's service manager started with the container's PTY as its stdio
    (machined/enter.py): join the machine's cgroups, enter all its namespaces and its root, run
    the program on the PTY and wait for it; its exit code."""
    # systemd made the PTY our controlling terminal: let it go, for the program's session
    # (which the kernel signals with SIGHUP, ours to ignore)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        fcntl.ioctl(0, termios.TIOCNOTTY)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    target = ns.Target.open(leader, ns.ALL, root=True)
    bounding = ns.capability_bounding_set(leader)
    for procs in cgroup_procs:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    ns.limit_bounding_set(bounding)  # no capability the container's own processes lack
    target.enter()
    found = _find(program)
    if isinstance(found, int):
        return found
    _pid, status = os.waitpid(_fork_program(0, *found, program), 0)
    return os.waitstatus_to_exitcode(status) & 0xFF


async def start_program(leader: int | None, program: Program, cgroup_procs: list[str],
                        machine: str) -> tuple[int, str]:
    """Allocate a PTY inside the machine (leader None: the host) and run program on it as a
    session leader with the PTY as controlling terminal, in all the machine's namespaces and in
    the cgroups whose cgroup.procs files are given. Returns (master fd, pty path)."""
    target = ns.Target.open(leader, ns.ALL, root=True) if leader else None

    def work(sock: socket.socket) -> int:
        for procs in cgroup_procs:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        if target is not None:
            target.enter()
        found = _find(program)
        if isinstance(found, int):
            return found
        master, slave, number = _open_pty()
        # not in the pid namespace of the shell: the middle child goes, the shell stays
        pid = _fork_program(slave, *found, program)
        ns.send(sock, struct.pack("=I", number), [master])
        os.close(master)
        sock.close()
        # Hold the slave open until the program ends: when the last slave fd goes at the very
        # moment the program exits, the reader of the master may see EIO before the program's
        # last output (systemd resets the TTY after a container-shell@ unit, to the same effect)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        return 0

    try:
        pid, sock = ns.fork_child(work, target.fds if target is not None else ())
        messages, fds = await ns.receive(pid, sock)
    finally:
        if target is not None:
            target.close()
    if len(fds) == 1 and messages and len(messages[0]) == 4:
        ns.reap_later(pid)  # the middle child stays as long as the program
        (number,) = struct.unpack("=I", messages[0])
        return fds[0], pty_path(number)
    result = ns.ChildResult(await ns.reap(pid), messages, fds)
    result.close_fds()
    _refuse(result.code, program, machine)
    raise ErrnoError(result.errno or errno.EIO)

