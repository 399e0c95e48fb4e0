"""The Varlink server of the userdb service io.systemd.Machine (spec §12), on
/run/systemd/userdb/io.systemd.Machine where nss-systemd and userdbctl look for it.

The protocol as 252's server speaks it: each message is a JSON object ended by a NUL byte; a call
is {"method", "parameters"?, "more"?, "oneway"?}, answered by {"parameters": {...}} or
{"error": NAME, "parameters": {...}}. A message that is not such a call (bad JSON, other keys, wrong
types) makes the server hang up, and so does a oneway call; an unknown method is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\0"


def _parse_call(data: bytes) -> dict[str, Any] | None:
    """The call in one message, or None when it is not a well-formed call."""
    try:
        call = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict) or not call.keys() <= _ENVELOPE_KEYS:
        return None
    if not isinstance(call.get("method"), str):
        return None
    if not isinstance(call.get("parameters", {}), dict | None):
        return None
    if any(not isinstance(call.get(k, False), bool) for k in ("more", "oneway")):
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
        self._server: asyncio.Server | None = None
        self._per_uid: Counter[int] = Counter()

    async def start(self, path: Path) -> None:
        self._listener = UnixListener(path, 0o666)
        self._server = await asyncio.start_unix_server(
            self._serve, sock=self._listener.sock, limit=MAX_MESSAGE)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._listener is not None:
            self._listener.remove()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = peer_uid(writer.get_extra_info("socket"))
        if (self._per_uid.total() >= MAX_CONNECTIONS
                or self._per_uid[uid] >= MAX_CONNECTIONS_PER_UID):
            writer.close()
            return
        self._per_uid[uid] += 1
        try:
            while True:
                try:
                    data = await reader.readuntil(b"\0")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                reply = answer(self.methods, data[:-1])
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
        except OSError:
            return
        finally:
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
