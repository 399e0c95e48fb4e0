"""btrfs: subvolume checks and flags through ioctls; snapshots, subvolume creation and quota
groups through btrfs-progs (`btrfs`), the tool every btrfs host has."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import struct
import subprocess
from dataclasses import dataclass

from ..core.images import UINT64_MAX
from .fs import is_btrfs

BTRFS_IOC_SUBVOL_GETFLAGS = 0x80089419
BTRFS_IOC_SUBVOL_SETFLAGS = 0x4008941A
BTRFS_IOC_SNAP_DESTROY = 0x5000940F
BTRFS_SUBVOL_RDONLY = 1 << 1
SUBVOLUME_INODE = 256


def is_subvolume(path: str, st: os.stat_result | None = None) -> bool:
    st = st or os.stat(path)
    return st.st_ino == SUBVOLUME_INODE and is_btrfs(path)


def _subvol_flags(fd: int) -> int:
    buf = array.array("Q", [0])
    fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_GETFLAGS, buf, True)
    return int(buf[0])


def subvolume_read_only(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return bool(_subvol_flags(fd) & BTRFS_SUBVOL_RDONLY)
    except OSError:
        return False
    finally:
        os.close(fd)


def set_subvolume_read_only_fd(fd: int, on: bool) -> None:
    flags = _subvol_flags(fd)
    new = flags | BTRFS_SUBVOL_RDONLY if on else flags & ~BTRFS_SUBVOL_RDONLY
    if new != flags:
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_SETFLAGS, array.array("Q", [new]))


def set_subvolume_read_only(path: str, on: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        set_subvolume_read_only_fd(fd, on)
    finally:
        os.close(fd)


def destroy_subvolume_at(dir_fd: int, name: str) -> None:
    """Delete the subvolume `name` in the directory `dir_fd`, contents and all, read-only or
    not; ENOTEMPTY while it holds nested subvolumes, ENOTTY/EINVAL if it is none."""
    args = bytearray(struct.pack("q4088s", 0, os.fsencode(name)))
    fcntl.ioctl(dir_fd, BTRFS_IOC_SNAP_DESTROY, args, True)


def _btrfs(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["btrfs", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP)) from None


# btrfs-progs ends its errors with strerror(): the errno back from its text, longest first
_ERRNO_OF_TEXT = sorted(((os.strerror(code), code) for code in errno.errorcode),
                        key=lambda pair: -len(pair[0]))


def _errno_of(stderr: str) -> int:
    for text, code in _ERRNO_OF_TEXT:
        if text in stderr:
            return code
    for code, words in ((errno.EEXIST, "exists"), (errno.ENOTEMPTY, "not empty")):
        if words in stderr:
            return code
    return errno.EIO


def _run(*args: str) -> None:
    out = _btrfs(*args)
    if out.returncode != 0:
        raise OSError(_errno_of(out.stderr), f"btrfs {' '.join(args)}: {out.stderr.strip()}")


def create_subvolume(path: str) -> None:
    _run("subvolume", "create", path)


def snapshot(source: str, dest: str, read_only: bool) -> None:
    """Snapshot a subvolume and, in place of the empty directories a snapshot leaves for them,
    its nested subvolumes; each read-only (as 252 makes them) once what is below it is in
    place."""
    _run("subvolume", "snapshot", source, dest)
    for dirpath, dirnames, _files in os.walk(source):
        for d in list(dirnames):
            sub = os.path.join(dirpath, d)
            st = os.lstat(sub)
            if st.st_ino == SUBVOLUME_INODE and is_btrfs(sub):
                dirnames.remove(d)  # the recursion takes care of what is inside
                target = os.path.join(dest, os.path.relpath(sub, source))
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(target)
                snapshot(sub, target, read_only)
    if read_only:
        set_subvolume_read_only(dest, True)


@dataclass(frozen=True)
class Quota:
    referenced: int = UINT64_MAX
    exclusive: int = UINT64_MAX
    referenced_max: int = UINT64_MAX
    exclusive_max: int = UINT64_MAX


def _number(text: str) -> int:
    return UINT64_MAX if text in ("none", "-") else int(text)


def quota(path: str) -> Quota:
    """The quota group of the subvolume at `path` (its subtree group 1/ID where one exists, as
    systemd sets them up, else its own 0/ID); all UINT64_MAX without quota."""
    out = _btrfs("qgroup", "show", "-ref", "--raw", path)
    if out.returncode != 0:
        return Quota()
    rows = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 5 and "/" in fields[0] and fields[0][0].isdigit():
            try:
                rows[fields[0]] = Quota(*(_number(f) for f in fields[1:5]))
            except ValueError:
                continue
    own = next((k for k in rows if k.startswith("0/")), None)
    if own is None:
        return Quota()
    subtree = "1/" + own[2:]
    return rows.get(subtree, rows[own])


def enable_quota(path: str) -> None:
    _run("quota", "enable", path)


def set_limit(path: str, size: int) -> None:
    _run("qgroup", "limit", "none" if size == UINT64_MAX else str(size), path)
