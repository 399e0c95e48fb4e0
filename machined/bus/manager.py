"""org.freedesktop.machine1.Manager at /org/freedesktop/machine1 (spec §2.3, §11)."""

from __future__ import annotations

from typing import Any

from ..core.errors import InvalidArgs, NoMachineForPID, NoSuchMachine
from ..core.machine import Machine
from ..core.ports import ScopeProperties
from ..core.registry import Registry
from ..core.validate import machine_spec
from .image import ImageHandlers
from .machine import MANAGER_IFACE, MANAGER_SIGNALS, MachineHandlers
from .objects import Call, Interface, Method, Property, WithCaller


class Manager:
    def __init__(self, registry: Registry, handlers: MachineHandlers,
                 images: ImageHandlers) -> None:
        self.registry = registry
        self.h = handlers
        self._listing: list[tuple[str, str, str, str]] = []
        self._listing_generation = -1
        self.images = images

    def _machine(self, name: str) -> Machine:
        m = self.registry.get(name)
        if m is None:
            raise NoSuchMachine(name)
        return m

    # ------------------------------------------------------------- lookups
    # The lookups are plain handlers (see bus/objects.Method): no Call, answered at once.
    def get_machine(self, name: str) -> str:
        m = self.registry.machines.get(name)  # not through _machine(): the hottest call there is
        if m is None:
            raise NoSuchMachine(name)
        return m.path

    def get_machine_by_pid(self, pid: int) -> str | WithCaller:
        if pid >= 2**31:
            raise InvalidArgs("Invalid argument")
        m = self.registry.leaders.get(pid)  # a leader: the common case, answered right here
        if m is not None:
            return m.path
        if pid == 0:
            return WithCaller(self._machine_by_sender_pid)
        return self._path_of_pid(pid)

    async def _machine_by_sender_pid(self, call: Call) -> str:
        return self._path_of_pid((await call.creds()).pid)

    def _path_of_pid(self, pid: int) -> str:
        m = self.registry.by_pid(pid)
        if m is None:
            raise NoMachineForPID(pid)
        return m.path

    def list_machines(self) -> list[tuple[str, str, str, str]]:
        # Built once per change of the table: with many machines, listing is the hot path.
        if self._listing_generation != self.registry.generation:
            self._listing = [(m.name, m.cls.value, m.service, m.path) for m in self.registry]
            self._listing_generation = self.registry.generation
        return self._listing

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

        images = self.images
        image = images.redirect
        M = Method
        return Interface(
            MANAGER_IFACE,
            properties=[
                Property("PoolPath", "s", images.pool_path),
                Property("PoolUsage", "t", images.pool_usage),
                Property("PoolLimit", "t", images.pool_limit),
            ],
            methods=[
                M("GetMachine", "s", ("name",), "o", ("machine",), self.get_machine, plain=True),
                M("GetImage", "s", ("name",), "o", ("image",), images.get_image),
                M("GetMachineByPID", "u", ("pid",), "o", ("machine",), self.get_machine_by_pid,
                  plain=True),
                M("ListMachines", "", (), "a(ssso)", ("machines",), self.list_machines,
                  plain=True),
                M("ListImages", "", (), "a(ssbttto)", ("images",), images.list_images),
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
                M("RemoveImage", "s", ("name",), "", (), image(images.remove)),
                M("RenameImage", "ss", ("name", "new_name"), "", (), image(images.rename)),
                M("CloneImage", "ssb", ("name", "new_name", "read_only"), "", (),
                  image(images.clone)),
                M("MarkImageReadOnly", "sb", ("name", "read_only"), "", (),
                  image(images.mark_read_only)),
                M("GetImageHostname", "s", ("name",), "s", ("hostname",),
                  image(images.get_hostname)),
                M("GetImageMachineID", "s", ("name",), "ay", ("id",), image(images.get_machine_id)),
                M("GetImageMachineInfo", "s", ("name",), "a{ss}", ("machine_info",),
                  image(images.get_machine_info)),
                M("GetImageOSRelease", "s", ("name",), "a{ss}", ("os_release",),
                  image(images.get_os_release)),
                M("SetPoolLimit", "t", ("size",), "", (), images.set_pool_limit),
                M("SetImageLimit", "st", ("name", "size"), "", (), image(images.set_limit)),
                M("CleanPool", "s", ("mode",), "a(st)", ("images",), images.clean_pool),
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
