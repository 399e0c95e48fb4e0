"""Authorization (spec §4): root passes; others are asked about to polkit's CheckAuthorization."""

from __future__ import annotations

import logging

from sdbus.sd_bus_internals import SdBus

from ..core.errors import AccessDenied, InteractiveAuthorizationRequired, RemoteError
from . import client
from .objects import Call

log = logging.getLogger(__name__)

PREFIX = "org.freedesktop.machine1."
MANAGE_MACHINES = PREFIX + "manage-machines"
MANAGE_IMAGES = PREFIX + "manage-images"
_NO_POLKIT = ("org.freedesktop.DBus.Error.ServiceUnknown",
              "org.freedesktop.DBus.Error.NameHasNoOwner")


class Authority:
    def __init__(self, bus: SdBus) -> None:
        self.bus = bus

    async def check(self, call: Call, action: str, details: dict[str, str]) -> None:
        creds = await call.creds()
        if creds.uid == 0:
            return
        subject = ("system-bus-name", {"name": ("s", call.sender)})
        flags = 1 if call.interactive else 0
        try:
            (result,) = await client.call(
                self.bus, "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
                "org.freedesktop.PolicyKit1.Authority", "CheckAuthorization",
                "(sa{sv})sa{ss}us", subject, action, details, flags, "")
        except RemoteError as e:
            if e.name in _NO_POLKIT:
                raise AccessDenied("Permission denied") from None
            raise
        authorized, challenge, _details = result
        if authorized:
            return
        if challenge:
            raise InteractiveAuthorizationRequired()
        raise AccessDenied("Permission denied")
