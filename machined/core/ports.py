"""What the registry needs from the outside world, as protocols (implemented in scopes/ and
linux/, wired together in machined/daemon.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .machine import Machine

# D-Bus `a(sv)` as sdbus represents it: [(name, (signature, value)), ...]
ScopeProperties = list[tuple[str, tuple[str, Any]]]


class ScopeBackend(Protocol):
    """Scopes and units: org.freedesktop.systemd1 on a systemd host, our own cgroups elsewhere."""

    name: str

    async def start_scope(self, m: Machine, properties: ScopeProperties) -> str:
        """Create the machine's scope with the leader in it. Sets m.unit; returns a pending job
        path ("" when the scope is ready at once). Raises MachinedError."""
        ...

    async def unit_for_registration(self, m: Machine, sender_pid: int) -> None:
        """Find (or, standalone, allocate) the unit of the leader of a RegisterMachine call and
        set m.unit. Raises ErrnoError("Failed to determine unit of process N : ...")."""
        ...

    def unit_of_pid(self, pid: int) -> str | None:
        """The unit whose cgroup holds pid, or None."""
        ...

    async def stop(self, m: Machine) -> str:
        """Stop the machine's unit; returns a stop job path or ""."""
        ...

    async def kill(self, m: Machine, signo: int) -> None:
        """Signal every process of the machine's unit."""
        ...

    async def unit_is_active(self, m: Machine) -> bool: ...

    async def job_is_active(self, job: str) -> bool: ...

    async def release(self, m: Machine) -> None:
        """The machine that owned its unit is freed: drop our reference on the unit if we hold
        one (m.referenced), and whatever else the backend keeps about it."""
        ...

    def adopt(self, m: Machine) -> bool:
        """A machine reloaded from its state file: re-attach its unit. False when the recorded
        unit does not hold the leader any more (the PID was reused)."""
        ...


class HostServices(Protocol):
    """The host's service manager (org.freedesktop.systemd1), which starts the programs of
    shells and logins outside the daemon's own sandbox: on `.host` as 252 has it start them
    (a PAM session, utmp), in containers through machined/enter.py."""

    async def start_transient_service(self, unit: str, properties: ScopeProperties) -> None: ...

    async def start_unit(self, unit: str) -> None: ...


class ProcessWatcher(Protocol):
    """Tells when a process exits (pidfd-based on Linux)."""

    def watch(self, pid: int, on_exit: Callable[[], None]) -> bool:
        """Start watching; False if pid does not exist."""
        ...

    def unwatch(self, pid: int) -> None: ...

    def alive(self, pid: int) -> bool: ...

    def started_after(self, pid: int, monotonic_usec: int) -> bool:
        """pid is a process that started after that time of CLOCK_MONOTONIC (µs), for sure."""
        ...

    def signal(self, pid: int, signo: int) -> None:
        """Send signo to pid (through its pidfd when watched); raises OSError."""
        ...


class RegistryListener(Protocol):
    """Told about machines going live and going away (the bus layer emits MachineNew /
    MachineRemoved; it serves objects straight from the table)."""

    def machine_new(self, m: Machine) -> None: ...

    def machine_removed(self, m: Machine) -> None: ...

    def machine_freed(self, m: Machine) -> None:
        """The machine left the table (work still running for it must end)."""
        ...


class Listeners:
    """Several RegistryListeners as one, told in order."""

    def __init__(self, *listeners: RegistryListener) -> None:
        self.listeners = listeners

    def machine_new(self, m: Machine) -> None:
        for listener in self.listeners:
            listener.machine_new(m)

    def machine_removed(self, m: Machine) -> None:
        for listener in self.listeners:
            listener.machine_removed(m)

    def machine_freed(self, m: Machine) -> None:
        for listener in self.listeners:
            listener.machine_freed(m)
