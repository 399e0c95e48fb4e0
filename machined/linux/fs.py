"""File system calls Python 3.11 lacks: statx birth time, statfs type, inode flags
(chattr), renameat2(RENAME_NOREPLACE), openat2(RESOLVE_IN_ROOT) and block-device ioctls."""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import os
import struct
from functools import cache

BTRFS_SUPER_MAGIC = 0x9123683E
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
FS_NOCOW_FL = 0x00800000
BLKROGET = 0x125E
BLKROSET = 0x125D
BLKGETSIZE64 = 0x80081272
RENAME_NOREPLACE = 1
AT_FDCWD = -100
_STATX_BTIME = 0x800
_SYS_OPENAT2 = 437
RESOLVE_IN_ROOT = 0x10


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, path: str = "") -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path or None)
    return ret


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def fs_type(path: str) -> int:
    buf = _Statfs()
    _check(_libc().statfs(os.fsencode(path), ctypes.byref(buf)), path)
    return int(buf.f_type) & 0xFFFFFFFF


def is_btrfs(path: str) -> bool:
    try:
        return fs_type(path) == BTRFS_SUPER_MAGIC
    except OSError:
        return False


def birth_time_usec(path: str, follow: bool = True) -> int:
    """statx() birth time in µs, 0 if the file system does not record it."""
    buf = ctypes.create_string_buffer(256)
    flags = 0 if follow else 0x100  # AT_SYMLINK_NOFOLLOW
    try:
        _check(_libc().statx(AT_FDCWD, os.fsencode(path), flags, _STATX_BTIME, buf), path)
    except (OSError, AttributeError):
        return 0
    mask = struct.unpack_from("I", buf, 0)[0]
    if not mask & _STATX_BTIME:
        return 0
    sec, nsec = struct.unpack_from("qI", buf, 0x50)  # stx_btime
    return 0 if sec <= 0 and nsec == 0 else sec * 1_000_000 + nsec // 1000


def get_inode_flags(fd: int) -> int:
    buf = array.array("l", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return int(buf[0])


def set_inode_flag(fd: int, flag: int, on: bool) -> None:
    flags = get_inode_flags(fd)
    new = flags | flag if on else flags & ~flag
    if new != flags:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("l", [new]))


def is_immutable(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return bool(get_inode_flags(fd) & FS_IMMUTABLE_FL)
    except OSError:
        return False
    finally:
        os.close(fd)


def set_immutable(path: str, on: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        set_inode_flag(fd, FS_IMMUTABLE_FL, on)
    finally:
        os.close(fd)


def rename_noreplace(old: str, new: str) -> None:
    """renameat2(RENAME_NOREPLACE); EEXIST if the target exists."""
    lib = _libc()
    ret = lib.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new),
                        RENAME_NOREPLACE)
    if ret < 0 and ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS):
        # A file system without RENAME_NOREPLACE: link + unlink keeps "never replace".
        os.link(old, new)
        os.unlink(old)
        return
    _check(ret, new)


def open_in_root(root: str, relpath: str) -> int:
    """Open `relpath` below `root` with every symlink resolved as if `root` were "/"."""
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = struct.pack("QQQ", os.O_RDONLY | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT)
        buf = ctypes.create_string_buffer(how, len(how))
        fd = _libc().syscall(_SYS_OPENAT2, rootfd, os.fsencode(relpath.lstrip("/")), buf,
                             ctypes.c_size_t(len(how)))
        return _check(fd, relpath)
    finally:
        os.close(rootfd)


def read_in_root(root: str, relpath: str, limit: int = 1 << 20) -> str:
    fd = open_in_root(root, relpath)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def block_size(fd: int) -> int:
    buf = array.array("Q", [0])
    fcntl.ioctl(fd, BLKGETSIZE64, buf, True)
    return int(buf[0])


def block_read_only(fd: int) -> bool:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, BLKROGET, buf, True)
    return bool(buf[0])


def block_set_read_only(fd: int, on: bool) -> None:
    fcntl.ioctl(fd, BLKROSET, array.array("i", [1 if on else 0]))


def mount_read_only(path: str) -> bool:
    """faccessat(W_OK) failing with EROFS: the image sits on a read-only mount."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
