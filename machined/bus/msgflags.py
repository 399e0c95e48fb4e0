"""Header flags sdbus does not expose: ALLOW_INTERACTIVE_AUTHORIZATION, read with the sd-bus
that sdbus links statically (so the struct layouts match), from the message pointer that
sdbus's message object holds right after its PyObject header."""

from __future__ import annotations

import ctypes
import logging
import sys
from functools import cache

from sdbus import sd_bus_internals
from sdbus.sd_bus_internals import SdBusMessage

log = logging.getLogger(__name__)


@cache
def _lib() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(sd_bus_internals.__file__)
        lib.sd_bus_message_get_allow_interactive_authorization.argtypes = [ctypes.c_void_p]
        lib.sd_bus_message_get_allow_interactive_authorization.restype = ctypes.c_int
        lib.sd_bus_message_get_member.argtypes = [ctypes.c_void_p]
        lib.sd_bus_message_get_member.restype = ctypes.c_char_p
        return lib
    except (OSError, AttributeError) as e:
        log.debug("sd-bus symbols not reachable: %s", e)
        return None


_HEADER = 2 * ctypes.sizeof(ctypes.c_void_p)  # ob_refcnt + ob_type


def allows_interactive_authorization(msg: SdBusMessage) -> bool:
    lib = _lib()
    if lib is None or hasattr(sys, "getobjects"):  # debug builds have a larger header
        return False
    ptr = ctypes.c_void_p.from_address(id(msg) + _HEADER).value
    if not ptr:
        return False
    member = lib.sd_bus_message_get_member(ptr)
    # Sanity check that the pointer really is this message before trusting the flag.
    if member is None or member.decode() != msg.member:
        return False
    return bool(lib.sd_bus_message_get_allow_interactive_authorization(ptr) > 0)
