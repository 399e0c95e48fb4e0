"""File system calls Python 3.11 lacks: statx birth time, statfs type, inode flags
(chattr), renameat2(RENAME_NOREPLACE), openat2(RESOLVE_IN_ROOT), block-device ioctls and the
mount table."""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import os
import re
import stat
import struct
import threading
from functools import cache
from typing import NamedTuple

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
RESOLVE_NO_MAGICLINKS = 0x02
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


_STATX_BASIC = 0x7FF
_STATX_ATTR_IMMUTABLE = 0x10
_STATX_ATTR_MOUNT_ROOT = 0x2000
_STATX_MNT_ID = 0x1000
# statx up to stx_mnt_id: mask, blksize, attributes, nlink, uid, gid, mode, ino, size,
# blocks, attributes_mask, (atime), btime, (ctime), mtime, rdev, dev, mnt_id
_STATX = struct.Struct("=IIQIIIH2xQQQQ16xqI4x16xqI4xIIIIQ")
_buffers = threading.local()


class Statx(NamedTuple):
    mode: int
    ino: int
    dev: int
    rdev: int
    size: int
    blocks: int
    mtime_usec: int
    btime_usec: int  # 0: not recorded
    immutable: bool | None  # None: the file system does not say
    mount_root: bool | None  # None: the kernel does not say
    mnt_id: int | None  # the mount it is on; None: the kernel does not say


def statx(path: str, follow: bool = True, dir_fd: int = AT_FDCWD) -> Statx:
    """One statx() call for what os.stat, the birth time and the immutable flag would take
    several calls for; `path` relative to `dir_fd` if that is given."""
    buf = getattr(_buffers, "statx", None)
    if buf is None:
        buf = _buffers.statx = ctypes.create_string_buffer(256)
    flags = 0 if follow else 0x100  # AT_SYMLINK_NOFOLLOW
    want = _STATX_BASIC | _STATX_BTIME | _STATX_MNT_ID
    if _libc().statx(dir_fd, os.fsencode(path), flags, want, buf) < 0:
        _check(-1, path)
    (mask, _blksize, attrs, _nlink, _uid, _gid, mode, ino, size, blocks, attrs_mask,
     bsec, bnsec, msec, mnsec, rdev_major, rdev_minor, dev_major,
     dev_minor, mnt_id) = _STATX.unpack_from(buf)
    btime = 0
    if mask & _STATX_BTIME and (bsec > 0 or bnsec):
        btime = bsec * 1_000_000 + bnsec // 1000
    immutable = bool(attrs & _STATX_ATTR_IMMUTABLE) if attrs_mask & _STATX_ATTR_IMMUTABLE \
        else None
    mount_root = bool(attrs & _STATX_ATTR_MOUNT_ROOT) if attrs_mask & _STATX_ATTR_MOUNT_ROOT \
        else None
    return Statx(mode, ino, os.makedev(dev_major, dev_minor), os.makedev(rdev_major, rdev_minor),
                 size, blocks, msec * 1_000_000 + mnsec // 1000, btime, immutable, mount_root,
                 mnt_id if mask & _STATX_MNT_ID else None)


def birth_time_usec(path: str, follow: bool = True) -> int:
    """statx() birth time in µs, 0 if the file system does not record it."""
    try:
        return statx(path, follow).btime_usec
    except OSError:
        return 0


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
    # 252's chattr: O_NOFOLLOW without O_DIRECTORY, so a symlink is ELOOP (not ENOTDIR)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
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


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2): path resolved below dirfd as `resolve` (RESOLVE_*) says."""
    how = struct.pack("QQQ", flags, 0, resolve)
    buf = ctypes.create_string_buffer(how, len(how))
    return _check(_libc().syscall(_SYS_OPENAT2, dirfd, os.fsencode(path), buf,
                                  ctypes.c_size_t(len(how))), path)


READ_FULL_MAX = 4 * 1024 * 1024 - 1  # systemd's READ_FULL_BYTES_MAX


def open_in_root(root: str, relpath: str, flags: int = os.O_RDONLY) -> int:
    """Open `relpath` below `root` with every symlink resolved as if `root` were "/"."""
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return openat2(rootfd, relpath.lstrip("/"), flags | os.O_CLOEXEC, RESOLVE_IN_ROOT)
    finally:
        os.close(rootfd)


class NotOpened(OSError):
    """The file is there but does not open for reading (or is not opened: see read_opened)."""


class ReadFailed(OSError):
    """The file opened (or would have: a directory) but could not be read. 252's reader of
    raw images tells these apart: a file that does not open is passed over, one that does not
    read fails the whole reading, and so does a path that does not resolve (other than a
    missing file)."""


def read_in_root(root: str, relpath: str) -> bytes:
    """The first READ_FULL_MAX bytes of the file `relpath` below `root`, resolved as
    open_in_root() resolves it, and read as read_opened() reads it (no device nodes: those an
    image brings are not opened at all; 252 mounts raw images "nodev", which gives EACCES)."""
    return read_opened(open_in_root(root, relpath, os.O_PATH), READ_FULL_MAX, devices=False)


def read_opened(where: int, limit: int, devices: bool) -> bytes:
    """The first `limit` bytes of the file that the O_PATH descriptor `where` (closed here)
    stands for, looked at before it is opened for reading, so that nothing can make the
    reader wait for good: a socket is NotOpened ENXIO (as open() gives), a FIFO EBADFD (it
    would block), a device node EACCES unless `devices`; a directory is ReadFailed EISDIR (as
    read() gives). Devices are read without blocking (a terminal with nothing to read is
    EAGAIN)."""
    try:
        mode = os.fstat(where).st_mode
        if stat.S_ISDIR(mode):
            raise ReadFailed(errno.EISDIR, os.strerror(errno.EISDIR))
        refused = (errno.ENXIO if stat.S_ISSOCK(mode) else
                   errno.EBADFD if stat.S_ISFIFO(mode) else
                   errno.EACCES if not devices and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode))
                   else 0)
        if refused:
            raise NotOpened(refused, os.strerror(refused))
        try:
            fd = os.open(f"/proc/self/fd/{where}",
                         os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as e:
            raise NotOpened(e.errno, e.strerror) from e
    finally:
        os.close(where)
    try:
        chunks, left = [], limit
        while left and (chunk := os.read(fd, min(left, 1 << 16))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ReadFailed(e.errno, e.strerror) from e
    finally:
        os.close(fd)


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


def _unescape_mount_path(raw: bytes) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), raw))


def mounts_below(path: str) -> list[str]:
    """The mount points strictly below `path` (a canonical path) in this mount namespace."""
    prefix = path.rstrip("/") + "/"
    with open("/proc/self/mountinfo", "rb") as f:
        points = [_unescape_mount_path(line.split()[4]) for line in f]
    return [p for p in points if p.startswith(prefix)]
