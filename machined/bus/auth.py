"""Authorization (spec §4): root passes; others are asked about to polkit's CheckAuthorization.

As 252's sd-bus does it (bus_verify_polkit_async), polkit's answer does not let the waiting
handler go on: the call is run again from the start (Dispatcher, bus/objects.py), so its
arguments are checked and its machine or image looked up afresh, and the answer applies when
the run asks the same question again; a different question (the caller's machine changed
meanwhile, say) is ESTALE."""

from __future__ import annotations

import errno
import logging

from sdbus.sd_bus_internals import SdBus

from ..core.errors import (
    AccessDenied,
    ErrnoError,
    InteractiveAuthorizationRequired,
    MachinedError,
    RemoteError,
)
from . import client
from .objects import Call, PolkitAnswered

log = logging.getLogger(__name__)

PREFIX = "org.freedesktop.machine1."
MANAGE_MACHINES = PREFIX + "manage-machines"
MANAGE_IMAGES = PREFIX + "manage-images"
# polkit is not there: the caller is denied (252's list)
_NO_POLKIT = ("org.freedesktop.DBus.Error.ServiceUnknown",
              "org.freedesktop.DBus.Error.NameHasNoOwner",
              "org.freedesktop.systemd1.NoSuchUnit")


class Authority:
    def __init__(self, bus: SdBus) -> None:
        self.bus = bus

    async def check(self, call: Call, action: str, details: dict[str, str]) -> None:
        creds = await call.creds()
        if creds.uid == 0:
            return
        question = (action, tuple(details.items()))
        if call.polkit_answer is not None:  # the run again after polkit answered
            asked, refusal = call.polkit_answer
            if asked != question:
                raise ErrnoError(errno.ESTALE)
            if refusal is not None:
                raise refusal
            return
        raise PolkitAnswered((question, await self._ask(call, action, details)))

    async def _ask(self, call: Call, action: str,
                   details: dict[str, str]) -> MachinedError | None:
        """polkit's answer: None when authorized, else the error the caller gets."""
        subject = ("system-bus-name", {"name": ("s", call.sender)})
        flags = 1 if call.interactive else 0
        try:
            (result,) = await client.call(
                self.bus, "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
                "org.freedesktop.PolicyKit1.Authority", "CheckAuthorization",
                "(sa{sv})sa{ss}us", subject, action, details, flags, "")
        except RemoteError as e:
            return AccessDenied("Permission denied") if e.name in _NO_POLKIT else e
        authorized, challenge, _details = result
        if authorized:
            return None
        if challenge:
            return InteractiveAuthorizationRequired()
        return AccessDenied("Permission denied")
