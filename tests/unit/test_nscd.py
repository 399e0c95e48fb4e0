"""nscd's caches are flushed when machines come and go, as 252 flushes them: one INVALIDATE
request per database (passwd, group, hosts) to /run/nscd/socket, after the turn of the event
loop; nothing at all without nscd."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

from machined.core.machine import Machine
from machined.linux.nscd import NscdFlusher, request


class FakeNscd:
    """An nscd that records the requests and answers each with `answer` (None: just close)."""

    def __init__(self, answer: int | None = 0) -> None:
        self.requests: list[bytes] = []
        self.answer = answer

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(12)
        (_version, _type, length) = struct.unpack("=iii", head)
        self.requests.append(head + await reader.readexactly(length))
        if self.answer is not None:
            writer.write(struct.pack("=i", self.answer))
            await writer.drain()
        writer.close()


def test_the_request_is_glibcs_invalidate() -> None:
    assert request("hosts") == struct.pack("=iii", 2, 10, 6) + b"hosts\0"


async def settle(flusher: NscdFlusher) -> None:
    for _ in range(50):
        await asyncio.sleep(0.01)
        if flusher._task is None or flusher._task.done():  # noqa: SLF001 - the test's clock
            return


async def test_machines_coming_and_going_flush_the_three_databases(tmp_path: Path) -> None:
    nscd = FakeNscd()
    path = str(tmp_path / "socket")
    server = await asyncio.start_unix_server(nscd.serve, path)
    async with server:
        flusher = NscdFlusher(path)
        flusher.machine_new(Machine(name="a"))
        flusher.machine_new(Machine(name="b"))  # the same turn: one flush for both
        await settle(flusher)
        assert nscd.requests == [request("passwd"), request("group"), request("hosts")]
        flusher.machine_removed(Machine(name="a"))
        await settle(flusher)
        assert len(nscd.requests) == 6
        flusher.machine_freed(Machine(name="a"))  # no flush: removed already said it
        await settle(flusher)
        assert len(nscd.requests) == 6


async def test_an_old_nscd_that_just_closes_and_a_failing_one(tmp_path: Path) -> None:
    for answer in (None, 22):
        nscd = FakeNscd(answer)
        path = str(tmp_path / f"socket{answer}")
        async with await asyncio.start_unix_server(nscd.serve, path):
            flusher = NscdFlusher(path)
            flusher.flush_soon()
            await settle(flusher)
            # a failure is logged at debug level; the other databases are still asked, as 252
            assert nscd.requests == [request("passwd"), request("group"), request("hosts")]


async def test_without_nscd_nothing_happens(tmp_path: Path) -> None:
    """...and the socket is not looked for again within a second; then it is."""
    nscd = FakeNscd()
    path = str(tmp_path / "socket")
    flusher = NscdFlusher(path)
    flusher.flush_soon()
    await asyncio.sleep(0)
    assert flusher._task is None  # noqa: SLF001
    async with await asyncio.start_unix_server(nscd.serve, path):
        flusher.flush_soon()
        await settle(flusher)
        assert nscd.requests == []
        flusher._absent_until = 0.0  # noqa: SLF001 - the second is over
        flusher.flush_soon()
        await settle(flusher)
        assert len(nscd.requests) == 3


async def test_a_flush_asked_for_while_one_runs_makes_one_more(tmp_path: Path) -> None:
    nscd = FakeNscd()
    gate = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        await nscd.serve(reader, writer)

    path = str(tmp_path / "socket")
    async with await asyncio.start_unix_server(slow, path):
        flusher = NscdFlusher(path)
        flusher.flush_soon()
        await asyncio.sleep(0.05)
        flusher.flush_soon()
        flusher.flush_soon()
        await asyncio.sleep(0.05)
        gate.set()
        await settle(flusher)
        assert len(nscd.requests) == 6
