"""nscd's caches flushed when machines come and go, as 252 does: the hosts database resolves
machine names (nss-mymachines), and passwd and group the users of user-namespaced machines.

nscd's INVALIDATE request, once per database on a connection of its own: version 2, type 10,
the key's length, the key (the database name and a NUL); nscd answers with an int32, 0 for
done (an old nscd just closes the connection). Unlike 252, which waits for nscd in its event
loop (up to 5 s), the flush runs in a task; flushes asked for meanwhile make one more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time

from ..core.machine import Machine

log = logging.getLogger(__name__)

NSCD_SOCKET = "/run/nscd/socket"
DATABASES = ("passwd", "group", "hosts")
TIMEOUT = 5.0  # for all three, as 252
ABSENT_FOR = 1.0  # seconds a missing socket is not looked for again
_REQUEST = struct.Struct("=iii")
_VERSION, _INVALIDATE = 2, 10


def request(database: str) -> bytes:
    key = database.encode() + b"\0"
    return _REQUEST.pack(_VERSION, _INVALIDATE, len(key)) + key


class NscdFlusher:
    """A RegistryListener: a machine that starts or goes makes a flush after this turn of the
    event loop (one for all the machines of a turn); with no nscd socket there is nothing to do."""

    def __init__(self, path: str = NSCD_SOCKET) -> None:
        self.path = path
        self._scheduled = False
        # No socket a moment ago: none now either. Registrations come by the thousand a second,
        # and nscd is rarely installed; an nscd started within that second has cached next to
        # nothing yet, and the next machine that comes or goes flushes it.
        self._absent_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def machine_new(self, m: Machine) -> None:
        self.flush_soon()

    def machine_removed(self, m: Machine) -> None:
        self.flush_soon()

    def machine_freed(self, m: Machine) -> None:
        pass

    def flush_soon(self) -> None:
        if not self._scheduled and time.monotonic() >= self._absent_until:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        if self._task is not None and not self._task.done():
            self._again = True
            return
        if not os.access(self.path, os.F_OK):  # no nscd, the usual case (no raise, unlike stat)
            self._absent_until = time.monotonic() + ABSENT_FOR
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await asyncio.wait_for(self._flush_all(), TIMEOUT)
            except TimeoutError:
                log.debug("nscd did not answer within %g s", TIMEOUT)
            if not self._again:
                return

    async def _flush_all(self) -> None:
        for database in DATABASES:  # each one even when another failed, as 252
            try:
                await self._flush_one(database)
            except (OSError, ValueError) as e:
                log.debug("Failed to flush nscd's %s cache: %s", database, e)

    async def _flush_one(self, database: str) -> None:
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            writer.write(request(database))
            await writer.drain()
            answer = await reader.readexactly(4)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise ValueError("nscd prematurely ended connection") from None
            return  # an older nscd closes the connection at once: fine
        finally:
            writer.close()
        (result,) = struct.unpack("=i", answer)
        if result != 0:
            raise ValueError(f"nscd answered {result} on invalidating '{database}'")
