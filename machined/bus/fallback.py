"""Objects under a path prefix served by ONE shared vtable, as 252 serves its Machine objects:
sd_bus_add_fallback_vtable() with a find callback, plus a node enumerator for introspection.

sdbus 0.14 exports only exact-path vtables, one SdBusInterface (~11 KiB) per object. It does not
wrap the fallback calls, so they are made here through ctypes on the sd-bus that sdbus links
statically, with the C vtable sdbus builds for a single SdBusInterface. sdbus's own C callbacks
expect that SdBusInterface as their userdata, so the find callback hands it back for every object
that exists. Property getters are not told the object path by sdbus; sd-bus always runs the find
callback for an object right before its getters, so the object found last is the one they read.

The struct layouts read below are sdbus 0.14's (pinned); `_check_layout` verifies them against
the live objects at start-up and refuses to run rather than guess.
"""

from __future__ import annotations

import ctypes
import errno
import logging
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

from sdbus import sd_bus_internals
from sdbus.sd_bus_internals import SdBus, SdBusInterface

log = logging.getLogger(__name__)

_P = ctypes.sizeof(ctypes.c_void_p)
_HEADER = 2 * _P  # PyObject_HEAD: ob_refcnt, ob_type

# int (*sd_bus_object_find_t)(sd_bus*, const char *path, const char *interface, void *userdata,
#                             void **ret_found, sd_bus_error *ret_error)
_FIND = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                         ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)
# int (*sd_bus_node_enumerator_t)(sd_bus*, const char *prefix, void *userdata, char ***ret_nodes,
#                                 sd_bus_error *ret_error)
_ENUMERATE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p,
                              ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)


class FallbackUnavailable(RuntimeError):
    pass


@cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(sd_bus_internals.__file__)
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    lib.sd_bus_add_fallback_vtable.argtypes = [vp, ctypes.POINTER(vp), cp, cp, vp, _FIND, vp]
    lib.sd_bus_add_fallback_vtable.restype = ctypes.c_int
    lib.sd_bus_add_node_enumerator.argtypes = [vp, ctypes.POINTER(vp), cp, _ENUMERATE, vp]
    lib.sd_bus_add_node_enumerator.restype = ctypes.c_int
    lib.sd_bus_slot_unref.argtypes = [vp]
    lib.sd_bus_slot_unref.restype = vp
    lib.sd_bus_get_fd.argtypes = [vp]
    lib.sd_bus_get_fd.restype = ctypes.c_int
    lib.sd_bus_get_current_message.argtypes = [vp]
    lib.sd_bus_get_current_message.restype = vp
    lib.sd_bus_message_get_sender.argtypes = [vp]
    lib.sd_bus_message_get_sender.restype = cp
    return lib


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None)
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.malloc.restype = ctypes.c_void_p
    libc.strdup.argtypes = [ctypes.c_char_p]
    libc.strdup.restype = ctypes.c_void_p
    return libc


def _field(obj: object, index: int) -> int | None:
    """The index-th pointer after the PyObject header of a C-level object."""
    return ctypes.c_void_p.from_address(id(obj) + _HEADER + index * _P).value


def _check_layout(bus: SdBus, iface: SdBusInterface) -> tuple[int, int]:
    """(sd_bus*, sd_bus_vtable*) of sdbus's objects, after checking the fields we read."""
    members = (iface.method_list, iface.method_dict, iface.property_list,
               iface.property_get_dict, iface.property_set_dict, iface.signal_list)
    if any(_field(iface, 1 + i) != id(m) for i, m in enumerate(members)):
        raise FallbackUnavailable("sdbus's SdBusInterface layout is not the expected one")
    iface._create_vtable()  # type: ignore[attr-defined]  # not in sdbus's stubs
    vtable = _field(iface, 7)
    bus_ptr = _field(bus, 0)
    if not vtable or not bus_ptr or _lib().sd_bus_get_fd(bus_ptr) != bus.get_fd():
        raise FallbackUnavailable("sdbus's SdBus layout is not the expected one")
    return bus_ptr, vtable


class FallbackVtable:
    """One interface for every object below `prefix` that `find(path)` knows.

    `find` maps an object path to the object or None; `children` lists the existing paths.
    `current` is the object of the call being dispatched (see the module docstring).
    """

    def __init__(self, bus: SdBus, prefix: str, interface: str, vtable: SdBusInterface,
                 find: Callable[[str], Any], children: Callable[[], Iterable[str]]) -> None:
        self.current: Any = None
        self._find = find
        self._children = children
        self._vtable = vtable  # owns the C vtable and the member names it points to
        bus_ptr, vtable_ptr = _check_layout(bus, vtable)
        self._bus_ptr = bus_ptr
        self._userdata = id(vtable)
        self._find_cb = _FIND(self._on_find)  # ctypes callbacks must outlive the slots
        self._enum_cb = _ENUMERATE(self._on_enumerate)
        lib = _lib()
        self._slots: list[ctypes.c_void_p] = []
        for add, args in (
            (lib.sd_bus_add_fallback_vtable,
             (prefix.encode(), interface.encode(), vtable_ptr, self._find_cb, None)),
            (lib.sd_bus_add_node_enumerator, (prefix.encode(), self._enum_cb, None)),
        ):
            slot = ctypes.c_void_p()
            r = add(bus_ptr, ctypes.byref(slot), *args)
            if r < 0:
                self.close()
                raise OSError(-r, f"Failed to add fallback vtable for {prefix}")
            self._slots.append(slot)

    def current_sender(self) -> str | None:
        """The sender of the message being dispatched (for paths like machine/self)."""
        lib = _lib()
        msg = lib.sd_bus_get_current_message(self._bus_ptr)
        sender = lib.sd_bus_message_get_sender(msg) if msg else None
        return sender.decode() if sender else None

    def close(self) -> None:
        for slot in self._slots:
            _lib().sd_bus_slot_unref(slot)
        self._slots.clear()

    def _on_find(self, _bus: int, path: bytes, _iface: bytes, _userdata: int,
                 ret_found: Any, _error: int) -> int:
        try:
            obj = self._find(path.decode())
        except Exception:  # noqa: BLE001 - never let an exception unwind into sd-bus
            log.exception("Object lookup failed for %r", path)
            return -errno.EIO
        self.current = obj
        if obj is None:
            return 0
        ret_found[0] = self._userdata
        return 1

    def _on_enumerate(self, _bus: int, _prefix: bytes, _userdata: int, ret_nodes: Any,
                      _error: int) -> int:
        try:
            paths = [p.encode() for p in self._children()]
        except Exception:  # noqa: BLE001
            log.exception("Object enumeration failed")
            return -errno.EIO
        # sd-bus takes ownership of a NULL-terminated malloc'ed strv and frees it.
        libc = _libc()
        array = libc.malloc((len(paths) + 1) * _P)
        if not array:
            return -errno.ENOMEM
        slots = (ctypes.c_void_p * (len(paths) + 1)).from_address(array)
        for i, p in enumerate(paths):
            slots[i] = libc.strdup(p)
        slots[len(paths)] = None
        ret_nodes[0] = array
        return 0
