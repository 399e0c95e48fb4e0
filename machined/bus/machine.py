"""org.freedesktop.machine1.Machine objects, one per machine in the table, and the handlers the
Manager's *Machine methods redirect to."""

from __future__ import annotations

import logging
from typing import Any

from ..core.errors import NoSuchMachine
from ..core.machine import MACHINE_PATH_PREFIX, Machine
from ..core.names import bus_label_unescape
from ..core.ports import HostServices
from ..core.registry import Registry
from ..core.validate import kill_args
from .auth import MANAGE_MACHINES, Authority
from .inside import InsideHandlers
from .objects import CONST, FALSE, Call, Dispatcher, Interface, Method, Property, Signal

log = logging.getLogger(__name__)

MANAGER_PATH = "/org/freedesktop/machine1"
MANAGER_IFACE = "org.freedesktop.machine1.Manager"
MACHINE_IFACE = "org.freedesktop.machine1.Machine"


class MachineHandlers:
    """What a call on a machine does, whether it came to the Machine object or to the Manager."""

    def __init__(self, registry: Registry, authority: Authority,
                 host_services: HostServices | None = None) -> None:
        self.registry = registry
        self.authority = authority
        self.inside = InsideHandlers(registry, authority, host_services)

    def _still_there(self, m: Machine) -> Machine:
        """After an await (polkit), the machine may have gone."""
        if self.registry.get(m.name) is not m:
            raise NoSuchMachine(m.name)
        return m

    async def terminate(self, call: Call, m: Machine) -> None:
        await self.authority.check(call, MANAGE_MACHINES, {"machine": m.name,
                                                           "verb": "terminate"})
        await self.registry.terminate(self._still_there(m))

    async def kill(self, call: Call, m: Machine, who: str, signo: int) -> None:
        who, signo = kill_args(who, signo)
        await self.authority.check(call, MANAGE_MACHINES, {"machine": m.name, "verb": "kill"})
        await self.registry.kill(self._still_there(m), who, signo)

    async def unregister(self, call: Call, m: Machine) -> None:
        await self.authority.check(call, MANAGE_MACHINES, {"machine": m.name,
                                                           "verb": "unregister"})
        self.registry.unregister(self._still_there(m))


def machine_interface(h: MachineHandlers) -> Interface:
    """The Machine interface, one for all machines: handlers take (call, machine, *args) and
    getters take the machine (see Dispatcher.export_fallback)."""

    def prop(name: str, sig: str, getter: Any, emits: str = CONST,
             hidden: bool = False) -> Property:
        return Property(name, sig, getter, emits, hidden)

    i = h.inside
    return Interface(
        MACHINE_IFACE,
        properties=[
            prop("Name", "s", lambda m: m.name),
            prop("Id", "ay", lambda m: m.id_bytes),
            prop("Timestamp", "t", lambda m: m.timestamp.realtime if m.timestamp else 0),
            prop("TimestampMonotonic", "t",
                 lambda m: m.timestamp.monotonic if m.timestamp else 0),
            prop("Service", "s", lambda m: m.service),
            prop("Unit", "s", lambda m: m.unit),
            prop("Scope", "s", lambda m: m.unit, hidden=True),
            prop("Leader", "u", lambda m: m.leader),
            prop("Class", "s", lambda m: m.cls.value),
            prop("RootDirectory", "s", lambda m: m.root_directory),
            prop("NetworkInterfaces", "ai", lambda m: m.netif),
            prop("State", "s", lambda m: m.state, emits=FALSE),
        ],
        methods=[
            Method("Terminate", "", (), "", (), h.terminate),
            Method("Kill", "si", ("who", "signal"), "", (), h.kill),
            Method("GetAddresses", "", (), "a(iay)", ("addresses",),
                   i.get_addresses),
            Method("GetOSRelease", "", (), "a{ss}", ("fields",), i.get_os_release),
            Method("GetUIDShift", "", (), "u", ("shift",), i.get_uid_shift),
            Method("OpenPTY", "", (), "hs", ("pty", "pty_path"), i.open_pty),
            Method("OpenLogin", "", (), "hs", ("pty", "pty_path"), i.open_login),
            Method("OpenShell", "ssasas", ("user", "path", "args", "environment"), "hs",
                   ("pty", "pty_path"), i.open_shell),
            Method("BindMount", "ssbb", ("source", "destination", "read_only", "mkdir"), "", (),
                   i.bind_mount),
            Method("CopyFrom", "ss", ("source", "destination"), "", (),
                   lambda c, m, s, d: i.copy(c, m, s, d, 0, False)),
            Method("CopyTo", "ss", ("source", "destination"), "", (),
                   lambda c, m, s, d: i.copy(c, m, s, d, 0, True)),
            Method("CopyFromWithFlags", "sst", ("source", "destination", "flags"), "", (),
                   lambda c, m, s, d, f: i.copy(c, m, s, d, f, False)),
            Method("CopyToWithFlags", "sst", ("source", "destination", "flags"), "", (),
                   lambda c, m, s, d, f: i.copy(c, m, s, d, f, True)),
            Method("OpenRootDirectory", "", (), "h", ("fd",),
                   i.open_root_directory),
        ],
    )


class MachineObjects:
    """Serves the Machine objects of the registry's table under one fallback vtable, and, as
    the registry's listener, emits the Manager's MachineNew/MachineRemoved."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.registry: Registry | None = None
        self.handlers: MachineHandlers | None = None

    def serve(self, registry: Registry, handlers: MachineHandlers) -> None:
        self.registry = registry
        self.handlers = handlers
        self._fallback = self.dispatcher.export_fallback(
            MACHINE_PATH_PREFIX.rstrip("/"), machine_interface(handlers), self.find,
            lambda: [m.path for m in registry])

    def find(self, path: str) -> Machine | None:
        if self.registry is None or not path.startswith(MACHINE_PATH_PREFIX):
            return None
        label = path[len(MACHINE_PATH_PREFIX):]
        if not label or "/" in label:
            return None
        if label == "self":  # the caller's own machine (§2.4); not enumerated
            return self._machine_of_sender()
        # any spelling of the name finds the machine, as in 252 (not only m.path's)
        return self.registry.get(bus_label_unescape(label))

    def _machine_of_sender(self) -> Machine | None:
        sender = self._fallback.current_sender()
        if self.registry is None or not sender:
            return None
        try:
            pid = self.dispatcher.creds_now(sender).pid
        except Exception as e:  # noqa: BLE001 - the caller just gets UnknownObject
            log.debug("Cannot get the credentials of %s: %s", sender, e)
            return None
        return self.registry.by_pid(pid) if pid > 0 else None

    def machine_freed(self, m: Machine) -> None:
        if self.handlers is not None:
            self.handlers.inside.machine_gone(m)  # its copies and other operations end with it

    def close(self) -> None:
        self._fallback.close()

    def machine_new(self, m: Machine) -> None:
        self.dispatcher.emit(MANAGER_PATH, MANAGER_IFACE, "MachineNew", "so", m.name, m.path)

    def machine_removed(self, m: Machine) -> None:
        self.dispatcher.emit(MANAGER_PATH, MANAGER_IFACE, "MachineRemoved", "so", m.name, m.path)


MANAGER_SIGNALS = [
    Signal("MachineNew", "so", ("machine", "path")),
    Signal("MachineRemoved", "so", ("machine", "path")),
]
