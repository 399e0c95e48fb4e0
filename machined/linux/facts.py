"""Facts read from a machine: its IP addresses (rtnetlink through pyroute2, inside its network
namespace), its os-release, its root directory, its user namespace maps (spec §8.1-8.3, §8.10)."""

from __future__ import annotations

import errno
import os
import socket
import struct

from pyroute2 import IPRoute

from ..core.errors import CHILD_DIED, ErrnoError, Failed
from . import namespaces as ns

IFA_F_DEPRECATED = 0x20
RT_SCOPE_HOST = 254
RT_SCOPE_NOWHERE = 255
_ADDR_LEN = {socket.AF_INET: 4, socket.AF_INET6: 16}
OS_RELEASE_MISSING = 2  # exit code of the os-release child when there is none
NO_OS_RELEASE = "Machine does not contain OS release information"


# ---------------------------------------------------------------------------- addresses
def local_addresses() -> list[tuple[int, bytes]]:
    """Addresses of the network namespace we are in, filtered and sorted like 252."""
    found: list[tuple[int, int, int, bytes]] = []
    with IPRoute() as ip:
        for msg in ip.get_addr():
            family = msg["family"]
            if family not in _ADDR_LEN:
                continue
            flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
            if flags & IFA_F_DEPRECATED or msg["scope"] in (RT_SCOPE_HOST, RT_SCOPE_NOWHERE):
                continue
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not addr:
                continue
            found.append((0 if family == socket.AF_INET else 1, msg["scope"], msg["index"],
                          socket.inet_pton(family, addr)))
    out: list[tuple[int, bytes]] = []
    for fam, _scope, _index, packed in sorted(set(found)):
        out.append((socket.AF_INET if fam == 0 else socket.AF_INET6, packed))
    return out


async def addresses(leader: int | None) -> list[tuple[int, bytes]]:
    """In a child (pyroute2 wants an event loop of its own) that entered only the leader's
    network namespace (none for the host), list the addresses there."""
    target = ns.Target.open(leader, ("net",), root=False) if leader else None

    def work(sock: socket.socket) -> None:
        if target is not None:
            target.enter()
        for family, packed in local_addresses():
            sock.send(struct.pack("=i", family) + packed)

    try:
        result = await ns.run_child(work)
    finally:
        if target is not None:
            target.close()
    if result.code != 0:
        raise Failed(CHILD_DIED)
    out = []
    for m in result.messages:
        (family,) = struct.unpack("=i", m[:4])
        if len(m) - 4 != _ADDR_LEN.get(family, -1):
            raise ErrnoError(errno.EIO)
        out.append((family, m[4:]))
    return out


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


async def container_os_release(leader: int) -> bytes:
    """Read /etc/os-release (or /usr/lib/os-release) chrooted into the container, so that its
    symlinks resolve inside it."""
    with ns.Target.open(leader, ("mnt",), root=True) as target:
        def work(sock: socket.socket) -> int:
            target.enter()
            for path in ("/etc/os-release", "/usr/lib/os-release"):
                try:
                    with open(path, "rb") as f:
                        while chunk := f.read(32768):
                            sock.send(chunk)
                    return 0
                except FileNotFoundError:
                    continue
            return OS_RELEASE_MISSING

        result = await ns.run_child(work)
    if result.code == OS_RELEASE_MISSING:
        raise Failed(NO_OS_RELEASE)
    if result.code != 0:
        raise Failed(CHILD_DIED)
    return b"".join(result.messages)


# ---------------------------------------------------------------------------- root directory
async def container_root_directory(leader: int) -> int:
    with ns.Target.open(leader, ("mnt",), root=True) as target:
        def work(sock: socket.socket) -> None:
            target.enter()
            fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            ns.send(sock, b"R", [fd])

        result = await ns.run_child(work)
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
        with open(f"/proc/{leader}/{kind}") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ErrnoError.from_oserror(e) from None
