"""A test's own sdbus connection to a private bus, and calls whose outcome is plain data."""

from __future__ import annotations

import os
from typing import Any

from sdbus.sd_bus_internals import SdBus, SdBusBaseError, sd_bus_open_system

from machined.bus.client import remote_error

from .busdaemon import BusDaemon

DEST = "org.freedesktop.machine1"


def connect(bus: BusDaemon, timeout_usec: int = 20_000_000) -> SdBus:
    """A connection to `bus`; a hang shows as a Timeout error after `timeout_usec`."""
    old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
    try:
        conn: SdBus = sd_bus_open_system()
    finally:
        if old is None:
            del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old
    conn.method_call_timeout_usec = timeout_usec
    return conn


def outcome(conn: SdBus, path: str, iface: str, member: str, sig: str = "",
            *args: Any) -> tuple[str, Any]:
    """("ok", the reply's contents) or ("error", (name, message))."""
    msg = conn.new_method_call_message(DEST, path, iface, member)
    if sig:
        msg.append_data(sig, *args)
    try:
        reply = conn.call(msg)
    except SdBusBaseError as e:
        err = remote_error(e)
        return "error", (err.name, err.message)
    return "ok", reply.parse_to_tuple()
