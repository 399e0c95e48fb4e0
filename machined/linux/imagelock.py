"""Image locks shared with systemd-nspawn (spec §10.9): OFD locks on
/run/systemd/nspawn/locks/{inode-DEV:INO,block-MAJ:MIN,name-NAME} and on `.#NAME.lck` next to
the image. Contention is EBUSY."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator

LOCK_DIR = "/run/systemd/nspawn/locks"
F_OFD_SETLK = 37


def _disabled() -> bool:
    return os.environ.get("SYSTEMD_NSPAWN_LOCK", "1") in ("0", "no", "false", "off")


def _flock_struct(kind: int) -> bytes:
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)


def _lock_fd(fd: int, exclusive: bool) -> None:
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, _flock_struct(kind))
    except OSError as e:
        if e.errno == errno.EINVAL:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY)) from None
            return
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY)) from None
        raise


class LockFile:
    def __init__(self, path: str, exclusive: bool) -> None:
        self.path = path
        self.exclusive = exclusive
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                _lock_fd(fd, exclusive)
                if os.fstat(fd).st_nlink > 0:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # unlinked by its last holder meanwhile: take a fresh one
        self.fd = fd

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if not self.exclusive:
                _lock_fd(self.fd, True)  # unlink only if nobody else holds it
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = -1


def _lock_dir() -> None:
    os.makedirs(os.path.dirname(LOCK_DIR), 0o755, exist_ok=True)
    os.makedirs(LOCK_DIR, 0o700, exist_ok=True)


@contextlib.contextmanager
def path_lock(path: str, exclusive: bool) -> Iterator[None]:
    """The global and the local lock of an image path, as nspawn takes them."""
    if _disabled():
        yield
        return
    if os.path.realpath(path) == "/":
        if exclusive:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        yield
        return
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        global_name = f"block-{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    elif stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
        global_name = f"inode-{st.st_dev}:{st.st_ino}"
    else:
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
    locks: list[LockFile] = []
    try:
        if not path.startswith("/dev/"):
            parent, base = os.path.split(path.rstrip("/"))
            try:
                locks.append(LockFile(f"{parent}/.#{base}.lck", exclusive))
            except OSError as e:
                if exclusive or e.errno != errno.EROFS:
                    raise
        _lock_dir()
        locks.append(LockFile(f"{LOCK_DIR}/{global_name}", exclusive))
        yield
    finally:
        for lock in reversed(locks):
            lock.release()


@contextlib.contextmanager
def name_lock(name: str) -> Iterator[None]:
    """The exclusive lock on an image name (a clone's or rename's target)."""
    if name == ".host":
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
    if _disabled():
        yield
        return
    _lock_dir()
    lock = LockFile(f"{LOCK_DIR}/name-{name}", True)
    try:
        yield
    finally:
        lock.release()
