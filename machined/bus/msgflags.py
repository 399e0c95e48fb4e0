"""Header flags sdbus does not expose: ALLOW_INTERACTIVE_AUTHORIZATION, read through
bus/libsdbus.py from the message pointer that sdbus's message object holds."""

from __future__ import annotations

from sdbus.sd_bus_internals import SdBusMessage

from . import libsdbus


def allows_interactive_authorization(msg: SdBusMessage) -> bool:
    ptr = libsdbus.message_pointer(msg)
    if ptr is None:
        return False
    return bool(libsdbus.lib().sd_bus_message_get_allow_interactive_authorization(ptr) > 0)
