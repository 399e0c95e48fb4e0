"""The one place that calls into the sd-bus sdbus is linked with, through ctypes, for
what sdbus 0.14 does not wrap: fallback vtables and node enumerators (bus/fallback.py), local
match callbacks (bus/privileged.py), message header flags (bus/msgflags.py), the order of a
vtable's members (for introspection in 252's order) and the two functions sdbus's method
callback calls on every call (`shortcut_method_callbacks`).

sdbus's Python objects hold their C pointers right after the PyObject header; the struct
layouts read here are sdbus 0.14's (pinned) and every accessor checks what it reads against
the live object before trusting it.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import itertools
import sys
from collections.abc import Callable
from functools import cache

from sdbus import sd_bus_internals
from sdbus.sd_bus_internals import SdBus, SdBusInterface, SdBusMessage

_P = ctypes.sizeof(ctypes.c_void_p)
_HEADER = 2 * _P  # PyObject_HEAD: ob_refcnt, ob_type

_vp, _cp, _int = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int

# int (*sd_bus_object_find_t)(sd_bus*, const char *path, const char *interface, void *userdata,
#                             void **ret_found, sd_bus_error *ret_error)
FIND = ctypes.CFUNCTYPE(_int, _vp, _cp, _cp, _vp, ctypes.POINTER(_vp), _vp)
# int (*sd_bus_node_enumerator_t)(sd_bus*, const char *prefix, void *userdata, char ***ret_nodes,
#                                 sd_bus_error *ret_error)
ENUMERATE = ctypes.CFUNCTYPE(_int, _vp, _cp, _vp, ctypes.POINTER(_vp), _vp)
# int (*sd_bus_message_handler_t)(sd_bus_message *m, void *userdata, sd_bus_error *ret_error)
HANDLER = ctypes.CFUNCTYPE(_int, _vp, _vp, _vp)


class Unavailable(RuntimeError):
    """sdbus's objects are not laid out as expected: do without the feature."""


@cache
def lib() -> ctypes.CDLL:
    so = ctypes.CDLL(sd_bus_internals.__file__)
    for name, restype, argtypes in (
        ("sd_bus_add_fallback_vtable", _int, [_vp, ctypes.POINTER(_vp), _cp, _cp, _vp, FIND, _vp]),
        ("sd_bus_add_node_enumerator", _int, [_vp, ctypes.POINTER(_vp), _cp, ENUMERATE, _vp]),
        ("sd_bus_add_match", _int, [_vp, ctypes.POINTER(_vp), _cp, HANDLER, _vp]),
        ("sd_bus_slot_unref", _vp, [_vp]),
        ("sd_bus_get_fd", _int, [_vp]),
        ("sd_bus_get_current_message", _vp, [_vp]),
        ("sd_bus_message_get_sender", _cp, [_vp]),
        ("sd_bus_message_get_member", _cp, [_vp]),
        ("sd_bus_message_get_path", _cp, [_vp]),
        ("sd_bus_message_is_method_call", _int, [_vp, _cp, _cp]),
        ("sd_bus_message_get_signature", _cp, [_vp, _int]),
        ("sd_bus_message_get_allow_interactive_authorization", _int, [_vp]),
        # sdbus's own: points an empty SdBusMessage at a message, taking a reference
        ("_SdBusMessage_set_messsage", None, [ctypes.py_object, _vp]),
    ):
        function = getattr(so, name)
        function.restype = restype
        function.argtypes = argtypes
    return so


@cache
def libc() -> ctypes.CDLL:
    c = ctypes.CDLL(None)
    c.malloc.argtypes = [ctypes.c_size_t]
    c.malloc.restype = ctypes.c_void_p
    c.strdup.argtypes = [ctypes.c_char_p]
    c.strdup.restype = ctypes.c_void_p
    return c


def _field(obj: object, index: int) -> int | None:
    """The index-th pointer after the PyObject header of a C-level object."""
    if hasattr(sys, "getobjects"):  # debug builds have a larger header
        raise Unavailable("a debug build of Python lays objects out differently")
    return ctypes.c_void_p.from_address(id(obj) + _HEADER + index * _P).value


def bus_pointer(bus: SdBus) -> int:
    """The sd_bus* of sdbus's bus object."""
    ptr = _field(bus, 0)
    if not ptr or lib().sd_bus_get_fd(ptr) != bus.get_fd():
        raise Unavailable("sdbus's SdBus layout is not the expected one")
    return ptr


def vtable_pointer(iface: SdBusInterface) -> int:
    """The sd_bus_vtable* sdbus builds for an interface (built here if not yet)."""
    members = (iface.method_list, iface.method_dict, iface.property_list,
               iface.property_get_dict, iface.property_set_dict, iface.signal_list)
    if any(_field(iface, 1 + i) != id(m) for i, m in enumerate(members)):
        raise Unavailable("sdbus's SdBusInterface layout is not the expected one")
    iface._create_vtable()  # type: ignore[attr-defined]  # not in sdbus's stubs
    ptr = _field(iface, 7)
    if not ptr:
        raise Unavailable("sdbus built no vtable")
    return ptr


# sd_bus_vtable (sd-bus-vtable.h): a type byte and 56 bits of flags, then a union whose largest
# member, the method's, is six pointers; the START entry records that size.
_VTABLE_ENTRY = 8 + 6 * _P
_START, _END, _METHOD, _SIGNAL, _PROPERTY, _WRITABLE = b"<", b">", b"M", b"S", b"P", b"W"
# 252's vtables declare properties, then methods, then signals; sdbus writes methods first.
# sd-bus introspects members in vtable order and finds them by name, so only the order changes.
_ORDER_252 = {_PROPERTY: 0, _WRITABLE: 0, _METHOD: 1, _SIGNAL: 2}


def order_members_as_252(iface: SdBusInterface) -> None:
    """Reorder the vtable sdbus builds for iface (before it is added to a bus) as 252 orders
    its own: properties, methods, signals, each kind in the order it was added."""
    base = vtable_pointer(iface)
    if ctypes.string_at(base, 1) != _START or \
            ctypes.c_size_t.from_address(base + 8).value != _VTABLE_ENTRY:
        raise Unavailable("sd_bus_vtable is not laid out as expected")
    entries = []
    at = base + _VTABLE_ENTRY
    while (kind := ctypes.string_at(at, 1)) != _END:
        if kind not in _ORDER_252:
            raise Unavailable(f"unexpected sd_bus_vtable entry type {kind!r}")
        entries.append((kind, ctypes.string_at(at, _VTABLE_ENTRY)))
        at += _VTABLE_ENTRY
    entries.sort(key=lambda entry: _ORDER_252[entry[0]])  # stable: each kind keeps its order
    ctypes.memmove(base + _VTABLE_ENTRY, b"".join(raw for _kind, raw in entries),
                   len(entries) * _VTABLE_ENTRY)


def message_pointer(msg: SdBusMessage) -> int | None:
    """The sd_bus_message* of sdbus's message object, or None if it cannot be told safely."""
    try:
        ptr = _field(msg, 0)
    except Unavailable:
        return None
    if not ptr:
        return None
    member = lib().sd_bus_message_get_member(ptr)
    # The pointer really is this message's before anything is read through it.
    return ptr if member is not None and member.decode() == msg.member else None


def wrap_message(ptr: int) -> SdBusMessage:
    """An sdbus message object for a message sd-bus hands to a ctypes callback."""
    msg = SdBusMessage()
    lib()._SdBusMessage_set_messsage(msg, ptr)
    return msg


def check_wrap_message(bus: SdBus) -> None:
    """A message object made by wrap_message points at the message it was given."""
    probe = bus.new_method_call_message("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                        "org.freedesktop.DBus", "GetId")
    ptr = message_pointer(probe)
    if ptr is None or message_pointer(wrap_message(ptr)) != ptr:
        raise Unavailable("sdbus's SdBusMessage layout is not the expected one")


def is_call_to(ptr: int, path: bytes, interface: bytes, member: bytes) -> bool:
    """The message is a method call of interface.member on the object at path."""
    return bool(lib().sd_bus_message_is_method_call(ptr, interface, member) > 0
                and lib().sd_bus_message_get_path(ptr) == path)


def signature(ptr: int) -> str:
    """The complete signature of a message's body."""
    sig = lib().sd_bus_message_get_signature(ptr, 1)
    return sig.decode() if sig else ""


_KEPT: list[object] = []


def shortcut_method_callbacks(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Give sdbus's method callback cheaper equivalents of the two functions it calls on every
    incoming call; returns what puts the originals back.

    sdbus keeps `asyncio.get_running_loop` and `inspect.iscoroutinefunction` in C globals of its
    module, and its method callback calls both for every call: the first makes a getpid()
    system call on Python 3.11, the second five Python calls. Together they were about 3,500 of
    a lookup's 28,000 instructions (docs/benchmarks.md). In our daemon their answers never
    change: one event loop runs for the daemon's whole life, and no method callback is a
    coroutine function (bus/objects.py builds them all, and checks). So the globals get C
    callables that give the same answers at once: the loop (sdbus's signal callbacks and its
    loop binding ask for it too, and get the same one) and False.
    """
    so = ctypes.CDLL(sd_bus_internals.__file__)
    try:
        slots = {name: ctypes.c_void_p.in_dll(so, name)
                 for name in ("asyncio_get_running_loop", "is_coroutine_function")}
    except ValueError as e:  # a build that does not export them
        raise Unavailable(str(e)) from None
    originals = {"asyncio_get_running_loop": asyncio.get_running_loop,
                 "is_coroutine_function": inspect.iscoroutinefunction}
    if any(slot.value != id(originals[name]) for name, slot in slots.items()):
        raise Unavailable("sdbus's module globals are not the expected ones")
    shortcuts = {"asyncio_get_running_loop": itertools.repeat(loop).__next__,
                 "is_coroutine_function": frozenset().__contains__}
    _KEPT.extend(shortcuts.values())  # sdbus does not own what its globals point to now
    for name, slot in slots.items():
        slot.value = id(shortcuts[name])

    def undo() -> None:
        for name, slot in slots.items():
            if slot.value == id(shortcuts[name]):
                slot.value = id(originals[name])

    return undo
