"""Deleting a directory tree as 252's rm_rf does: it goes on past failures and reports the
first, it destroys the btrfs subvolumes it meets (read-only ones too), it never crosses into
another file system. Everything is fd-relative with one directory open at a time, going back
up through "..", so neither the depth of a tree nor the fd limit stops it; stop() does, at
the next entry (the daemon is going: 252's removal child dies with it too)."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import btrfs
from . import fs as lfs

_stopping = threading.Event()


def stop() -> None:
    """Removals in progress end at their next entry with ECANCELED, and new ones at once."""
    _stopping.set()


def _check_stop() -> None:
    if _stopping.is_set():
        raise _err(errno.ECANCELED)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _err(code: int, path: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), path)


@dataclass
class _Level:
    """A directory being emptied: its name in its parent, its (st_dev, st_ino) to check
    the way back up by, and the subdirectories in it still to visit."""

    name: str
    ident: tuple[int, int]
    todo: list[str] = field(default_factory=list)
    subvolume: bool = False  # destroyed once done, not rmdir'ed
    # False inside a subvolume being destroyed: only its nested subvolumes need deleting one
    # by one, the destroy takes everything else at once
    files: bool = True


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class _Removal:
    def __init__(self, on_btrfs: bool) -> None:
        self.on_btrfs = on_btrfs
        self.error: OSError | None = None

    def note(self, e: OSError) -> None:
        if self.error is None and e.errno != errno.ENOENT:  # gone already is fine
            self.error = e

    def attempt(self, func: Callable[..., object], *args: Any, **kw: Any) -> None:
        try:
            func(*args, **kw)
        except OSError as e:
            self.note(e)

    def list(self, fd: int, level: _Level) -> None:
        """Delete what is no directory in `fd` (unless only subvolumes matter here), keep the
        directories for later."""
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    _check_stop()
                    if entry.is_dir(follow_symlinks=False):
                        level.todo.append(entry.name)
                    elif level.files:
                        self.attempt(os.unlink, entry.name, dir_fd=fd)
        except OSError as e:
            if e.errno == errno.ECANCELED and _stopping.is_set():
                raise
            self.note(e)

    def enter(self, fd: int, level: _Level, name: str,
              top: bool = False) -> tuple[int, _Level] | None:
        """Deal with `name` in `fd`: delete it if it is no directory or a subvolume that goes
        at once; else open it, list it and give it back to be emptied. The `top` of the tree
        may be a mount point of its own."""
        try:
            st = lfs.statx(name, follow=False, dir_fd=fd)
        except OSError as e:
            self.note(e)
            return None
        if not stat.S_ISDIR(st.mode):
            if level.files:
                self.attempt(os.unlink, name, dir_fd=fd)
            return None
        subvolume = self.on_btrfs and st.ino == btrfs.SUBVOLUME_INODE
        if not top and (st.mount_root or (st.dev != level.ident[0] and not subvolume)):
            # another file system (remove_tree refused them first): never into it
            self.note(_err(errno.EBUSY, name))
            return None
        if subvolume:
            try:
                btrfs.destroy_subvolume_at(fd, name)
                return None
            except OSError as e:
                if e.errno in (errno.ENOTTY, errno.EINVAL):
                    subvolume = False  # no subvolume after all: a directory to empty
                elif e.errno != errno.ENOTEMPTY:
                    self.note(e)
                    return None
        try:
            sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            self.note(e)
            return None
        below = _Level(name, _ident(sub), subvolume=subvolume,
                       files=level.files and not subvolume)
        if subvolume:  # its nested subvolumes go first, from a writable parent
            self.attempt(btrfs.set_subvolume_read_only_fd, sub, False)
        self.list(sub, below)
        return sub, below

    def finish(self, fd: int, level: _Level) -> None:
        """`level`, now emptied, goes from its parent `fd`."""
        if level.subvolume:
            self.attempt(btrfs.destroy_subvolume_at, fd, level.name)
        elif level.files:
            self.attempt(os.rmdir, level.name, dir_fd=fd)


def _up(fd: int, ident: tuple[int, int]) -> int:
    """The parent of `fd`, which must be the directory `ident` we came down from."""
    up = os.open("..", _DIR_FLAGS, dir_fd=fd)
    if _ident(up) != ident:
        os.close(up)
        raise _err(errno.EBUSY)  # moved away while being deleted: stop here
    return up


def remove_tree(path: str) -> None:
    """Delete `path` and everything below it (a symlink is unlinked, never followed). A mount
    point below it is EBUSY before anything is deleted; otherwise every failure leaves what
    it concerns and the removal goes on, then the first one is raised."""
    path = path.rstrip("/")
    parent = os.path.realpath(os.path.dirname(path) or ".")
    name = os.path.basename(path)
    top = os.path.join(parent, name)
    if not os.path.islink(top) and lfs.mounts_below(top):
        raise _err(errno.EBUSY, top)
    removal = _Removal(lfs.is_btrfs(top))
    fd = os.open(parent, _DIR_FLAGS)
    try:
        stack = [_Level("", _ident(fd), [name])]
        while True:
            _check_stop()
            level = stack[-1]
            if level.todo:
                entered = removal.enter(fd, level, level.todo.pop(), top=len(stack) == 1)
                if entered is not None:
                    os.close(fd)
                    fd, below = entered
                    stack.append(below)
                continue
            if len(stack) == 1:
                break
            stack.pop()
            up = _up(fd, stack[-1].ident)
            os.close(fd)
            fd = up
            removal.finish(fd, level)
    finally:
        os.close(fd)
    if removal.error is not None:
        raise removal.error
