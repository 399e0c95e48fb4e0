"""Interfaces described as data, exported through sdbus's low-level vtables, and one dispatcher
that turns handler results and exceptions into replies.

Handlers take (call, *arguments) and return the result, or an awaitable of it; plain handlers
(the lookups clients make most) take only the arguments and answer at once. Methods are
marked unprivileged for sd-bus (we authorize ourselves) except the ones 252 leaves privileged,
so that introspection shows the same `org.freedesktop.systemd1.Privileged` annotations; their
calls are taken before sd-bus's dispatch by bus/privileged.py, which answers "Access to ... not
permitted." for non-root callers as sd-bus would (and leaves to sd-bus what it cannot check).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import sdbus
from sdbus.sd_bus_internals import SdBus, SdBusInterface, SdBusMessage

from ..core.eager import Resumed, keep_task, run_until_wait
from ..core.errors import MachinedError, UnknownObject
from . import client, libsdbus
from .errors import to_dbus
from .fallback import FallbackVtable
from .libsdbus import Unavailable
from .msgflags import allows_interactive_authorization
from .privileged import PrivilegedMethods

log = logging.getLogger(__name__)

# What handlers return when they reply later: futures, or coroutines that had to wait.
_AWAITABLES = (Resumed, asyncio.Future)


@dataclass(frozen=True)
class Method:
    name: str
    in_sig: str
    in_names: tuple[str, ...]
    out_sig: str
    out_names: tuple[str, ...]
    handler: Callable[..., Any]
    privileged: bool = False
    # The handler takes only the arguments, not the Call, and returns the result itself (or
    # WithCaller): dispatched with the least work per call, for the lookups on the hot path.
    plain: bool = False


@dataclass(frozen=True, slots=True)
class WithCaller:
    """What a plain handler returns when the answer needs the caller after all (GetMachineByPID
    of PID 0): `answer(call)` gives the result, or an awaitable of it."""

    answer: Callable[[Call], Any]


CONST = "const"
FALSE = "false"


@dataclass(frozen=True)
class Property:
    name: str
    sig: str
    getter: Callable[..., Any]  # () -> value, or (object) -> value for fallback interfaces
    emits: str = FALSE  # EmitsChangedSignal annotation: "const" or "false"
    hidden: bool = False
    setter: Callable[[Any], None] | None = None
    # A bad value for the setter: raises the error (InvalidArgs, say) the Set call gets, with
    # its message (sdbus's own property path would answer Failed with none).
    check: Callable[[Any], object] | None = None


@dataclass(frozen=True)
class Signal:
    name: str
    sig: str
    names: tuple[str, ...]


@dataclass
class Interface:
    name: str
    properties: list[Property] = field(default_factory=list)
    methods: list[Method] = field(default_factory=list)
    signals: list[Signal] = field(default_factory=list)


@dataclass(frozen=True)
class Creds:
    uid: int
    pid: int


class PolkitAnswered(Exception):  # noqa: N818 - not an error: the call is run again
    """polkit answered the call's question ((action, details), the refusal or None): the call
    is run again from the start with that answer (see bus/auth.py)."""

    def __init__(self, answer: tuple[Any, BaseException | None]) -> None:
        super().__init__("polkit answered")
        self.answer = answer


class Call:
    """One incoming method call, with lazy access to who sent it."""

    __slots__ = ("msg", "_dispatcher", "polkit_answer")

    def __init__(self, dispatcher: Dispatcher, msg: SdBusMessage,
                 polkit_answer: tuple[Any, BaseException | None] | None = None) -> None:
        self.msg = msg
        self._dispatcher = dispatcher
        self.polkit_answer = polkit_answer

    @property
    def sender(self) -> str:
        return self.msg.sender or ""

    async def creds(self) -> Creds:
        return await self._dispatcher.creds(self.sender)

    @property
    def interactive(self) -> bool:
        return allows_interactive_authorization(self.msg)


# Credentials cached for the most recent callers. A connection's credentials never change (the
# driver records them when it connects) and unique names are never reused, so an entry is never
# wrong, only kept. Not dropped on NameOwnerChanged: a signal match puts a message-type key into
# sd-bus's match tree, and with the cgroupfs backend (no other signal matches) every incoming
# call would pay for it (about 900 instructions of a 23,000-instruction lookup).
CREDS_KEPT = 1024


class Dispatcher:
    def __init__(self, bus: SdBus) -> None:
        self.bus = bus
        self._tasks: set[asyncio.Task[None]] = set()
        self._creds: dict[str, Creds] = {}
        # sd-bus drops an object when its vtable object is garbage-collected: keep them here.
        self._exports: dict[tuple[str, str], SdBusInterface] = {}
        self._privileged: PrivilegedMethods | None = None
        self._undo_shortcuts: Callable[[], None] | None = None
        self._held: list[tuple[str, str, str, str, tuple[Any, ...]]] | None = None
        try:
            self._undo_shortcuts = libsdbus.shortcut_method_callbacks(asyncio.get_running_loop())
        except Unavailable as e:  # each call then costs sdbus's own checks, nothing else changes
            log.warning("sdbus's method callback keeps its per-call checks: %s", e)

    # ------------------------------------------------------------- credentials
    async def creds(self, sender: str) -> Creds:
        cached = self._creds.get(sender)
        if cached is not None:
            return cached
        (info,) = await client.call(self.bus, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                    "org.freedesktop.DBus", "GetConnectionCredentials", "s",
                                    sender)
        return self._remember_creds(sender, info)

    def creds_now(self, sender: str) -> Creds:
        """creds() without awaiting, for sd-bus callbacks that must answer at once (object
        lookups): a blocking call to the bus driver when not cached, as sd-bus does itself."""
        cached = self._creds.get(sender)
        if cached is not None:
            return cached
        msg = self.bus.new_method_call_message("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                               "org.freedesktop.DBus", "GetConnectionCredentials")
        msg.append_data("s", sender)
        (info,) = self.bus.call(msg).parse_to_tuple()
        return self._remember_creds(sender, info)

    def _remember_creds(self, sender: str, info: dict[str, tuple[str, Any]]) -> Creds:
        creds = Creds(uid=int(info["UnixUserID"][1]), pid=int(info.get("ProcessID", ("u", 0))[1]))
        if len(self._creds) >= CREDS_KEPT:
            del self._creds[next(iter(self._creds))]  # the one cached longest
        self._creds[sender] = creds
        return creds

    # ------------------------------------------------------------- export
    def export(self, path: str, iface: Interface) -> None:
        dispatchers = {m.name: self._callback(m) for m in iface.methods}
        vtable = self._vtable(iface, lambda m: dispatchers[m.name], _getter)
        self.bus.add_interface(vtable, path, iface.name)
        self._exports[(path, iface.name)] = vtable
        for method in iface.methods:
            if method.privileged:
                self._intercept(path, iface.name, method, dispatchers[method.name])
        checked = {p.name: p for p in iface.properties if p.setter and p.check}
        if checked:
            self._vet_property_values(path, iface.name, checked)

    def _privileged_methods(self) -> PrivilegedMethods:
        if self._privileged is None:
            self._privileged = PrivilegedMethods(
                self.bus, lambda sender: self.creds_now(sender).uid, self._reply_error)
        return self._privileged

    def _intercept(self, path: str, interface: str, method: Method,
                   dispatch: Callable[[SdBusMessage], None]) -> None:
        """Privileged calls checked with cached credentials (see bus/privileged.py); without
        the interception sd-bus checks them itself, with a bus round trip per call."""
        try:
            self._privileged_methods().intercept(path, interface, method.name, method.in_sig,
                                                 dispatch)
        except (Unavailable, OSError) as e:
            log.warning("Leaving the access check of %s.%s() to sd-bus: %s", interface,
                        method.name, e)

    def _vet_property_values(self, path: str, interface: str,
                             checked: dict[str, Property]) -> None:
        """Properties.Set of a bad value is answered with the check's error and message, as
        252's own setters answer; the rest of a Set (access, signature, the setter) is sd-bus's."""

        def refusal(msg: SdBusMessage) -> BaseException | None:
            name, prop_name, (sig, value) = msg.parse_to_tuple()
            prop = checked.get(prop_name) if name == interface else None
            if prop is None or prop.check is None or sig != prop.sig:
                return None
            try:
                prop.check(value)
            except MachinedError as e:
                return e
            return None

        try:
            self._privileged_methods().vet(path, "org.freedesktop.DBus.Properties", "Set",
                                           "ssv", refusal)
        except (Unavailable, OSError) as e:
            log.warning("Bad values of %s's properties get no message: %s", interface, e)

    def export_fallback(self, prefix: str, iface: Interface, find: Callable[[str], Any],
                        children: Callable[[], Iterable[str]]) -> FallbackVtable:
        """Serve `iface` for every object below `prefix` that `find(path)` returns.

        Handlers take (call, object, *arguments) and property getters take (object).
        """
        holder: list[FallbackVtable] = []

        def method_callback(method: Method) -> Callable[[SdBusMessage], None]:
            def on_object(call: Call, *args: Any) -> Any:
                obj = find(call.msg.path or "")
                if obj is None:
                    raise UnknownObject(call.msg.path or "")
                return method.handler(call, obj, *args)

            return self._callback(replace(method, handler=on_object))

        def getter(prop: Property) -> Callable[[SdBusMessage], None]:
            def get(msg: SdBusMessage) -> None:
                msg.append_data(prop.sig, prop.getter(holder[0].current))

            return get

        fallback = FallbackVtable(self.bus, prefix, iface.name,
                                  self._vtable(iface, method_callback, getter), find, children)
        holder.append(fallback)
        return fallback

    @staticmethod
    def _vtable(iface: Interface, callback: Callable[[Method], Callable[[SdBusMessage], None]],
                getter: Callable[[Property], Callable[[SdBusMessage], None]]) -> SdBusInterface:
        vtable = SdBusInterface()
        for prop in iface.properties:
            flags = sdbus.DbusPropertyConstFlag if prop.emits == CONST else 0
            if prop.hidden:
                flags |= sdbus.DbusHiddenFlag
            vtable.add_property(prop.name, prop.sig, getter(prop), _setter(prop), flags)
        for method in iface.methods:
            flags = 0 if method.privileged else sdbus.DbusUnprivilegedFlag
            dispatch = callback(method)
            if inspect.iscoroutinefunction(dispatch):  # see libsdbus.shortcut_method_callbacks
                raise TypeError(f"{method.name}: sdbus is told no method callback is a coroutine")
            vtable.add_method(method.name, method.in_sig, list(method.in_names), method.out_sig,
                              list(method.out_names), flags, dispatch)
        for sig in iface.signals:
            vtable.add_signal(sig.name, sig.sig, list(sig.names), 0)
        try:
            libsdbus.order_members_as_252(vtable)
        except Unavailable as e:  # introspection then lists methods first, nothing else changes
            log.warning("Introspection keeps sdbus's member order: %s", e)
        return vtable

    def hold_signals(self) -> None:
        """Keep the signals emitted from now on until release_signals(). Sent before the daemon
        owns its bus name, a signal misses every client whose match names the sender
        org.freedesktop.machine1, as most clients' do."""
        self._held = []

    def release_signals(self) -> None:
        held, self._held = self._held or [], None
        for path, interface, member, signature, args in held:
            self.emit(path, interface, member, signature, *args)

    def emit(self, path: str, interface: str, member: str, signature: str, *args: Any) -> None:
        if self._held is not None:
            self._held.append((path, interface, member, signature, args))
            return
        msg = self.bus.new_signal_message(path, interface, member)
        msg.append_data(signature, *args)
        msg.send()

    # ------------------------------------------------------------- dispatch
    def _callback(self, method: Method) -> Callable[[SdBusMessage], None]:
        handler = method.handler
        reply = _replier(method)
        if method.plain:
            if "h" in method.out_sig or len(method.out_names) != 1:
                raise ValueError(f"{method.name}: a plain handler returns one value, not fds")
            sig = method.out_sig

            # Every step saved here counts: a lookup from one caller waits for all of it (the
            # reply is made here rather than by `reply`, one Python call less).
            def dispatch_plain(msg: SdBusMessage) -> None:
                try:
                    result = handler(*msg.parse_to_tuple())
                    if type(result) is WithCaller:
                        self._settle(msg, reply, result.answer(Call(self, msg)))
                    elif msg.expect_reply:
                        answer = msg.create_reply()
                        answer.append_data(sig, result)
                        answer.send()
                except BaseException as e:  # noqa: BLE001 - every failure becomes a reply
                    self._reply_error(msg, e)

            return dispatch_plain

        def dispatch(msg: SdBusMessage) -> None:
            def run(call: Call) -> Any:
                return handler(call, *msg.parse_to_tuple())

            try:
                self._settle(msg, reply, run(Call(self, msg)), run)
            except BaseException as e:  # noqa: BLE001 - every failure becomes a reply
                self._reply_error(msg, e)

        return dispatch

    def _settle(self, msg: SdBusMessage, reply: Callable[[SdBusMessage, Any], None],
                result: Any, run: Callable[[Call], Any] | None = None) -> None:
        """Reply with a handler's result now, or once its awaitable has it."""
        if type(result) is types.CoroutineType:  # most never wait: see core.eager
            finished, result = run_until_wait(result)
            if finished:
                reply(msg, result)
                return
        if isinstance(result, _AWAITABLES):  # cheaper than inspect.isawaitable
            keep_task(self._finish(msg, reply, result, run), self._tasks)
            return
        reply(msg, result)

    async def _finish(self, msg: SdBusMessage, reply: Callable[[SdBusMessage, Any], None],
                      awaitable: Any, run: Callable[[Call], Any] | None) -> None:
        try:
            try:
                result = await awaitable
            except PolkitAnswered as answered:
                if run is None:
                    raise
                # run again from the start with the answer, as 252's sd-bus does
                self._settle(msg, reply, run(Call(self, msg, answered.answer)))
                return
            reply(msg, result)
        except asyncio.CancelledError:
            raise  # the daemon is stopping: no reply, as 252 gives none when it exits
        except BaseException as e:  # noqa: BLE001
            self._reply_error(msg, e)

    @staticmethod
    def _reply_error(msg: SdBusMessage, exc: BaseException) -> None:
        name, text = to_dbus(exc)
        if not msg.expect_reply:
            return
        try:
            msg.create_error_reply(name, text).send()
        except Exception:
            log.exception("Failed to send error reply %s", name)

    async def drain(self) -> None:
        """Cancel the calls still waiting, and let them end before the bus goes."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        if self._privileged is not None:
            self._privileged.close()
        if self._undo_shortcuts is not None:
            self._undo_shortcuts()


def _replier(method: Method) -> Callable[[SdBusMessage, Any], None]:
    """How `method` sends its result, worked out once rather than per call."""
    sig = method.out_sig
    several = len(method.out_names) > 1

    def reply(msg: SdBusMessage, result: Any) -> None:
        if not msg.expect_reply:
            return
        message = msg.create_reply()
        if several:
            message.append_data(sig, *result)
        elif sig:  # one result (Image methods leave it unnamed, as 252 does)
            message.append_data(sig, result)
        message.send()

    if "h" not in sig:
        return reply

    def reply_with_fds(msg: SdBusMessage, result: Any) -> None:
        try:
            reply(msg, result)
        finally:
            # sd-bus sends copies of the file descriptors of a reply ('h'): close ours
            _close_fds(sig, result)

    return reply_with_fds


def _close_fds(signature: str, result: Any) -> None:
    """Close the fds of a result whose top-level values of type 'h' are handlers' own fds."""
    values = result if isinstance(result, tuple) else (result,)
    for sig, value in zip(_top_level(signature), values, strict=False):
        if sig == "h" and isinstance(value, int):
            with contextlib.suppress(OSError):
                os.close(value)


def _top_level(signature: str) -> list[str]:
    return list(signature) if all(c not in "a({" for c in signature) else []


def _getter(prop: Property) -> Callable[[SdBusMessage], None]:
    def get(msg: SdBusMessage) -> None:
        msg.append_data(prop.sig, prop.getter())

    return get


def _setter(prop: Property) -> Callable[[SdBusMessage], None] | None:
    if prop.setter is None:
        return None
    setter = prop.setter

    def set_(msg: SdBusMessage) -> None:
        setter(msg.get_contents())

    return set_
