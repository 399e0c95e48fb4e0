"""Calls to other services on the bus (systemd1, polkit, the bus driver)."""

from __future__ import annotations

from typing import Any

from sdbus.sd_bus_internals import SdBus, SdBusBaseError, SdBusLibraryError

from ..core.errors import RemoteError

DBUS_ERROR_FAILED = "org.freedesktop.DBus.Error.Failed"


def remote_error(exc: BaseException) -> RemoteError:
    """The error name and message of a failed call, whatever sdbus made of it."""
    name = getattr(type(exc), "dbus_error_name", None)
    args: tuple[object, ...] = tuple(getattr(exc, "args", ()))
    if name is None:
        # SdBusUnmappedMessageError carries (name, message)
        if len(args) >= 2 and isinstance(args[0], str):
            return RemoteError(args[0], str(args[1]))
        return RemoteError(DBUS_ERROR_FAILED, str(args[0]) if args else str(exc))
    return RemoteError(name, str(args[0]) if args else "")


async def call(
    bus: SdBus, destination: str, path: str, interface: str, member: str,
    signature: str = "", *args: Any,
) -> tuple[Any, ...]:
    msg = bus.new_method_call_message(destination, path, interface, member)
    if signature:
        msg.append_data(signature, *args)
    try:
        reply = await bus.call_async(msg)
    except SdBusBaseError as e:
        raise remote_error(e) from None
    return reply.parse_to_tuple()


async def get_property(
    bus: SdBus, destination: str, path: str, interface: str, name: str
) -> Any:
    (variant,) = await call(bus, destination, path, "org.freedesktop.DBus.Properties", "Get",
                            "ss", interface, name)
    return variant[1]


async def name_has_owner(bus: SdBus, name: str) -> bool:
    (has,) = await call(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                        "org.freedesktop.DBus", "NameHasOwner", "s", name)
    return bool(has)


async def connected(bus: SdBus) -> bool:
    """False once the connection to the bus is gone (the bus daemon stopped or restarted):
    sd-bus then refuses to send at all. Any answer, even an error or a timeout, means the
    connection is still there."""
    msg = bus.new_method_call_message("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                      "org.freedesktop.DBus", "GetId")
    try:
        await bus.call_async(msg)
    except SdBusLibraryError:
        return False
    except SdBusBaseError:
        pass
    return True

