"""The match rules that take privileged calls before sd-bus's dispatch (bus/privileged.py) name
only the member: the callback itself passes over a call of that member on another object or
interface and a signal of that name sent to the daemon itself, and the bus driver keeps no copy
of the rules, so a broadcast signal of that name never reaches the daemon."""

from __future__ import annotations

import asyncio

import pytest
from sdbus.sd_bus_internals import SdBus, sd_bus_open_system

from machined.bus import libsdbus
from machined.bus.objects import Dispatcher, Interface, Method
from tests.helpers.busdaemon import BusDaemon
from tests.helpers.client import set_destination

NAME = "org.example.Guarded"


async def call(bus: SdBus, path: str, interface: str) -> object:
    msg = bus.new_method_call_message(NAME, path, interface, "Guard")
    msg.append_data("s", "x")
    return (await bus.call_async(msg)).get_contents()


def signal(bus: SdBus, destination: str | None) -> None:
    msg = bus.new_signal_message("/t", "org.example.T", "Guard")
    msg.append_data("s", "x")
    if destination:
        set_destination(msg, destination)
    msg.send()


async def scenario(taken: list[str]) -> list[object]:
    server = sd_bus_open_system()
    dispatcher = Dispatcher(server)
    # the same member, privileged on one object and plain on another
    dispatcher.export("/t", Interface("org.example.T", methods=[
        Method("Guard", "s", ("x",), "s", ("y",),
               lambda _call, x: taken.append(x) or "taken " + x, privileged=True)]))
    dispatcher.export("/u", Interface("org.example.U", methods=[
        Method("Guard", "s", ("x",), "s", ("y",), lambda _call, x: "plain " + x)]))
    await server.request_name_async(NAME, 0)

    client = sd_bus_open_system()
    signal(client, None)  # broadcast
    signal(client, NAME)  # to the server: delivered whatever its match rules
    # The driver delivers one sender's messages in order: by these replies, a signal that
    # reached the server has been dispatched.
    got = [await call(client, "/t", "org.example.T"), await call(client, "/u", "org.example.U")]
    dispatcher.close()
    client.close()
    server.close()
    return got


def test_only_calls_to_the_guarded_object_are_taken_and_no_broadcast_signal_arrives(
        in_process_bus: BusDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    looked_at: list[str] = []
    taken: list[str] = []
    is_call_to = libsdbus.is_call_to

    def recording(ptr: int, path: bytes, interface: bytes, member: bytes) -> bool:
        looked_at.append(libsdbus.lib().sd_bus_message_get_path(ptr).decode())
        return is_call_to(ptr, path, interface, member)

    monkeypatch.setattr(libsdbus, "is_call_to", recording)
    assert asyncio.run(scenario(taken)) == ["taken x", "plain x"]
    # the signal sent to the server and both calls passed the rule, and only the first call
    # was taken; the broadcast signal never came
    assert looked_at == ["/t", "/t", "/u"]
    assert taken == ["x"]
