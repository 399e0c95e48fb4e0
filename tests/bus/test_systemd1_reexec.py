"""A call about a unit that PID 1 drops when it re-executes (`systemctl daemon-reexec`) is sent
again to the new PID 1: its old connection goes with the calls it had not read, and the
caller gets NoReply "Message recipient disconnected from message bus without replying"."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sdbus.sd_bus_internals import SdBus, sd_bus_open_system

from machined.bus.objects import Dispatcher, Interface, Method
from machined.core.errors import ErrnoError
from machined.core.machine import Machine, MachineClass
from machined.scopes import systemd1
from machined.scopes.systemd1 import MANAGER, SYSTEMD1, SYSTEMD1_PATH, Systemd1Backend
from tests.helpers.busdaemon import BusDaemon
from tests.helpers.client import set_destination

UNIT = "machine-x.scope"
DAEMON = "org.example.Machined"


class Pid1:
    """One instance of a PID 1 on the bus: StopUnit and KillUnit recorded, and answered
    unless it is about to re-execute (then never)."""

    def __init__(self, calls: list[tuple[str, ...]], tag: str, answers: bool) -> None:
        self.conn: SdBus = sd_bus_open_system()
        self.dispatcher = Dispatcher(self.conn)
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def handler(member: str, result: Callable[[], Any]) -> Callable[..., Any]:
            def handle(_call: Any, *args: Any) -> Any:
                calls.append((tag, member, *map(str, args)))
                return result() if answers else never

            return handle

        self.dispatcher.export(SYSTEMD1_PATH, Interface(MANAGER, methods=[
            Method("StopUnit", "ss", ("name", "mode"), "o", ("job",),
                   handler("StopUnit", lambda: f"{SYSTEMD1_PATH}/job/7")),
            Method("KillUnit", "ssi", ("name", "who", "signal"), "", (),
                   handler("KillUnit", lambda: None)),
        ]))

    def job_removed(self, job: int, result: str, destination: str | None = None) -> None:
        signal = self.conn.new_signal_message(SYSTEMD1_PATH, MANAGER, "JobRemoved")
        signal.append_data("uoss", job, f"{SYSTEMD1_PATH}/job/{job}", UNIT, result)
        if destination:
            set_destination(signal, destination)
        signal.send()

    async def take_name(self) -> None:
        await self.conn.request_name_async(SYSTEMD1, 0)

    async def go(self) -> None:
        await self.dispatcher.drain()
        self.dispatcher.close()
        self.conn.close()


async def subscribed_backend(timeout_usec: int = 25_000_000) -> Systemd1Backend:
    bus = sd_bus_open_system()
    bus.method_call_timeout_usec = timeout_usec
    backend = Systemd1Backend(bus)
    await backend.subscribe(lambda *_: None, lambda _unit: None, lambda: None)
    return backend


async def reexec_during(call: Callable[[Systemd1Backend, Machine], Any], back_after: float,
                        calls: list[tuple[str, ...]]) -> Any:
    old = Pid1(calls, "old", answers=False)
    await old.take_name()
    backend = await subscribed_backend()
    m = Machine(name="x", cls=MachineClass.CONTAINER, unit=UNIT, leader=4242)
    pending = asyncio.ensure_future(call(backend, m))
    while not calls:
        await asyncio.sleep(0.01)
    await old.go()  # re-executing: the call is dropped unanswered
    await asyncio.sleep(back_after)
    new = Pid1(calls, "new", answers=True)
    await new.take_name()
    try:
        return await asyncio.wait_for(pending, 10)
    finally:
        await new.go()
        backend.bus.close()


@pytest.fixture(autouse=True)
def _private_bus(in_process_bus: BusDaemon) -> None:
    """Every connection of these tests, PID 1's and the daemon's, on the private bus."""


def test_terminate_during_a_reexec_is_sent_again_to_the_new_pid1() -> None:
    calls: list[tuple[str, ...]] = []
    job = asyncio.run(reexec_during(lambda b, m: b.stop(m), 0.3, calls))
    assert job == f"{SYSTEMD1_PATH}/job/7"
    assert calls == [("old", "StopUnit", UNIT, "fail"), ("new", "StopUnit", UNIT, "fail")]


def test_kill_during_a_reexec_is_sent_again_to_the_new_pid1() -> None:
    calls: list[tuple[str, ...]] = []
    asyncio.run(reexec_during(lambda b, m: b.kill(m, 10), 0.3, calls))
    assert calls == [("old", "KillUnit", UNIT, "all", "10"), ("new", "KillUnit", UNIT, "all", "10")]


def test_no_new_pid1_in_time_is_the_error_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(systemd1, "REEXEC_WAIT", 0.2)
    calls: list[tuple[str, ...]] = []
    with pytest.raises(ErrnoError) as e:
        asyncio.run(reexec_during(lambda b, m: b.stop(m), 1.0, calls))
    assert e.value.message == "Connection timed out"  # NoReply, as 252 maps it
    assert calls == [("old", "StopUnit", UNIT, "fail")]


def test_a_pid1_too_busy_to_answer_in_time_gets_no_second_call() -> None:
    # sd-bus's own timeout is a NoReply too, but the PID 1 it went to is still there: a
    # second StopUnit or KillUnit would only be acted on twice once it gets to them.
    calls: list[tuple[str, ...]] = []

    async def scenario() -> None:
        busy = Pid1(calls, "busy", answers=False)
        await busy.take_name()
        backend = await subscribed_backend(timeout_usec=300_000)
        m = Machine(name="x", cls=MachineClass.CONTAINER, unit=UNIT, leader=4242)
        try:
            with pytest.raises(ErrnoError) as e:
                await backend.kill(m, 10)
            assert e.value.message == "Connection timed out"
            await asyncio.sleep(0.3)
        finally:
            await busy.go()
            backend.bus.close()

    asyncio.run(scenario())
    assert calls == [("busy", "KillUnit", UNIT, "all", "10")]


def test_signals_count_only_from_the_pid1_of_the_moment_and_keep_their_order() -> None:
    seen: list[tuple[str, str]] = []

    async def scenario() -> None:
        calls: list[tuple[str, ...]] = []
        old = Pid1(calls, "old", answers=True)
        await old.take_name()
        backend = Systemd1Backend(sd_bus_open_system())
        await backend.subscribe(lambda job, _unit, result: seen.append((job[-1], result)),
                                lambda _unit: None, lambda: None)
        await backend.bus.request_name_async(DAEMON, 0)
        forger = Pid1(calls, "forger", answers=True)  # a client, not systemd1
        await forger.conn.request_name_async("org.example.Forger", 0)  # connected, and running
        try:
            old.job_removed(1, "done")
            forger.job_removed(2, "failed", DAEMON)  # sent to the daemon itself
            await old.go()  # re-executing: the new PID 1 comes under another unique name
            new = Pid1(calls, "new", answers=True)
            await new.take_name()
            for job in (3, 4, 5):
                new.job_removed(job, "done")
            forger.job_removed(6, "failed", DAEMON)
            new.job_removed(7, "done")
            for _ in range(100):
                if len(seen) >= 5:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            await new.go()
        finally:
            await forger.go()
            backend.bus.close()

    asyncio.run(scenario())
    assert seen == [("1", "done"), ("3", "done"), ("4", "done"), ("5", "done"), ("7", "done")]
