"""User namespace ID maps (/proc/PID/uid_map, gid_map): the UID shift of a container and the
mapping of IDs in and out of it (spec §8.3, §8.4). Pure: the caller reads the files."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ErrnoError, InvalidArgs

UID_INVALID = 0xFFFFFFFF
UID_NOBODY_16 = 0xFFFF  # the 16-bit overflow value, never a valid ID


@dataclass(frozen=True)
class MapLine:
    base: int  # the first ID inside
    shift: int  # the first ID outside
    range: int


def parse_map(text: str) -> list[MapLine]:
    lines = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise ErrnoError(errno.EBADMSG)
        try:
            base, shift, rng = (int(f) for f in fields)
        except ValueError:
            raise ErrnoError(errno.EBADMSG) from None
        lines.append(MapLine(base, shift, rng))
    return lines


def uid_is_valid(uid: int) -> bool:
    return uid not in (UID_INVALID, UID_NOBODY_16) and 0 <= uid < UID_INVALID


def check_id(value: int, what: str) -> None:
    if not uid_is_valid(value):
        raise InvalidArgs(f"Invalid {what} ID {value}")


def shift_of(uid_map: str | None, gid_map: str | None) -> int:
    """The single shift of a container mapping 0..65535+ in one line, identical for GIDs;
    0 when there is no map (no user namespace support: IDs are the host's). Any other mapping
    is a bare ENXIO, as 252's machine_get_uid_shift() answers (GetUIDShift words it)."""
    if uid_map is None:
        return 0
    complex_map = ErrnoError(errno.ENXIO)
    uids = parse_map(uid_map)
    if not uids:
        raise ErrnoError(errno.EBADMSG)
    if len(uids) != 1 or uids[0].base != 0 or uids[0].range < 65534:
        raise complex_map
    gids = parse_map(gid_map or "")
    if gids != uids:
        raise complex_map
    return uids[0].shift


def map_from(inner: int, lines: Sequence[MapLine]) -> int | None:
    """The host ID of inner, or None when no line covers it."""
    for line in lines:
        if line.base <= inner < line.base + line.range:
            outer = inner - line.base + line.shift
            if not uid_is_valid(outer):
                raise ErrnoError(errno.EINVAL)
            return outer
    return None


def map_to(outer: int, lines: Sequence[MapLine]) -> int | None:
    """The ID inside of host ID outer, or None; identity lines (shift 0) never match."""
    for line in lines:
        if line.shift == 0:
            continue
        if line.shift <= outer < line.shift + line.range:
            return outer - line.shift + line.base  # the caller checks it is a valid ID
    return None
