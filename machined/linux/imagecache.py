"""What a discovery scan found, kept between scans and reused for an entry only while one
stat() of it says nothing changed: the same inode on the same device with the same ctime,
mtime, size, blocks and mode. Every change ListImages shows moves one of these (chattr, chmod,
xattrs and renames move the ctime; writes the mtime and size; a mount over the entry the device
and inode), so a listing never shows stale data, while a scan costs one listdir() per search
directory and one stat() per entry instead of the several calls that finding out what an entry
is takes.

Subvolumes (their quota changes without touching the inode) and block devices (BLKROSET) are
looked at afresh every time."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from ..core.images import Image, ImageType

StatKey = tuple[int, int, int, int, int, int, int]
Inspect = Callable[[str], Image | None]


class ScanCache:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        # search directory -> (its identity and read-only state, entry -> (stat key, image,
        # look again next time))
        self._dirs: dict[str, tuple[object, dict[str, tuple[StatKey, Image | None, bool]]]] = {}

    def images(self, path: str, dir_key: object, inspect: Inspect) -> list[Image]:
        """The images of one search directory. Call with `lock` held."""
        known_key, known = self._dirs.get(path, (None, {}))
        if known_key != dir_key:
            known = {}
        fresh: dict[str, tuple[StatKey, Image | None, bool]] = {}
        out = []
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for entry in os.listdir(fd):
                try:
                    st = os.stat(entry, dir_fd=fd)  # one path component to resolve
                    key = (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size,
                           st.st_blocks, st.st_mode)
                except FileNotFoundError:  # gone meanwhile (any other error fails the listing)
                    continue
                cached = known.get(entry)
                if cached is not None and cached[0] == key and not cached[2]:
                    image = cached[1]
                    fresh[entry] = cached
                else:
                    image = inspect(entry)
                    volatile = image is not None and image.type in _VOLATILE
                    fresh[entry] = (key, image, volatile)
                if image is not None:
                    out.append(image)
        finally:
            os.close(fd)
        self._dirs[path] = (dir_key, fresh)
        return out


# Their quota changes without touching the inode; BLKROSET neither.
_VOLATILE = frozenset({ImageType.SUBVOLUME, ImageType.BLOCK})
