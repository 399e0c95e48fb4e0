"""A minimal inotify binding (ctypes): used to see a cgroup's `cgroup.events` change."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from collections.abc import Callable

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_IGNORED = 0x00008000
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Inotify:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd
        self._loop = loop
        self._callbacks: dict[int, Callable[[], None]] = {}
        loop.add_reader(fd, self._read)

    def add(self, path: str, mask: int, callback: Callable[[], None]) -> int:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        self._callbacks[wd] = callback
        return int(wd)

    def remove(self, wd: int) -> None:
        if self._callbacks.pop(wd, None) is not None:
            _libc.inotify_rm_watch(self.fd, wd)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return
            raise
        offset = 0
        fired = []
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            if mask & IN_IGNORED:
                self._callbacks.pop(wd, None)
            if wd in self._callbacks and wd not in fired:
                fired.append(wd)
        for wd in fired:
            callback = self._callbacks.get(wd)
            if callback is None:
                continue
            try:
                callback()
            except Exception:  # the other watches of this read still get theirs
                log.exception("Handling a change of an inotify watch failed")

    def close(self) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
