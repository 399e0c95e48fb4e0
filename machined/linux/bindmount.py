"""Bind-mounting a host path into a running container (spec §8.8), with the new mount API:
the source tree is cloned into a detached mount in the daemon (open_tree), made read-only there
if asked (mount_setattr), and a child that entered the container's mount namespace attaches it
at the destination (move_mount). Visible in the container at once; unlike 252 this needs no
propagation directory prepared by nspawn."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import socket

from . import namespaces as ns

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def clone_tree(path: str, read_only: bool) -> int:
    """A detached copy of the mount tree at path (recursive bind), as an fd."""
    fd = _check(_libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, path.encode(),
                              _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE))
    if read_only:
        attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
        try:
            _check(_libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH | _AT_RECURSIVE,
                                 ctypes.byref(attr), ctypes.sizeof(attr)))
        except BaseException:
            os.close(fd)
            raise
    return fd


def attach(tree_fd: int, destination: str) -> None:
    _check(_libc.syscall(_SYS_MOVE_MOUNT, tree_fd, b"", _AT_FDCWD, destination.encode(),
                         _MOVE_MOUNT_F_EMPTY_PATH))


def _make_mount_point(destination: str, is_dir: bool) -> None:
    parent = os.path.dirname(destination)
    with contextlib.suppress(OSError):
        os.makedirs(parent, 0o755, exist_ok=True)
    try:
        if is_dir:
            os.mkdir(destination, 0o700)
        else:
            os.close(os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600))
    except OSError:
        pass


async def bind_mount(leader: int, source: str, destination: str, read_only: bool,
                     mkdir: bool) -> None:
    """Raises OSError with the errno of the failing step."""
    if ns.shares_namespace(leader, "mnt"):
        # Not into our own namespace; 252 says the same for every machine nspawn did not start
        # ("Target does not allow propagation of mount points").
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    real = os.path.realpath(source, strict=True)
    is_dir = os.path.isdir(real)
    tree = clone_tree(real, read_only)
    try:
        with ns.Target.open(leader, ("mnt",), root=True) as target:
            def work(sock: socket.socket) -> None:
                target.enter()  # chrooted: the destination resolves inside the container
                if mkdir:
                    _make_mount_point(destination, is_dir)
                attach(tree, destination)

            result = await ns.run_child(work, (*target.fds, tree))
    finally:
        os.close(tree)
    if result.code != 0:
        err = result.errno or errno.EIO
        raise OSError(err, os.strerror(err))
