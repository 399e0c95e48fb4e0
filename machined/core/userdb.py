"""The user and group records 252 serves as the userdb service io.systemd.Machine (spec §12):
user vu-MACHINE-UID and group vg-MACHINE-GID for each ID that a user-namespaced container maps
to the host. nss-systemd and userdbctl ask for them, so that `ls -l` on a container's files shows
names instead of raw host IDs.

Pure: the caller passes the machines and a reader of their ID maps. Errors are VarlinkError,
with the names and parameters 252 answers (checked against a running 252).
"""

from __future__ import annotations

import errno
import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import ErrnoError
from .machine import Machine, MachineClass
from .uidmap import MapLine, map_from, map_to, parse_map, uid_is_valid

SERVICE = "io.systemd.Machine"
INTERFACE = "io.systemd.UserDatabase"
NO_RECORD = INTERFACE + ".NoRecordFound"
BAD_SERVICE = INTERFACE + ".BadService"
CONFLICT = INTERFACE + ".ConflictingRecordFound"
NO_ENUMERATION = INTERFACE + ".EnumerationNotSupported"
SYSTEM_ERROR = "io.systemd.System"

NOLOGIN = "/usr/sbin/nologin"  # Debian's path
GID_NOBODY = 65534
HOST_IDS = 0x10000  # IDs below this are the host's own, never a container's

# valid_user_group_name() without flags: what useradd accepts, at most UT_NAMESIZE - 1 long
_STRICT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,30}")
# parse_uid(): decimal, no sign, no leading zero, no white space
_ID = re.compile(r"0|[1-9][0-9]{0,9}")

# (machine, "uid_map" or "gid_map") -> the map's text, None when the file is not there
IdMapReader = Callable[[Machine, str], "str | None"]


class VarlinkError(Exception):
    def __init__(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        super().__init__(name)
        self.name = name
        self.parameters = parameters or {}


def _system_error(code: int) -> VarlinkError:
    """What 252's varlink server answers when a method fails with a plain errno."""
    return VarlinkError(SYSTEM_ERROR, {"errno": code})


@dataclass(frozen=True)
class _Kind:
    prefix: str
    name_key: str
    id_key: str
    map_file: str
    label: str  # "UID" or "GID", in the record's text


USER = _Kind("vu-", "userName", "uid", "uid_map", "UID")
GROUP = _Kind("vg-", "groupName", "gid", "gid_map", "GID")


def valid_user_group_name(name: str) -> bool:
    return _STRICT_NAME.fullmatch(name) is not None


def parse_id(text: str) -> int | None:
    if _ID.fullmatch(text) is None:
        return None
    value = int(text)
    return value if uid_is_valid(value) else None


def valid_gecos(text: str) -> bool:
    return ":" not in text and "\n" not in text


# ------------------------------------------------------------------ parameters
def _id_param(value: Any) -> int:
    # JSON numbers: 100000.0 is 100000 to 252, as to any JSON reader
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int or not uid_is_valid(value):
        raise _system_error(errno.EINVAL)
    return value


def _string_param(value: Any) -> str:
    if not isinstance(value, str):
        raise _system_error(errno.EINVAL)
    return value


def _dispatch(parameters: dict[str, Any] | None, fields: dict[str, Callable[[Any], Any]]
              ) -> dict[str, Any]:
    """252's json_dispatch(): fields in the order the caller sent them; the first unknown field
    fails with EADDRNOTAVAIL, the first one of the wrong type with EINVAL."""
    out = {}
    for key, value in (parameters or {}).items():
        convert = fields.get(key)
        if convert is None:
            raise _system_error(errno.EADDRNOTAVAIL)
        out[key] = convert(value)
    if out.get("service") != SERVICE:
        raise VarlinkError(BAD_SERVICE)
    return out


# ------------------------------------------------------------------ lookups
class UserDatabase:
    def __init__(self, machines: Callable[[], Iterable[Machine]],
                 get: Callable[[str], Machine | None], read_map: IdMapReader) -> None:
        self._machines = machines
        self._get = get
        self._read_map = read_map

    def get_user_record(self, parameters: dict[str, Any] | None) -> dict[str, Any]:
        p = _dispatch(parameters, {"uid": _id_param, "userName": _string_param,
                                   "service": _string_param})
        name, uid, detail = self._lookup(USER, p)
        record: dict[str, Any] = {"userName": name, "uid": uid, "gid": GID_NOBODY}
        if detail:
            record["realName"] = detail
        record.update({"homeDirectory": "/", "shell": NOLOGIN, "locked": True,
                       "service": SERVICE, "disposition": "container"})
        return {"record": record}

    def get_group_record(self, parameters: dict[str, Any] | None) -> dict[str, Any]:
        p = _dispatch(parameters, {"gid": _id_param, "groupName": _string_param,
                                   "service": _string_param})
        name, gid, detail = self._lookup(GROUP, p)
        record: dict[str, Any] = {"groupName": name, "gid": gid}
        if detail:
            record["description"] = detail
        record.update({"service": SERVICE, "disposition": "container"})
        return {"record": record}

    @staticmethod
    def get_memberships(parameters: dict[str, Any] | None) -> dict[str, Any]:
        _dispatch(parameters, {"userName": _string_param, "groupName": _string_param,
                               "service": _string_param})
        raise VarlinkError(NO_RECORD)  # containers' users have no auxiliary groups

    def _lookup(self, kind: _Kind, p: dict[str, Any]) -> tuple[str, int, str]:
        """(name, host ID, real name or description) of the record asked for: by ID when the
        caller gave one, else by name; both given must agree with the record."""
        wanted_id: int | None = p.get(kind.id_key)
        wanted_name: str | None = p.get(kind.name_key)
        if wanted_id is not None:
            found = self._by_id(kind, wanted_id)
        elif wanted_name is not None:
            found = self._by_name(kind, wanted_name)
        else:
            raise VarlinkError(NO_ENUMERATION)
        if found is None:
            raise VarlinkError(NO_RECORD)
        name, host_id, detail = found
        if (wanted_name is not None and name != wanted_name) or \
                (wanted_id is not None and host_id != wanted_id):
            raise VarlinkError(CONFLICT)
        return name, host_id, detail

    def _by_id(self, kind: _Kind, host_id: int) -> tuple[str, int, str] | None:
        if host_id < HOST_IDS:
            return None
        for m in self._machines():
            if m.cls is not MachineClass.CONTAINER:
                continue
            try:
                text = self._read_map(m, kind.map_file)
            except ErrnoError:
                continue
            if text is None:
                continue
            inner = map_to(host_id, _parse(text))
            if inner is None:
                continue
            if not uid_is_valid(inner):
                raise _system_error(errno.EINVAL)
            name = f"{kind.prefix}{m.name}-{inner}"
            if not valid_user_group_name(name):  # never make up an invalid name
                return None
            return name, host_id, _detail(kind, inner, m.name)
        return None

    def _by_name(self, kind: _Kind, name: str) -> tuple[str, int, str] | None:
        if not valid_user_group_name(name) or not name.startswith(kind.prefix):
            return None
        machine_name, dash, id_text = name[len(kind.prefix):].rpartition("-")
        inner = parse_id(id_text) if dash else None
        if inner is None:
            return None
        m = self._get(machine_name)
        if m is None or m.cls is not MachineClass.CONTAINER:
            return None
        try:
            text = self._read_map(m, kind.map_file)
        except ErrnoError as e:
            raise _system_error(e.errno) from None
        if text is None:
            raise _system_error(errno.ENOENT)
        try:
            host_id = map_from(inner, _parse(text))
        except ErrnoError as e:
            raise _system_error(e.errno) from None
        if host_id is None:
            return None
        return name, host_id, _detail(kind, inner, m.name)


def _parse(text: str) -> tuple[MapLine, ...]:
    try:
        return _parse_cached(text)
    except ErrnoError as e:
        raise _system_error(e.errno) from None


@functools.lru_cache(maxsize=256)
def _parse_cached(text: str) -> tuple[MapLine, ...]:
    # a map is written once per user namespace: the same few texts come again and again
    return tuple(parse_map(text))


def _detail(kind: _Kind, inner: int, machine: str) -> str:
    text = f"{kind.label} {inner} of Container {machine}"
    return text if valid_gecos(text) else ""
