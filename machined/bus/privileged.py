"""The methods 252 leaves privileged (Create*, Register*, OpenMachinePTY), answered before
sd-bus's object dispatch, with the same access check made from the caller's cached credentials.

Why: sd-bus checks the caller of a privileged method with a synchronous call to the bus driver
(GetConnectionUnixUser, from sd_bus_query_sender_privilege) on every call; that round trip was the
largest part of what a RegisterMachine cost. A connection's credentials never change (the
driver records them when the peer connects), so asking once per connection answers the same
question. The vtable keeps the methods privileged, because that flag is also what puts the
`org.freedesktop.systemd1.Privileged` annotation into sd-bus's introspection.

How: sd-bus runs local match callbacks before it looks at object vtables (process_match comes
before bus_process_object), so one match rule per method gets its calls first (a rule on the
member alone, local to sd-bus: see _add_match). The callback does what sd-bus's method dispatch
would do, in the same order: the access check ("Access to I.M() not permitted."), then the
signature check ("Invalid arguments ..."), then the method's handler. A call it cannot take
(its credentials cannot be looked up, say) goes on to the vtable, which answers it exactly as
before.

The same kind of match vets the values of writable properties (`vet`): sdbus's property path
answers an exception in a setter with Failed and no message, where 252's setters say
"Invalid log level '...'"; a privileged caller's bad value is answered here, with the message,
and everything else about the Set (access, signature, the setter) stays sd-bus's.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from typing import Any

from sdbus.sd_bus_internals import SdBus, SdBusMessage

from ..core.errors import AccessDenied, InvalidArgs
from . import libsdbus

log = logging.getLogger(__name__)


def sender_is_privileged(sender_uid: int, our_uid: int) -> bool:
    """sd_bus_query_sender_privilege() on a bus whose driver tells no capabilities (dbus-daemon):
    the caller runs as our UID, or as root when we are not root."""
    return sender_uid == our_uid or (our_uid != 0 and sender_uid == 0)


class PrivilegedMethods:
    """Match callbacks for privileged methods; `uid_of(sender)` is the caller's UID (cached per
    connection) and may raise when the driver cannot tell it; `refuse(msg, error)` answers a
    call with an error, as the dispatcher answers any other."""

    def __init__(self, bus: SdBus, uid_of: Callable[[str], int],
                 refuse: Callable[[SdBusMessage, BaseException], None]) -> None:
        self._bus = bus
        self._bus_ptr = libsdbus.bus_pointer(bus)
        libsdbus.check_wrap_message(bus)
        self._uid_of = uid_of
        self._refuse = refuse
        self._our_uid = os.getuid()
        self._slots: list[Any] = []
        self._callbacks: list[Any] = []  # ctypes callbacks must outlive their slots

    def intercept(self, path: str, interface: str, member: str, signature: str,
                  dispatch: Callable[[SdBusMessage], None]) -> None:
        denied = f"Access to {interface}.{member}() not permitted."

        def on_call(msg_ptr: int, _userdata: int, _error: int) -> int:
            try:
                msg = libsdbus.wrap_message(msg_ptr)
                uid = self._uid_of(msg.sender or "")
            except Exception as e:  # noqa: BLE001 - sd-bus's own path answers this call
                log.debug("Leaving %s.%s() to sd-bus: %s", interface, member, e)
                return 0
            try:
                if not sender_is_privileged(uid, self._our_uid):
                    self._refuse(msg, AccessDenied(denied))
                    return 1
                got = libsdbus.signature(msg_ptr)
                if got != signature:
                    self._refuse(msg, InvalidArgs(
                        f"Invalid arguments '{got}' to call {interface}.{member}(), "
                        f"expecting '{signature}'."))
                    return 1
                dispatch(msg)
            except Exception:  # never unwind into sd-bus; dispatch answers its own errors
                log.exception("Failed to dispatch %s.%s()", interface, member)
            return 1

        self._add_match(path, interface, member, on_call)

    def vet(self, path: str, interface: str, member: str, signature: str,
            refusal: Callable[[SdBusMessage], BaseException | None]) -> None:
        """A call that sd-bus dispatches itself, looked at first: when the caller is privileged,
        the signature is `signature` and `refusal(msg)` gives an error, the call is answered
        with it; every other call goes on to sd-bus, which answers it as before."""

        def on_call(msg_ptr: int, _userdata: int, _error: int) -> int:
            try:
                if libsdbus.signature(msg_ptr) != signature:
                    return 0
                msg = libsdbus.wrap_message(msg_ptr)
                if not sender_is_privileged(self._uid_of(msg.sender or ""), self._our_uid):
                    return 0
                error = refusal(msg)
                if error is None:
                    return 0
                self._refuse(msg, error)
                return 1
            except Exception as e:  # noqa: BLE001 - sd-bus's own path answers this call
                log.debug("Leaving %s.%s() to sd-bus: %s", interface, member, e)
                return 0

        self._add_match(path, interface, member, on_call)

    def _add_match(self, path: str, interface: str, member: str,
                   on_call: Callable[[int, int, int], int]) -> None:
        # The rule names the member only, and the callback checks the rest. sd-bus tests every
        # message it receives against its match rules, one hash lookup per key a rule has, and
        # type, path and interface keys cost every lookup call about 1,300 instructions more
        # (docs/benchmarks.md); only calls of these few members reach the callback.
        rule = f"member='{member}'"
        want = (path.encode(), interface.encode(), member.encode())

        def on_message(msg_ptr: int, userdata: int, error: int) -> int:
            if not libsdbus.is_call_to(msg_ptr, *want):
                return 0
            return on_call(msg_ptr, userdata, error)

        callback = libsdbus.HANDLER(on_message)
        slot = ctypes.c_void_p()
        r = libsdbus.lib().sd_bus_add_match(self._bus_ptr, ctypes.byref(slot),
                                            rule.encode(), callback, None)
        if r < 0:
            raise OSError(-r, f"Failed to add match {rule}")
        self._slots.append(slot)
        self._callbacks.append(callback)
        self._drop_from_driver(rule)

    def _drop_from_driver(self, rule: str) -> None:
        """sd-bus also gives the bus driver each rule (AddMatch), which would have dbus-daemon
        test every message on the bus against it and send us any signal of that name. Calls
        addressed to us arrive without it, so the driver's copy goes again; sd-bus's own
        RemoveMatch when the slot goes is then refused by the driver, and ignored."""
        msg = self._bus.new_method_call_message("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                                "org.freedesktop.DBus", "RemoveMatch")
        msg.append_data("s", rule)
        msg.expect_reply = False
        msg.send()

    def close(self) -> None:
        for slot in self._slots:
            libsdbus.lib().sd_bus_slot_unref(slot)
        self._slots.clear()

