"""Scopes through org.freedesktop.systemd1, as systemd-machined 252 does it (§6.3, §6.6, §6.9)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from sdbus.sd_bus_internals import SdBus, SdBusMessage

from ..bus import client
from ..bus.errors import remote_errno
from ..core import eager
from ..core.errors import ErrnoError, RemoteError
from ..core.machine import Machine, MachineClass
from ..core.names import bus_label_escape, bus_label_unescape, machine_scope_name
from ..core.ports import ScopeProperties
from ..linux.process import pid_exists
from . import common

log = logging.getLogger(__name__)

SYSTEMD1 = "org.freedesktop.systemd1"
SYSTEMD1_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
_GONE = ("org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.systemd1.LoadFailed")
# What a call gets when PID 1 re-executes (systemctl daemon-reexec) before answering it: its old
# bus connection goes, with the calls it had not read, once the new PID 1 is on the bus. (sd-bus
# gives its own call timeout the same name, with another message.)
_CUT_SHORT = "org.freedesktop.DBus.Error.NoReply"
_RECIPIENT_GONE = "Message recipient disconnected from message bus without replying"
# How long the new PID 1 may take to own its name again after that; then the call is sent once
# more. 252 does not retry (its calls happen to succeed only when it was blocked meanwhile).
REEXEC_WAIT = 5.0


def unit_path(unit: str) -> str:
    return UNIT_PATH_PREFIX + bus_label_escape(unit)


class Systemd1Backend:
    name = "systemd1"

    def __init__(self, bus: SdBus) -> None:
        self.bus = bus
        self._owner: str | None = None  # systemd1's unique name, as last asked
        # signals held, in order, while the owner is asked again (see _from_systemd1)
        self._held: list[tuple[SdBusMessage, Callable[[SdBusMessage], None]]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def subscribe(
        self,
        job_removed: Callable[[str, str, str], None],
        unit_changed: Callable[[str], None],
        reloaded: Callable[[], None],
    ) -> None:
        """The four matches of §1.2 step 6, then Subscribe() (its failure is ignored).

        Only signals from systemd1 itself count: any client may send a signal to the daemon
        directly, and sd-bus matches its sender by name only when the bus routes it. (252 takes
        a JobRemoved from anyone: a forged one fails a CreateMachine whose job is running.)"""

        def on_job_removed(msg: SdBusMessage) -> None:
            try:
                _id, job, unit, result = msg.parse_to_tuple()
            except Exception:
                return
            job_removed(job, unit, result)

        def on_unit_removed(msg: SdBusMessage) -> None:
            try:
                unit, _path = msg.parse_to_tuple()
            except Exception:
                return
            unit_changed(unit)

        def on_properties_changed(msg: SdBusMessage) -> None:
            path = msg.path or ""
            if path.startswith(UNIT_PATH_PREFIX):
                unit_changed(bus_label_unescape(path[len(UNIT_PATH_PREFIX):]))

        def on_reloading(msg: SdBusMessage) -> None:
            try:
                (active,) = msg.parse_to_tuple()
            except Exception:
                return
            if not active:
                reloaded()

        with contextlib.suppress(RemoteError):  # else asked with the first signal
            self._owner = await self._systemd1_owner()
        from_systemd1 = self._from_systemd1
        self._slots = [
            await self.bus.match_signal_async(SYSTEMD1, SYSTEMD1_PATH, MANAGER, "JobRemoved",
                                              from_systemd1(on_job_removed)),
            await self.bus.match_signal_async(SYSTEMD1, SYSTEMD1_PATH, MANAGER, "UnitRemoved",
                                              from_systemd1(on_unit_removed)),
            await self.bus.match_signal_async(SYSTEMD1, None, "org.freedesktop.DBus.Properties",
                                              "PropertiesChanged",
                                              from_systemd1(on_properties_changed)),
            await self.bus.match_signal_async(SYSTEMD1, SYSTEMD1_PATH, MANAGER, "Reloading",
                                              from_systemd1(on_reloading)),
        ]
        try:
            await self._manager("Subscribe")
        except RemoteError as e:
            log.debug("Subscribe failed: %s", e.message)

    def _from_systemd1(self, handle: Callable[[SdBusMessage], None]
                       ) -> Callable[[SdBusMessage], None]:
        """handle, for signals whose sender owns org.freedesktop.systemd1. A sender that is not
        the owner last seen is checked against the bus driver first: PID 1 comes back under a
        new unique name after a daemon-reexec."""

        def checked(msg: SdBusMessage) -> None:
            if self._held is None and msg.sender == self._owner:
                handle(msg)
                return
            # Held until the driver has said who owns the name, with those that come
            # meanwhile: a burst from a new PID 1 costs one question and keeps its order.
            if self._held is None:
                self._held = []
                eager.spawn(self._release_held(), self._tasks, "Checking systemd1's signals")
            self._held.append((msg, handle))

        return checked

    async def _release_held(self) -> None:
        unknown = False
        try:
            self._owner = await self._systemd1_owner()
        except RemoteError as e:  # the driver did not say: taken as 252 takes them all
            log.debug("Cannot tell who owns %s: %s", SYSTEMD1, e.message)
            unknown = True
        finally:
            held, self._held = self._held or [], None
        for msg, handle in held:
            if unknown or msg.sender == self._owner:
                try:
                    handle(msg)
                except Exception:  # the signals after it are still handled
                    log.exception("Handling %s.%s failed", msg.interface, msg.member)
            else:
                log.debug("Ignoring %s.%s from %s, which is not systemd1.", msg.interface,
                          msg.member, msg.sender)

    async def _systemd1_owner(self) -> str | None:
        """The unique name that owns systemd1's, None if none does; RemoteError if the bus
        driver cannot say."""
        try:
            (owner,) = await client.call(self.bus, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                         "org.freedesktop.DBus", "GetNameOwner", "s", SYSTEMD1)
        except RemoteError as e:
            if e.name == "org.freedesktop.DBus.Error.NameHasNoOwner":
                return None
            raise
        return str(owner)

    async def _manager(self, member: str, signature: str = "", *args: Any) -> tuple[Any, ...]:
        return await client.call(self.bus, SYSTEMD1, SYSTEMD1_PATH, MANAGER, member,
                                 signature, *args)

    async def _manager_again(self, member: str, signature: str, *args: Any) -> tuple[Any, ...]:
        """A call about a unit that PID 1 dropped when it re-executed: sent once more, to the
        new PID 1. PID 1 drops the calls it has not read yet; one that it did act on just
        before (its reply lost) does no harm twice: a second stop job merges with the first, a
        signal comes twice."""
        sent_to = self._owner
        try:
            return await self._manager(member, signature, *args)
        except RemoteError as e:
            if (e.name, e.message) != (_CUT_SHORT, _RECIPIENT_GONE) or \
                    not await self._back_on_the_bus(sent_to):
                raise
        return await self._manager(member, signature, *args)

    async def _back_on_the_bus(self, gone: str | None) -> bool:
        """A PID 1 other than `gone` owns systemd1's name (within REEXEC_WAIT)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REEXEC_WAIT
        while True:
            try:
                owner = await self._systemd1_owner()
            except RemoteError:
                return False
            if owner is not None and owner != gone:
                self._owner = owner
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def start_scope(self, m: Machine, properties: ScopeProperties) -> str:
        unit = machine_scope_name(m.name)
        description = ("Virtual Machine " if m.cls is MachineClass.VM else "Container ") + m.name
        props: ScopeProperties = [
            ("Slice", ("s", "machine.slice")),
            ("Description", ("s", description)),
            ("PIDs", ("au", [m.leader])),
            ("Delegate", ("b", True)),
            ("CollectMode", ("s", "inactive-or-failed")),
            ("AddRef", ("b", True)),
            ("TasksMax", ("t", 16384)),
            *properties,
        ]
        try:
            (job,) = await self._manager("StartTransientUnit", "ssa(sv)a(sa(sv))",
                                         unit, "fail", props, [])
        except RemoteError as e:
            log.error("Failed to start machine scope: %s", e.message)  # 252's words
            raise
        m.unit = unit
        m.own_scope = m.referenced = True
        return str(job)

    # ------------------------------------------------------------- HostServices
    async def start_transient_service(self, unit: str, properties: ScopeProperties) -> None:
        await self._manager("StartTransientUnit", "ssa(sv)a(sa(sv))", unit, "fail",
                            properties, [])

    async def start_unit(self, unit: str) -> None:
        await self._manager("StartUnit", "ss", unit, "replace")  # the job is not awaited

    async def unit_for_registration(self, m: Machine, sender_pid: int) -> None:
        m.unit, _ = common.leader_unit(m.leader)

    def unit_of_pid(self, pid: int) -> str | None:
        return common.unit_of_pid(pid)

    async def stop(self, m: Machine) -> str:
        try:
            (job,) = await self._manager_again("StopUnit", "ss", m.unit, "fail")
        except RemoteError as e:
            if e.name in _GONE:
                return ""
            log.error("Failed to stop machine scope: %s", e.message)  # 252's words
            raise ErrnoError(remote_errno(e.name)) from None
        return str(job)

    async def kill(self, m: Machine, signo: int) -> None:
        try:
            await self._manager_again("KillUnit", "ssi", m.unit, "all", signo)
        except RemoteError as e:
            raise ErrnoError(remote_errno(e.name)) from None

    async def unit_is_active(self, m: Machine) -> bool:
        try:
            state = await client.get_property(self.bus, SYSTEMD1, unit_path(m.unit),
                                              "org.freedesktop.systemd1.Unit", "ActiveState")
        except RemoteError as e:
            # Errors other than "no such unit" count as active, as in 252.
            return e.name not in _GONE
        return state not in ("inactive", "failed")

    async def job_is_active(self, job: str) -> bool:
        try:
            await client.get_property(self.bus, SYSTEMD1, job, "org.freedesktop.systemd1.Job",
                                      "State")
        except RemoteError as e:
            return e.name != "org.freedesktop.DBus.Error.UnknownObject"
        return True

    async def release(self, m: Machine) -> None:
        if not m.referenced:
            return
        m.referenced = False
        # 252 drops the reference when it frees the machine, in the GC pass after the call
        # that finalized it: UnrefUnit goes out after that call's reply.
        await asyncio.sleep(0)
        try:
            await self._manager_again("UnrefUnit", "s", m.unit)
        except RemoteError as e:
            log.debug("Failed to drop reference to unit %s: %s", m.unit, e.message)

    def adopt(self, m: Machine) -> bool:
        # Made by the daemon that ran before; its AddRef went with that daemon's connection.
        m.own_scope = m.unit == machine_scope_name(m.name)
        return pid_exists(m.leader)
