"""sdbus's method callback with the shortcuts of libsdbus.shortcut_method_callbacks, on a private
bus: method calls (plain and not) and signal callbacks work as before, and closing the
dispatcher gives sdbus its own functions back."""

from __future__ import annotations

import asyncio
import ctypes
import inspect

import pytest
from sdbus import sd_bus_internals
from sdbus.sd_bus_internals import SdBus, sd_bus_open_system

from machined.bus import libsdbus
from machined.bus.objects import Dispatcher, Interface, Method
from tests.helpers.busdaemon import BusDaemon

GLOBALS = ("asyncio_get_running_loop", "is_coroutine_function")


def sdbus_globals() -> dict[str, int | None]:
    so = ctypes.CDLL(sd_bus_internals.__file__)
    return {name: ctypes.c_void_p.in_dll(so, name).value for name in GLOBALS}


ORIGINALS = {"asyncio_get_running_loop": id(asyncio.get_running_loop),
             "is_coroutine_function": id(inspect.iscoroutinefunction)}


async def call(bus: SdBus, member: str, sig: str, *args: object) -> object:
    msg = bus.new_method_call_message("org.example.Shortcuts", "/t", "org.example.T", member)
    if sig:
        msg.append_data(sig, *args)
    return (await bus.call_async(msg)).get_contents()


async def scenario() -> list[object]:
    server = sd_bus_open_system()
    dispatcher = Dispatcher(server)
    during = sdbus_globals()
    assert all(during[name] != ORIGINALS[name] for name in GLOBALS)

    async def later(x: str) -> str:
        await asyncio.sleep(0)
        return x + "!"

    dispatcher.export("/t", Interface("org.example.T", methods=[
        Method("Upper", "s", ("x",), "s", ("y",), lambda _call, x: x.upper()),
        Method("Later", "s", ("x",), "s", ("y",), lambda _call, x: later(x)),
        Method("Plain", "u", ("n",), "u", ("m",), lambda n: n + 1, plain=True),
    ]))
    await server.request_name_async("org.example.Shortcuts", 0)

    signals: asyncio.Queue[object] = asyncio.Queue()
    slot = await server.match_signal_async(None, "/s", "org.example.S", "Ping",
                                           lambda msg: signals.put_nowait(msg.get_contents()))
    client = sd_bus_open_system()
    got = [await call(client, "Upper", "s", "abc"), await call(client, "Later", "s", "x"),
           await call(client, "Plain", "u", 41)]
    ping = client.new_signal_message("/s", "org.example.S", "Ping")
    ping.append_data("s", "pong")
    ping.send()
    got.append(await asyncio.wait_for(signals.get(), 5))
    del slot
    dispatcher.close()
    client.close()
    server.close()
    return got


def test_calls_and_signals_work_with_the_shortcuts_and_close_undoes_them(
        in_process_bus: BusDaemon) -> None:
    assert sdbus_globals() == ORIGINALS
    assert asyncio.run(scenario()) == ["ABC", "x!", 42, "pong"]
    assert sdbus_globals() == ORIGINALS


def test_globals_that_are_not_sdbus_own_are_left_alone() -> None:
    async def twice() -> None:
        undo = libsdbus.shortcut_method_callbacks(asyncio.get_running_loop())
        try:
            with pytest.raises(libsdbus.Unavailable):  # they point at the shortcuts now
                libsdbus.shortcut_method_callbacks(asyncio.get_running_loop())
        finally:
            undo()

    asyncio.run(twice())
    assert sdbus_globals() == ORIGINALS
