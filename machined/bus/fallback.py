"""Objects under a path prefix served by ONE shared vtable, as 252 serves its Machine objects:
sd_bus_add_fallback_vtable() with a find callback, plus a node enumerator for introspection.

sdbus 0.14 exports only exact-path vtables, one SdBusInterface (~11 KiB) per object. It does not
wrap the fallback calls, so they are made through bus/libsdbus.py, with the C vtable sdbus builds
for a single SdBusInterface. sdbus's own C callbacks expect that SdBusInterface as their
userdata, so the find callback hands it back for every object that exists. Property getters are
not told the object path by sdbus; sd-bus always runs the find callback for an object right
before its getters, so the object found last is the one they read.

libsdbus checks the struct layouts it reads against the live objects at start-up and refuses to
run rather than guess.
"""

from __future__ import annotations

import ctypes
import errno
import logging
from collections.abc import Callable, Iterable
from typing import Any

from sdbus.sd_bus_internals import SdBus, SdBusInterface

from ..core.errors import ErrnoError
from . import libsdbus

log = logging.getLogger(__name__)


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
        bus_ptr = libsdbus.bus_pointer(bus)
        vtable_ptr = libsdbus.vtable_pointer(vtable)
        self._bus_ptr = bus_ptr
        self._userdata = id(vtable)
        self._find_cb = libsdbus.FIND(self._on_find)  # ctypes callbacks must outlive the slots
        self._enum_cb = libsdbus.ENUMERATE(self._on_enumerate)
        lib = libsdbus.lib()
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
        lib = libsdbus.lib()
        msg = lib.sd_bus_get_current_message(self._bus_ptr)
        sender = lib.sd_bus_message_get_sender(msg) if msg else None
        return sender.decode() if sender else None

    def close(self) -> None:
        for slot in self._slots:
            libsdbus.lib().sd_bus_slot_unref(slot)
        self._slots.clear()

    def _on_find(self, _bus: int, path: bytes, _iface: bytes, _userdata: int,
                 ret_found: Any, _error: int) -> int:
        try:
            obj = self._find(path.decode())
        except (OSError, ErrnoError) as e:  # the lookup's own failure: sd-bus answers its errno
            return -(e.errno or errno.EIO)  # (252: ENAMETOOLONG, ELOOP, ...)
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
        libc = libsdbus.libc()
        array = libc.malloc((len(paths) + 1) * ctypes.sizeof(ctypes.c_void_p))
        if not array:
            return -errno.ENOMEM
        slots = (ctypes.c_void_p * (len(paths) + 1)).from_address(array)
        for i, p in enumerate(paths):
            slots[i] = libc.strdup(p)
        slots[len(paths)] = None
        ret_nodes[0] = array
        return 0
