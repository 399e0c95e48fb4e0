"""Handlers of the methods that work inside a machine (spec §8, §9): each takes
(call, machine, arguments...), checks arguments in 252's order, authorizes (§4.3), and leaves
the work to machined/linux (forked children that enter the machine)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from typing import Any

from ..core.envfile import parse_env_bytes
from ..core.errors import (
    CHILD_DIED,
    AccessDenied,
    ErrnoError,
    Failed,
    InvalidArgs,
    NoPrivateNetworking,
    NoSuchGroupMapping,
    NoSuchMachine,
    NoSuchUserMapping,
    NotSupported,
)
from ..core.machine import Machine, MachineClass
from ..core.operations import Operations
from ..core.ports import HostServices
from ..core.registry import Registry
from ..core.uidmap import check_id, map_from, map_to, parse_map, shift_of, uid_is_valid
from ..core.validate import bind_args, copy_args, shell_args, split_path
from ..linux import cgroups, copy, facts, process, terminal
from ..linux import namespaces as ns
from ..linux.bindmount import bind_mount
from .auth import MANAGE_MACHINES, PREFIX, Authority
from .objects import Call

LOGIN_PROGRAMS = ("/bin/login", "/usr/bin/login", "/sbin/login", "/usr/sbin/login")


def _pty_service(description: str, slave: int) -> list[tuple[str, tuple[str, Any]]]:
    """The first properties of 252's container-shell@ units: the PTY's slave as stdio."""
    return [
        ("Description", ("s", description)),
        ("StandardInputFileDescriptor", ("h", slave)),
        ("StandardOutputFileDescriptor", ("h", slave)),
        ("StandardErrorFileDescriptor", ("h", slave)),
        ("SendSIGHUP", ("b", True)),
        ("IgnoreSIGPIPE", ("b", False)),
        ("KillMode", ("s", "mixed")),
    ]


async def _start_on_pty(services: HostServices, unit: str, master: int, slave: int, pty: str,
                        properties: list[tuple[str, tuple[str, Any]]]) -> tuple[int, str]:
    """Start the unit; the slave is closed either way (the unit has its copy), the master
    too when the start fails."""
    try:
        try:
            await services.start_transient_service(unit, properties)
        finally:
            os.close(slave)
    except BaseException:
        os.close(master)
        raise
    return master, pty


def _pty_number(pty: str) -> str:
    return pty.removeprefix("/dev/pts/")


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class InsideHandlers:
    def __init__(self, registry: Registry, authority: Authority,
                 host_services: HostServices | None = None) -> None:
        self.registry = registry
        self.authority = authority
        self.operations = Operations(_kill)
        # With a service manager, shell and login programs are its services (on `.host` as in
        # 252); without one (no systemd as PID 1), the daemon starts them itself.
        self.host_services = host_services

    # ---------------------------------------------------------------- helpers
    def _machine(self, name: str) -> Machine:
        m = self.registry.get(name)
        if m is None:
            raise NoSuchMachine(name)
        return m

    def _still_there(self, m: Machine) -> Machine:
        if m.cls is not MachineClass.HOST and self.registry.get(m.name) is not m:
            raise NoSuchMachine(m.name)
        return m

    @staticmethod
    def _is_host(m: Machine) -> bool:
        return m.cls is MachineClass.HOST

    @staticmethod
    def _is_container(m: Machine) -> bool:
        return m.cls is MachineClass.CONTAINER

    async def _authorize(self, call: Call, m: Machine, action: str,
                         details: dict[str, str]) -> Machine:
        await self.authority.check(call, action, details)
        return self._still_there(m)

    def _uid_shift(self, m: Machine) -> int:
        if self._is_host(m):
            return 0
        if not self._is_container(m):
            raise NotSupported("UID/GID shift may only be determined for container machines.")
        return shift_of(facts.read_id_map(m.leader, "uid_map"),
                        facts.read_id_map(m.leader, "gid_map"))

    # ---------------------------------------------------------------- facts (no authorization)
    async def get_addresses(self, call: Call, m: Machine) -> list[tuple[int, bytes]]:
        if self._is_host(m):
            return facts.addresses(None)
        if not self._is_container(m):
            raise NotSupported(
                "Requesting IP address data is only supported on container machines.")
        if ns.shares_namespace(m.leader, "net"):
            raise NoPrivateNetworking(m.name)
        return facts.addresses(m.leader)

    async def get_os_release(self, call: Call, m: Machine) -> dict[str, str]:
        if self._is_host(m):
            raw = facts.host_os_release()
        elif self._is_container(m):
            raw = facts.container_os_release(m.leader)
        else:
            raise NotSupported(
                "Requesting OS release data is only supported on container machines.")
        return dict(parse_env_bytes(raw))

    def get_uid_shift(self, call: Call, m: Machine) -> int:
        try:
            return self._uid_shift(m)
        except ErrnoError as e:  # only GetUIDShift words it; copies and binds say ENXIO
            if e.errno != errno.ENXIO:
                raise
            raise NotSupported(f"Machine {m.name} uses a complex UID/GID mapping, cannot "
                               "determine shift") from None

    def map_from_machine(self, kind: str, name: str, inner: int) -> int:
        check_id(inner, kind)
        m = self._machine(name)
        if not self._is_container(m):
            raise InvalidArgs("Not supported for non-container machines.")
        text = facts.read_id_map(m.leader, "uid_map" if kind == "user" else "gid_map")
        if text is None:
            return inner
        outer = map_from(inner, parse_map(text))
        if outer is None:
            # 252 answers NoSuchUserMapping for groups too
            raise NoSuchUserMapping(f"Machine '{m.name}' has no matching {kind} mappings.")
        return outer

    def map_to_machine(self, kind: str, outer: int) -> tuple[str, str, int]:
        check_id(outer, kind)
        error = NoSuchUserMapping if kind == "user" else NoSuchGroupMapping
        if outer < 65536:
            raise error(f"{kind.capitalize()} {outer} belongs to host "
                        f"{'UID' if kind == 'user' else 'GID'} range")
        for m in self.registry:
            if not self._is_container(m):
                continue
            try:
                text = facts.read_id_map(m.leader, "uid_map" if kind == "user" else "gid_map")
                lines = parse_map(text or "")
            except ErrnoError:
                continue
            inner = map_to(outer, lines)
            if inner is not None:
                if not uid_is_valid(inner):  # 65535 inside, say: 252 answers EINVAL
                    raise ErrnoError(errno.EINVAL)
                return m.name, m.path, inner
        raise error(f"No matching {kind} mapping for {outer}.")

    # ---------------------------------------------------------------- terminals
    async def open_pty(self, call: Call, m: Machine) -> tuple[int, str]:
        action = "host-open-pty" if self._is_host(m) else "open-pty"
        m = await self._authorize(call, m, PREFIX + action, {"machine": m.name})
        if self._is_host(m):
            return terminal.host_pty()
        if not self._is_container(m):
            raise ErrnoError(errno.EOPNOTSUPP)
        return await terminal.container_pty(m.leader)

    async def open_login(self, call: Call, m: Machine) -> tuple[int, str]:
        action = "host-login" if self._is_host(m) else "login"
        m = await self._authorize(call, m, PREFIX + action,
                                  {"machine": m.name, "verb": "login"})
        if self._is_host(m) and self.host_services is not None:
            master, pty = terminal.host_pty()
            try:
                await self.host_services.start_unit(f"container-getty@{_pty_number(pty)}.service")
            except BaseException:
                os.close(master)
                raise
            return master, pty
        program = terminal.Program("root", LOGIN_PROGRAMS[0], ["login"], [],
                                   LOGIN_PROGRAMS[1:])
        return await self._start(m, program)

    async def open_shell(self, call: Call, m: Machine, user: str, path: str, args: list[str],
                         environment: list[str]) -> tuple[int, str]:
        user, path, argv = shell_args(user, path, args, environment)
        action = "host-shell" if self._is_host(m) else "shell"
        m = await self._authorize(call, m, PREFIX + action,
                                  {"machine": m.name, "user": user, "program": path})
        # A shell in a machine that shares our user namespace is a root shell on the host for
        # all purposes: polkit's yes is not enough for that.
        if (self._is_container(m) or self._is_host(m)) and (await call.creds()).uid != 0 \
                and ns.shares_namespace(1 if self._is_host(m) else m.leader, "user"):
            raise AccessDenied("Permission denied")
        return await self._start(m, terminal.Program(user, path, argv, environment))

    async def _start(self, m: Machine, program: terminal.Program) -> tuple[int, str]:
        if self._is_host(m) and self.host_services is not None:
            return await self._start_host_service(self.host_services, program)
        if self._is_host(m):
            return await terminal.start_program(None, program, [], m.name)
        if not self._is_container(m):
            raise ErrnoError(errno.EOPNOTSUPP)
        if self.host_services is not None:
            return await self._start_container_service(self.host_services, m, program)
        return await terminal.start_program(m.leader, program, _cgroup_procs(m.leader),
                                            m.name)

    @staticmethod
    async def _start_container_service(services: HostServices, m: Machine,
                                       program: terminal.Program) -> tuple[int, str]:
        """The program as a transient service of the host's PID 1 on the container's PTY
        (machined/enter.py enters the container), so that it gets the host's context rather
        than the daemon's sandbox, as 252's shells get the container's systemd's."""
        started = process.start_ticks(m.leader)
        if started is None:
            raise Failed(CHILD_DIED)
        master, slave, pty = await terminal.open_terminal_in(m.leader, program, m.name)
        spec = json.dumps({
            "leader": m.leader, "started": started, "cgroup_procs": _cgroup_procs(m.leader),
            "user": program.user, "path": program.path, "argv": program.argv,
            "environment": program.environment, "alternatives": list(program.alternatives)})
        properties = [
            *_pty_service(f"Shell for User {program.user} in {m.name}", slave),
            ("CollectMode", ("s", "inactive-or-failed")),
            # "$$": systemd would expand variables in the arguments
            ("ExecStart", ("a(sasb)", [(sys.executable, [
                sys.executable, "-m", "machined.enter", spec.replace("$", "$$")], False)])),
        ]
        return await _start_on_pty(services, f"container-shell@{m.name}-{_pty_number(pty)}"
                                   ".service", master, slave, pty, properties)

    @staticmethod
    async def _start_host_service(services: HostServices,
                                  program: terminal.Program) -> tuple[int, str]:
        """252's container-shell@N.service on the host's PTY N, with its properties in its
        order: the program gets the host's own context (no sandbox of ours, a PAM session,
        utmp), and outlives the daemon."""
        terminal.check_host_program(program)
        master, pty = terminal.host_pty()
        try:
            slave = os.open(pty, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except BaseException:
            os.close(master)
            raise
        properties = [
            *_pty_service(f"Shell for User {program.user}", slave),
            ("TTYPath", ("s", pty)),
            ("TTYReset", ("b", True)),
            ("UtmpIdentifier", ("s", pty.removeprefix("/dev/"))),
            ("UtmpMode", ("s", "user")),
            ("PAMName", ("s", "login")),
            ("WorkingDirectory", ("s", "-~")),
            ("User", ("s", program.user)),
        ]
        if program.environment:
            properties.append(("Environment", ("as", program.environment)))
        properties.append(("ExecStart", ("a(sasb)", [(program.path, program.argv, True)])))
        return await _start_on_pty(services, f"container-shell@{_pty_number(pty)}.service",
                                   master, slave, pty, properties)

    # ---------------------------------------------------------------- bind mounts
    async def bind_mount(self, call: Call, m: Machine, source: str, destination: str,
                         read_only: bool, mkdir: bool) -> None:
        if not self._is_container(m):
            raise NotSupported("Bind mounting is only supported on container machines.")
        source, destination = bind_args(source, destination)
        m = await self._authorize(call, m, MANAGE_MACHINES, {
            "machine": m.name, "verb": "bind", "src": source, "dest": destination})
        if self._uid_shift(m) != 0:
            raise NotSupported("Can't bind mount on container with user namespacing applied.")
        try:
            await bind_mount(m.leader, source, destination, read_only, mkdir)
        except (OSError, ErrnoError) as e:
            err = e.errno if e.errno else errno.EIO
            raise ErrnoError(err, f"Failed to mount {source} on {destination} in machine's "
                                  f"namespace: {os.strerror(err)}") from None

    # ---------------------------------------------------------------- copies (operations)
    def copy_machine(self, call: Call, name: str, source: str, destination: str, flags: int,
                     to_container: bool) -> Any:
        """The Manager's Copy*Machine*: the operation cap is checked before the lookup."""
        self.operations.check_capacity("Too many ongoing copies.")
        return self.copy(call, self._machine(name), source, destination, flags, to_container)

    async def copy(self, call: Call, m: Machine, source: str, destination: str, flags: int,
                   to_container: bool) -> None:
        self.operations.check_capacity("Too many ongoing copies.")
        if not self._is_container(m):
            raise NotSupported("Copying files is only supported on container machines.")
        source, destination, replace = copy_args(source, destination, flags)
        m = await self._authorize(call, m, MANAGE_MACHINES, {
            "machine": m.name, "verb": "copy", "src": source, "dest": destination})
        shift = self._uid_shift(m)
        host_path, container_path = ((source, destination) if to_container
                                     else (destination, source))
        for path in (host_path, container_path):
            try:
                split_path(path)
            except ErrnoError as e:
                raise ErrnoError(e.errno, f"Failed to extract file name of '{path}' path: "
                                          f"{os.strerror(e.errno)}") from None
        try:
            host_dir, host_name = copy.open_parent(host_path)
        except OSError as e:
            # 252 names the whole path here, though it opens its parent
            raise ErrnoError.from_oserror(
                e, f"Failed to open host directory {host_path}") from None
        if shift == 0:
            owner = copy.Owner()
        elif to_container:
            owner = copy.Owner(shift, shift)
        else:
            owner = copy.Owner(0, 0)
        try:
            self.operations.check_capacity("Too many ongoing copies.")
            pid, sock = copy.fork_copy(m.leader, host_dir, host_name, container_path,
                                       to_container, replace, owner)
        finally:
            os.close(host_dir)
        result = await self.operations.run(m, pid, ns.collect(pid, sock))
        if not result.exited:
            raise Failed(CHILD_DIED)
        if result.code != 0:
            err = result.errno
            if err is None:
                raise Failed("Child failed.")
            raise ErrnoError(err)

    # ---------------------------------------------------------------- root directory
    async def open_root_directory(self, call: Call, m: Machine) -> int:
        m = await self._authorize(call, m, MANAGE_MACHINES, {
            "machine": m.name, "verb": "open_root_directory"})
        if self._is_host(m):
            return facts.host_root_directory()
        if not self._is_container(m):
            raise NotSupported(
                "Opening the root directory is only supported on container machines.")
        return await facts.container_root_directory(m.leader)

    # ---------------------------------------------------------------- life cycle
    def machine_gone(self, m: Machine) -> None:
        self.operations.machine_gone(m)

    def stop(self) -> None:
        self.operations.kill_all()

    # ---------------------------------------------------------------- method table helpers
    def manager_map(self, what: str) -> Any:
        """Handlers of Map{From,To}Machine{User,Group}: validity comes before the lookup."""
        kind = "user" if what.endswith("User") else "group"
        if what.startswith("MapFrom"):
            return lambda call, name, inner: self.map_from_machine(kind, name, inner)
        return lambda call, outer: self.map_to_machine(kind, outer)



def _cgroup_procs(leader: int) -> list[str]:
    """The cgroup.procs files of the leader's cgroups, where a shell belongs."""
    try:
        return cgroups.procs_files_of(leader)
    except ErrnoError:
        return []
