"""org.freedesktop.machine1.Manager at /org/freedesktop/machine1 (spec §2.3, §11)."""

from __future__ import annotations

from typing import Any

from ..core.errors import InvalidArgs, NoMachineForPID, NoSuchMachine, not_implemented
from ..core.machine import Machine
from ..core.ports import ScopeProperties
from ..core.registry import Registry
from ..core.validate import machine_spec
from .machine import MANAGER_IFACE, MANAGER_SIGNALS, MachineHandlers
from .objects import Call, Interface, Method, Property

POOL_PATH = "/var/lib/machines"
UINT64_MAX = 2**64 - 1
IMAGE_ISSUE = "image pool"


class Manager:
    def __init__(self, registry: Registry, handlers: MachineHandlers) -> None:
        self.registry = registry
        self.h = handlers

    def _machine(self, name: str) -> Machine:
        m = self.registry.get(name)
        if m is None:
            raise NoSuchMachine(name)
        return m

    # ------------------------------------------------------------- lookups
    def get_machine(self, call: Call, name: str) -> str:
        return self._machine(name).path

    def get_machine_by_pid(self, call: Call, pid: int) -> Any:
        if pid >= 2**31:
            raise InvalidArgs("Invalid argument")
        if pid == 0:
            return self._machine_by_sender_pid(call)
        return self._path_of_pid(pid)

    async def _machine_by_sender_pid(self, call: Call) -> str:
        return self._path_of_pid((await call.creds()).pid)

    def _path_of_pid(self, pid: int) -> str:
        m = self.registry.by_pid(pid)
        if m is None:
            raise NoMachineForPID(pid)
        return m.path

    def list_machines(self, call: Call) -> list[tuple[str, str, str, str]]:
        return [(m.name, m.cls.value, m.service, m.path) for m in self.registry]

    # ------------------------------------------------------------- create / register
    async def _sender_pid(self, call: Call) -> int:
        return (await call.creds()).pid

    async def create(self, call: Call, name: str, id_: bytes, service: str, cls: str,
                     leader: int, root: str, ifindices: list[int] | None,
                     properties: ScopeProperties) -> str:
        spec = machine_spec(name, id_, service, cls, leader, root, ifindices)
        m = await self.registry.create(spec, properties, await self._sender_pid(call))
        return m.path

    async def register(self, call: Call, name: str, id_: bytes, service: str, cls: str,
                       leader: int, root: str, ifindices: list[int] | None) -> str:
        spec = machine_spec(name, id_, service, cls, leader, root, ifindices)
        m = await self.registry.register(spec, await self._sender_pid(call))
        return m.path

    # ------------------------------------------------------------- the interface
    def interface(self) -> Interface:
        h = self.h
        i = h.inside

        def redirect(action: Any) -> Any:
            return lambda c, name, *args: action(c, self._machine(name), *args)

        def pending(what: str, issue: str) -> Any:
            def handler(call: Call, *args: Any) -> None:
                raise not_implemented(what, issue)

            return handler

        def image(member: str) -> Any:
            return pending(member, IMAGE_ISSUE)

        M = Method
        return Interface(
            MANAGER_IFACE,
            properties=[
                Property("PoolPath", "s", lambda: POOL_PATH),
                Property("PoolUsage", "t", lambda: UINT64_MAX),
                Property("PoolLimit", "t", lambda: UINT64_MAX),
            ],
            methods=[
                M("GetMachine", "s", ("name",), "o", ("machine",), self.get_machine),
                M("GetImage", "s", ("name",), "o", ("image",), image("GetImage")),
                M("GetMachineByPID", "u", ("pid",), "o", ("machine",), self.get_machine_by_pid),
                M("ListMachines", "", (), "a(ssso)", ("machines",), self.list_machines),
                M("ListImages", "", (), "a(ssbttto)", ("images",), image("ListImages")),
                M("CreateMachine", "sayssusa(sv)",
                  ("name", "id", "service", "class", "leader", "root_directory",
                   "scope_properties"), "o", ("path",),
                  lambda c, n, i, s, k, ld, r, p: self.create(c, n, i, s, k, ld, r, None, p),
                  privileged=True),
                M("CreateMachineWithNetwork", "sayssusaia(sv)",
                  ("name", "id", "service", "class", "leader", "root_directory", "ifindices",
                   "scope_properties"), "o", ("path",), self.create, privileged=True),
                M("RegisterMachine", "sayssus",
                  ("name", "id", "service", "class", "leader", "root_directory"), "o", ("path",),
                  lambda c, n, i, s, k, ld, r: self.register(c, n, i, s, k, ld, r, None),
                  privileged=True),
                M("RegisterMachineWithNetwork", "sayssusai",
                  ("name", "id", "service", "class", "leader", "root_directory", "ifindices"),
                  "o", ("path",), self.register, privileged=True),
                M("UnregisterMachine", "s", ("name",), "", (), redirect(h.unregister)),
                M("TerminateMachine", "s", ("id",), "", (), redirect(h.terminate)),
                M("KillMachine", "ssi", ("name", "who", "signal"), "", (), redirect(h.kill)),
                M("GetMachineAddresses", "s", ("name",), "a(iay)", ("addresses",),
                  redirect(i.get_addresses)),
                M("GetMachineOSRelease", "s", ("name",), "a{ss}", ("fields",),
                  redirect(i.get_os_release)),
                M("OpenMachinePTY", "s", ("name",), "hs", ("pty", "pty_path"),
                  redirect(i.open_pty), privileged=True),
                M("OpenMachineLogin", "s", ("name",), "hs", ("pty", "pty_path"),
                  redirect(i.open_login)),
                M("OpenMachineShell", "sssasas", ("name", "user", "path", "args", "environment"),
                  "hs", ("pty", "pty_path"), redirect(i.open_shell)),
                M("BindMountMachine", "sssbb",
                  ("name", "source", "destination", "read_only", "mkdir"), "", (),
                  redirect(i.bind_mount)),
                M("CopyFromMachine", "sss", ("name", "source", "destination"), "", (),
                  lambda c, n, s, d: i.copy_machine(c, n, s, d, 0, False)),
                M("CopyToMachine", "sss", ("name", "source", "destination"), "", (),
                  lambda c, n, s, d: i.copy_machine(c, n, s, d, 0, True)),
                M("CopyFromMachineWithFlags", "ssst", ("name", "source", "destination", "flags"),
                  "", (), lambda c, n, s, d, f: i.copy_machine(c, n, s, d, f, False)),
                M("CopyToMachineWithFlags", "ssst", ("name", "source", "destination", "flags"),
                  "", (), lambda c, n, s, d, f: i.copy_machine(c, n, s, d, f, True)),
                M("OpenMachineRootDirectory", "s", ("name",), "h", ("fd",),
                  redirect(i.open_root_directory)),
                M("GetMachineUIDShift", "s", ("name",), "u", ("shift",),
                  redirect(i.get_uid_shift)),
                M("RemoveImage", "s", ("name",), "", (), image("RemoveImage")),
                M("RenameImage", "ss", ("name", "new_name"), "", (), image("RenameImage")),
                M("CloneImage", "ssb", ("name", "new_name", "read_only"), "", (),
                  image("CloneImage")),
                M("MarkImageReadOnly", "sb", ("name", "read_only"), "", (),
                  image("MarkImageReadOnly")),
                M("GetImageHostname", "s", ("name",), "s", ("hostname",),
                  image("GetImageHostname")),
                M("GetImageMachineID", "s", ("name",), "ay", ("id",), image("GetImageMachineID")),
                M("GetImageMachineInfo", "s", ("name",), "a{ss}", ("machine_info",),
                  image("GetImageMachineInfo")),
                M("GetImageOSRelease", "s", ("name",), "a{ss}", ("os_release",),
                  image("GetImageOSRelease")),
                M("SetPoolLimit", "t", ("size",), "", (), image("SetPoolLimit")),
                M("SetImageLimit", "st", ("name", "size"), "", (), image("SetImageLimit")),
                M("CleanPool", "s", ("mode",), "a(st)", ("images",), image("CleanPool")),
                M("MapFromMachineUser", "su", ("name", "uid_inner"), "u", ("uid_outer",),
                  i.manager_map("MapFromMachineUser")),
                M("MapToMachineUser", "u", ("uid_outer",), "sou",
                  ("machine_name", "machine_path", "uid_inner"), i.manager_map("MapToMachineUser")),
                M("MapFromMachineGroup", "su", ("name", "gid_inner"), "u", ("gid_outer",),
                  i.manager_map("MapFromMachineGroup")),
                M("MapToMachineGroup", "u", ("gid_outer",), "sou",
                  ("machine_name", "machine_path", "gid_inner"),
                  i.manager_map("MapToMachineGroup")),
            ],
            signals=MANAGER_SIGNALS,
        )


IMAGE_IFACE = "org.freedesktop.machine1.Image"


def image_interface_template() -> Interface:
    """The Image interface (for --bus-introspect; no image objects are served yet)."""
    def pending(*_args: Any) -> None:
        raise not_implemented("Image objects", IMAGE_ISSUE)

    def t(name: str) -> Property:
        return Property(name, "t", lambda: UINT64_MAX)

    return Interface(
        IMAGE_IFACE,
        properties=[
            Property("Name", "s", lambda: ""), Property("Path", "s", lambda: ""),
            Property("Type", "s", lambda: ""), Property("ReadOnly", "b", lambda: False),
            t("CreationTimestamp"), t("ModificationTimestamp"), t("Usage"), t("Limit"),
            t("UsageExclusive"), t("LimitExclusive"),
        ],
        methods=[
            Method("Remove", "", (), "", (), pending),
            Method("Rename", "s", (), "", (), pending),
            Method("Clone", "sb", (), "", (), pending),
            Method("MarkReadOnly", "b", (), "", (), pending),
            Method("SetLimit", "t", (), "", (), pending),
            Method("GetHostname", "", (), "s", (), pending),
            Method("GetMachineID", "", (), "ay", (), pending),
            Method("GetMachineInfo", "", (), "a{ss}", (), pending),
            Method("GetOSRelease", "", (), "a{ss}", (), pending),
        ],
    )
