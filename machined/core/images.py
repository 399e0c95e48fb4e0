"""The image model (spec §10): the Image value object, the search path and its precedence,
side-file names, argument rules and the parsers for the metadata files inside an image.
No D-Bus, no file system access: machined/linux/imagefs.py looks at the disk."""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import NamedTuple

from .errors import ErrnoError, InvalidArgs, NoSuchImage
from .names import (
    bus_label_escape,
    hostname_cleanup,
    hostname_is_valid_trailing_dot,
    image_name_is_valid,
)

UINT64_MAX = 2**64 - 1
IMAGE_PATH_PREFIX = "/org/freedesktop/machine1/image"
HOST_IMAGE = ".host"

# Search path for class "machine", first match wins (§10.1).
SEARCH_DIRS = ("/etc/machines", "/run/machines", "/var/lib/machines", "/var/lib/container",
               "/usr/local/lib/machines", "/usr/lib/machines")
MAIN_POOL = "/var/lib/machines"
SETTINGS_DIRS = ("/etc/systemd/nspawn", "/run/systemd/nspawn")


class ImageType(Enum):
    DIRECTORY = "directory"
    SUBVOLUME = "subvolume"
    RAW = "raw"
    BLOCK = "block"


class Image(NamedTuple):
    """An image as found on disk (a tuple: ListImages makes a thousand of them per call)."""

    name: str
    path: str
    type: ImageType
    read_only: bool
    crtime: int = 0  # µs since the epoch, 0 = unknown
    mtime: int = 0
    usage: int = UINT64_MAX
    usage_exclusive: int = UINT64_MAX
    limit: int = UINT64_MAX
    limit_exclusive: int = UINT64_MAX
    vendor: bool = False  # below /usr: never changed

    @property
    def object_path(self) -> str:
        return image_object_path(self.name)

    @property
    def is_host(self) -> bool:
        return self.name == HOST_IMAGE or self.path == "/"

    @property
    def directory(self) -> str:
        """The directory holding the image (where its .nspawn/.roothash side files live)."""
        return os.path.dirname(self.path)


@lru_cache(maxsize=4096)
def image_object_path(name: str) -> str:
    return f"{IMAGE_PATH_PREFIX}/{bus_label_escape(name)}"


@dataclass(frozen=True)
class SearchPath:
    """Where images are looked for. `root` prefixes every directory (a hidden option, so that
    tests and benchmarks never touch the host's /var/lib/machines); "" is the real host."""

    root: str = ""

    @property
    def dirs(self) -> list[str]:
        return [self.root + d for d in SEARCH_DIRS]

    @property
    def pool(self) -> str:
        return self.root + MAIN_POOL

    @property
    def settings_dirs(self) -> list[str]:
        return [self.root + d for d in SETTINGS_DIRS]

    def is_vendor_dir(self, directory: str) -> bool:
        usr = self.root + "/usr"
        return directory == usr or directory.startswith(usr + "/")

    def side_files(self, image: Image, name: str | None = None) -> list[str]:
        """The files that belong to an image besides itself (§10.8): its .nspawn settings in the
        two settings directories and next to it, and its .roothash next to it. With `name`, the
        same places for another name (a rename's or a clone's target)."""
        n = image.name if name is None else name
        return [f"{d}/{n}.nspawn" for d in self.settings_dirs] + [
            f"{image.directory}/{n}.nspawn", f"{image.directory}/{n}.roothash"]


# ------------------------------------------------------------------ argument rules
def check_image_name(name: str) -> str:
    if not image_name_is_valid(name):
        raise InvalidArgs(f"Image name '{name}' is invalid.")
    return name


def check_limit(size: int) -> int:
    if size != UINT64_MAX and size >= 2**63:
        raise InvalidArgs("New limit out of range")
    return size


class CleanMode(Enum):
    ALL = "all"
    HIDDEN = "hidden"


def clean_mode(mode: str) -> CleanMode:
    try:
        return CleanMode(mode)
    except ValueError:
        raise InvalidArgs(f"Unknown mode '{mode}'.") from None


def to_clean(image: Image, mode: CleanMode) -> bool:
    """CleanPool removes everything but vendor and host images, or only hidden ones."""
    if image.vendor or image.is_host:
        return False
    return mode is CleanMode.ALL or image.name.startswith(".")


def refuse_vendor_or_host(image: Image) -> None:
    """Remove, Rename, MarkReadOnly and SetLimit never touch these (§10.8)."""
    if image.vendor or image.is_host:
        raise ErrnoError(errno.EROFS)


def require_found(name: str, image: Image | None) -> Image:
    if image is None:
        raise NoSuchImage(name)
    return image


# ------------------------------------------------------------------ metadata
@dataclass(frozen=True)
class Metadata:
    hostname: str = ""
    machine_id: bytes = b""
    machine_info: tuple[tuple[str, str], ...] = ()
    os_release: tuple[tuple[str, str], ...] = ()


LONG_LINE_MAX = 1024 * 1024  # systemd's limit of read_line()


def parse_hostname(text: str) -> str:
    """/etc/hostname as 252's read_etc_hostname() reads it: the first line that is neither
    empty nor starts with "#", cleaned up as hostname_cleanup() does; "" when that is no valid
    host name, or when a line up to it is as long as LONG_LINE_MAX (read_line() fails)."""
    for line in re.split(r"\r\n|[\n\r\0]", text):
        if len(line) >= LONG_LINE_MAX:
            return ""
        if line and not line.startswith("#"):
            name = hostname_cleanup(line)
            return name if hostname_is_valid_trailing_dot(name) else ""
    return ""


def parse_machine_id(data: bytes, first_line: bool = False) -> bytes:
    """16 bytes of an /etc/machine-id, b"" when it is none or all zeros. In a directory image
    252 takes exactly 32 hex digits with at most one newline (id128_read_fd, ID128_PLAIN); in a
    raw image a first line of exactly 32 characters ended by a newline (read_line() == 33)."""
    text = data[:33] if first_line else data  # a raw image: only the first line counts
    ok = (len(text) == 33 and text.endswith(b"\n")) or (not first_line and len(text) == 32)
    if not ok or not re.fullmatch(rb"[0-9a-fA-F]{32}", text[:32]):
        return b""
    raw = bytes.fromhex(text[:32].decode())
    return b"" if raw == bytes(16) else raw
