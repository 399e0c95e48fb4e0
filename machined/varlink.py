"""The Varlink server of the userdb service io.systemd.Machine (spec §12), on
/run/systemd/userdb/io.systemd.Machine where nss-systemd and userdbctl look for it.

The protocol as 252's server speaks it: each message is a JSON object ended by a NUL byte; a call
is {"method", "parameters"?, "more"?, "oneway"?}, answered by {"parameters": {...}} or
{"error": NAME, "parameters": {...}}. A message that is not such a call (bad JSON, other keys, wrong
types) makes the server hang up, and so does a oneway call; an unknown method is answered.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from .core.errors import ErrnoError
from .core.userdb import INTERFACE, SERVICE, SYSTEM_ERROR, UserDatabase, VarlinkError
from .linux.unixsock import UnixListener, peer_uid

log = logging.getLogger(__name__)

SOCKET_NAME = SERVICE
METHOD_NOT_FOUND = "org.varlink.service.MethodNotFound"
METHOD_NOT_IMPLEMENTED = "org.varlink.service.MethodNotImplemented"
GET_INFO = "org.varlink.service.GetInfo"  # 252 does not implement it

MAX_MESSAGE = 64 * 1024  # userdb calls are a few hundred bytes; 252 allows 16 MiB
MAX_CONNECTIONS = 4096  # as 252's varlink server
MAX_CONNECTIONS_PER_UID = 1024

_ENVELOPE_KEYS = frozenset({"method", "parameters", "more", "oneway"})

Method = Callable[[dict[str, Any] | None], dict[str, Any]]


def userdb_methods(db: UserDatabase) -> dict[str, Method]:
    return {
        INTERFACE + ".GetUserRecord": db.get_user_record,
        INTERFACE + ".GetGroupRecord": db.get_group_record,
        INTERFACE + ".GetMemberships": db.get_memberships,
    }


class _Duplicates(dict[str, Any]):
    """An object in which a key came twice: 252's parser keeps them all, and its dispatch
    refuses the parameters then (ENOTUNIQ); an envelope so is no call."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    made = dict(pairs)
    return made if len(made) == len(pairs) else _Duplicates(made)


# Made once: json.dumps()/loads() build them anew for every call with non-default settings.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_DECODER = json.JSONDecoder(object_pairs_hook=_object)


def _valid_strings(value: Any) -> bool:
    """No NUL and no lone surrogate in any string or key: 252's parser refuses both."""
    if type(value) is str:
        return "\0" not in value and not any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return all(_valid_strings(k) and _valid_strings(v) for k, v in value.items())
    if type(value) is list:
        return all(_valid_strings(v) for v in value)
    return True


def _encode(message: dict[str, Any]) -> bytes:
    return _ENCODER.encode(message).encode() + b"\0"


def _parse_call(data: bytes) -> dict[str, Any] | None:
    """The call in one message, or None when it is not a well-formed call."""
    try:
        call = _DECODER.decode(data.decode())  # UTF-8 only, as 252
    except (ValueError, RecursionError):
        return None
    if b"\\u" in data and not _valid_strings(call):  # only escapes can make such strings
        return None
    if type(call) is not dict or not call.keys() <= _ENVELOPE_KEYS \
            or type(call.get("method")) is not str:
        return None
    parameters = call.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        return None
    for flag in ("more", "oneway"):
        if flag in call and type(call[flag]) is not bool:
            return None
    return call


def answer(methods: dict[str, Method], data: bytes) -> bytes | None:
    """The reply to one message, or None: hang up."""
    call = _parse_call(data)
    if call is None or call.get("oneway"):
        return None
    name = call["method"]
    method = methods.get(name)
    if method is None:
        error = METHOD_NOT_IMPLEMENTED if name == GET_INFO else METHOD_NOT_FOUND
        return _encode({"error": error, "parameters": {"method": name}})
    if type(call.get("parameters")) is _Duplicates:
        return _encode({"error": SYSTEM_ERROR, "parameters": {"errno": errno.ENOTUNIQ}})
    try:
        return _encode({"parameters": method(call.get("parameters"))})
    except VarlinkError as e:
        return _encode({"error": e.name, "parameters": e.parameters})
    except ErrnoError as e:
        return _encode({"error": SYSTEM_ERROR, "parameters": {"errno": e.errno}})
    except Exception:
        log.exception("Unexpected error in Varlink method %s", name)
        return _encode({"error": SYSTEM_ERROR, "parameters": {"errno": errno.EIO}})


class VarlinkServer:
    def __init__(self, methods: dict[str, Method]) -> None:
        self.methods = methods
        self._listener: UnixListener | None = None
        self._server: asyncio.AbstractServer | None = None
        self._per_uid: Counter[int] = Counter()
        self._connections: set[_Connection] = set()

    async def start(self, path: Path) -> None:
        self._listener = UnixListener(path, 0o666)
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: _Connection(self), sock=self._listener.sock)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._listener is not None:
            self._listener.remove()
        for conn in list(self._connections):
            conn.hang_up()

    def admit(self, conn: _Connection, uid: int) -> bool:
        if (self._per_uid.total() >= MAX_CONNECTIONS
                or self._per_uid[uid] >= MAX_CONNECTIONS_PER_UID):
            return False
        self._per_uid[uid] += 1
        self._connections.add(conn)
        return True

    def release(self, conn: _Connection, uid: int) -> None:
        self._connections.discard(conn)
        self._per_uid[uid] -= 1
        if not self._per_uid[uid]:
            del self._per_uid[uid]


class _Connection(asyncio.Protocol):
    """One client: calls are answered in the order they come, each as soon as it is complete.
    A protocol rather than streams: no task, future or await per call."""

    def __init__(self, server: VarlinkServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.uid: int | None = None  # set while the connection counts against its user
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's do not derive from asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        try:
            uid = peer_uid(transport.get_extra_info("socket"))
        except OSError:
            transport.close()
            return
        if not self.server.admit(self, uid):
            transport.close()
            return
        self.uid = uid

    def data_received(self, data: bytes) -> None:
        if self.uid is None or self.transport is None or self.transport.is_closing():
            return
        self.buffer += data
        while (end := self.buffer.find(b"\0")) >= 0:
            reply = answer(self.server.methods, bytes(self.buffer[:end]))
            del self.buffer[:end + 1]
            if reply is None:
                self.hang_up()
                return
            self.transport.write(reply)
        if len(self.buffer) > MAX_MESSAGE:
            self.hang_up()

    def hang_up(self) -> None:
        self.buffer.clear()
        if self.transport is not None:
            self.transport.close()

    # A client that sends calls without reading the answers is not read from until it does.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.uid is not None:
            self.server.release(self, self.uid)
            self.uid = None
