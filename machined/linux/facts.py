"""Facts read from a machine: its IP addresses (rtnetlink through pyroute2, inside its network
namespace), its os-release, its root directory, its user namespace maps (spec §8.1-8.3, §8.10)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

from ..core.errors import CHILD_DIED, ErrnoError, Failed
from . import namespaces as ns
from .fs import READ_FULL_MAX, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2, read_opened
from .process import read_proc

IFA_F_DEPRECATED = 0x20
RT_SCOPE_HOST = 254
RT_SCOPE_NOWHERE = 255
_ADDR_LEN = {socket.AF_INET: 4, socket.AF_INET6: 16}
NO_OS_RELEASE = "Machine does not contain OS release information"


# ---------------------------------------------------------------------------- addresses
_RTM_GETADDR = 22
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST_DUMP = 0x301


def _netlink_socket(target: ns.Target | None) -> socket.socket:
    """An rtnetlink socket of the target's network namespace (ours if None). A socket stays in
    the namespace it was made in: a short-lived thread enters the namespace (setns of a
    network namespace affects only the calling thread), makes it and ends."""
    def make() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)

    if target is None or not target.flags:
        return make()
    made: list[socket.socket] = []
    failed: list[OSError] = []

    def run() -> None:
        try:
            ns.setns(target.pidfd, target.flags)
            made.append(make())
        except OSError as e:
            failed.append(e)

    thread = threading.Thread(target=run, name="netns")
    thread.start()
    thread.join()
    if failed:
        raise ErrnoError.from_oserror(failed[0])
    return made[0]


def _dump_addresses(sock: socket.socket) -> list[tuple[int, bytes]]:
    """RTM_GETADDR dump (AF_UNSPEC), decoded by pyroute2, filtered and sorted like 252."""
    # Imported on first use: pyroute2 loads some 160 modules (about 12 MiB) that a daemon
    # nobody asks for addresses never needs.
    from pyroute2.netlink.rtnl.marshal import MarshalRtnl

    sock.bind((0, 0))
    sock.send(struct.pack("=IHHII", 24, _RTM_GETADDR, _NLM_F_REQUEST_DUMP, 1, 0)
              + struct.pack("=BBBBI", 0, 0, 0, 0, 0))
    marshal = MarshalRtnl()
    found: set[tuple[int, int, int, bytes]] = set()
    while True:
        for msg in marshal.parse(sock.recv(1 << 16)):
            kind = msg["header"]["type"]
            if kind == _NLMSG_DONE:
                return [(int(socket.AF_INET if fam == 0 else socket.AF_INET6), packed)
                        for fam, _scope, _index, packed in sorted(found)]
            if kind == _NLMSG_ERROR:
                raise ErrnoError(errno.EIO)
            family = msg["family"]
            if family not in _ADDR_LEN:
                continue
            flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
            if flags & IFA_F_DEPRECATED or msg["scope"] in (RT_SCOPE_HOST, RT_SCOPE_NOWHERE):
                continue
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if addr:
                found.add((0 if family == socket.AF_INET else 1, msg["scope"], msg["index"],
                           socket.inet_pton(family, addr)))


def addresses(leader: int | None) -> list[tuple[int, bytes]]:
    """The addresses of the leader's network namespace (the host's for None)."""
    target = ns.Target.open(leader, ("net",), root=False) if leader else None
    try:
        with _netlink_socket(target) as sock:
            return _dump_addresses(sock)
    except OSError as e:
        raise ErrnoError.from_oserror(e) from None
    finally:
        if target is not None:
            target.close()


# ---------------------------------------------------------------------------- os-release
def host_os_release() -> bytes:
    override = os.environ.get("SYSTEMD_OS_RELEASE")
    paths = [override] if override else ["/etc/os-release", "/usr/lib/os-release"]
    for path in paths:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ErrnoError.from_oserror(e) from None
    raise ErrnoError(errno.ENOENT)


def container_os_release(leader: int) -> bytes:
    """/etc/os-release (or /usr/lib/os-release) of the container, resolved with the
    container's root as "/" (openat2 RESOLVE_IN_ROOT: its absolute symlinks and ".." stay
    inside; magic links refused), through its own mounts."""
    try:
        root = os.open(f"/proc/{leader}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        raise Failed(CHILD_DIED) from None
    try:
        for path in ("etc/os-release", "usr/lib/os-release"):
            try:
                where = openat2(root, path, os.O_PATH | os.O_CLOEXEC,
                                RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
            except FileNotFoundError:
                continue
            except OSError:
                raise Failed(CHILD_DIED) from None
            try:  # the container may offer /dev/zero, which 252 reads too
                data = read_opened(where, READ_FULL_MAX + 1, devices=True)
            except OSError:  # a directory, say: what 252's reading child dies of (a FIFO or a
                raise Failed(CHILD_DIED) from None  # terminal would hang 252: not us)
            if len(data) > READ_FULL_MAX:
                raise ErrnoError(errno.E2BIG)  # 252's read_full_stream() limit
            return data
        raise Failed(NO_OS_RELEASE)
    finally:
        os.close(root)


# ---------------------------------------------------------------------------- root directory
async def container_root_directory(leader: int) -> int:
    with ns.Target.open(leader, ("mnt",), root=True) as target:
        def work(sock: socket.socket) -> None:
            target.enter()
            fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            ns.send(sock, b"R", [fd])

        result = await ns.run_child(work, target.fds)
    if result.code != 0 or len(result.fds) != 1:
        result.close_fds()
        raise Failed(CHILD_DIED)
    return result.fds[0]


def host_root_directory() -> int:
    return os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


# ---------------------------------------------------------------------------- id maps
def read_id_map(leader: int, kind: str) -> str | None:
    """/proc/LEADER/uid_map or gid_map; None if the kernel has none."""
    try:
        return read_proc(leader, kind).decode()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ErrnoError.from_oserror(e) from None
