"""org.freedesktop.machine1.Machine objects, one per machine in the table, and the handlers the
Manager's *Machine methods redirect to."""

from __future__ import annotations

from typing import Any

from ..core.errors import NoSuchMachine, not_implemented
from ..core.machine import Machine
from ..core.registry import Registry
from ..core.validate import kill_args
from .auth import MANAGE_MACHINES, Authority
from .inside import InsideHandlers
from .objects import CONST, FALSE, Call, Dispatcher, Interface, Method, Property, Signal

MANAGER_PATH = "/org/freedesktop/machine1"
MANAGER_IFACE = "org.freedesktop.machine1.Manager"
MACHINE_IFACE = "org.freedesktop.machine1.Machine"
INSIDE_ISSUE = "working inside machines"


class MachineHandlers:
    """What a call on a machine does, whether it came to the Machine object or to the Manager."""

    def __init__(self, registry: Registry, authority: Authority) -> None:
        self.registry = registry
        self.authority = authority
        self.inside = InsideHandlers(registry, authority)

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

    @staticmethod
    def pending(what: str) -> Any:
        def handler(call: Call, *args: Any) -> None:
            raise not_implemented(what, INSIDE_ISSUE)

        return handler


def machine_interface(m: Machine, h: MachineHandlers) -> Interface:
    def prop(name: str, sig: str, getter: Any, emits: str = CONST,
             hidden: bool = False) -> Property:
        return Property(name, sig, getter, emits, hidden)

    i = h.inside
    return Interface(
        MACHINE_IFACE,
        properties=[
            prop("Name", "s", lambda: m.name),
            prop("Id", "ay", lambda: m.id_bytes),
            prop("Timestamp", "t", lambda: m.timestamp.realtime if m.timestamp else 0),
            prop("TimestampMonotonic", "t",
                 lambda: m.timestamp.monotonic if m.timestamp else 0),
            prop("Service", "s", lambda: m.service),
            prop("Unit", "s", lambda: m.unit),
            prop("Scope", "s", lambda: m.unit, hidden=True),
            prop("Leader", "u", lambda: m.leader),
            prop("Class", "s", lambda: m.cls.value),
            prop("RootDirectory", "s", lambda: m.root_directory),
            prop("NetworkInterfaces", "ai", lambda: m.netif),
            prop("State", "s", lambda: m.state, emits=FALSE),
        ],
        methods=[
            Method("Terminate", "", (), "", (), lambda c: h.terminate(c, m)),
            Method("Kill", "si", ("who", "signal"), "", (),
                   lambda c, who, sig: h.kill(c, m, who, sig)),
            Method("GetAddresses", "", (), "a(iay)", ("addresses",),
                   lambda c: i.get_addresses(c, m)),
            Method("GetOSRelease", "", (), "a{ss}", ("fields",), lambda c: i.get_os_release(c, m)),
            Method("GetUIDShift", "", (), "u", ("shift",), lambda c: i.get_uid_shift(c, m)),
            Method("OpenPTY", "", (), "hs", ("pty", "pty_path"), lambda c: i.open_pty(c, m)),
            Method("OpenLogin", "", (), "hs", ("pty", "pty_path"), lambda c: i.open_login(c, m)),
            Method("OpenShell", "ssasas", ("user", "path", "args", "environment"), "hs",
                   ("pty", "pty_path"), lambda c, *a: i.open_shell(c, m, *a)),
            Method("BindMount", "ssbb", ("source", "destination", "read_only", "mkdir"), "", (),
                   lambda c, *a: i.bind_mount(c, m, *a)),
            Method("CopyFrom", "ss", ("source", "destination"), "", (),
                   lambda c, s, d: i.copy(c, m, s, d, 0, False)),
            Method("CopyTo", "ss", ("source", "destination"), "", (),
                   lambda c, s, d: i.copy(c, m, s, d, 0, True)),
            Method("CopyFromWithFlags", "sst", ("source", "destination", "flags"), "", (),
                   lambda c, s, d, f: i.copy(c, m, s, d, f, False)),
            Method("CopyToWithFlags", "sst", ("source", "destination", "flags"), "", (),
                   lambda c, s, d, f: i.copy(c, m, s, d, f, True)),
            Method("OpenRootDirectory", "", (), "h", ("fd",),
                   lambda c: i.open_root_directory(c, m)),
        ],
    )


class MachineObjects:
    """The registry's listener: exports/unexports Machine objects, emits the Manager signals."""

    def __init__(self, dispatcher: Dispatcher, handlers: MachineHandlers) -> None:
        self.dispatcher = dispatcher
        self.handlers = handlers

    def machine_added(self, m: Machine) -> None:
        self.dispatcher.export(m.path, machine_interface(m, self.handlers))

    def machine_freed(self, m: Machine) -> None:
        self.dispatcher.unexport(m.path, MACHINE_IFACE)
        self.handlers.inside.machine_gone(m)

    def machine_new(self, m: Machine) -> None:
        self.dispatcher.emit(MANAGER_PATH, MANAGER_IFACE, "MachineNew", "so", m.name, m.path)

    def machine_removed(self, m: Machine) -> None:
        self.dispatcher.emit(MANAGER_PATH, MANAGER_IFACE, "MachineRemoved", "so", m.name, m.path)


MANAGER_SIGNALS = [
    Signal("MachineNew", "so", ("machine", "path")),
    Signal("MachineRemoved", "so", ("machine", "path")),
]
