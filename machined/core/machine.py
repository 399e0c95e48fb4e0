"""The machine value object: what machined knows about one container or VM."""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field

from .names import bus_label_escape

MACHINE_PATH_PREFIX = "/org/freedesktop/machine1/machine/"


class MachineClass(enum.Enum):
    CONTAINER = "container"
    VM = "vm"
    HOST = "host"
    UNKNOWN = ""

    @property
    def can_start(self) -> bool:
        return self in (MachineClass.CONTAINER, MachineClass.VM)


def machine_path(name: str) -> str:
    return MACHINE_PATH_PREFIX + bus_label_escape(name)


USEC_INFINITY = 2**64 - 1


def timestamp_is_set(usec: int) -> bool:
    """systemd's timestamp_is_set(): neither 0 nor USEC_INFINITY."""
    return 0 < usec < USEC_INFINITY


@dataclass
class Timestamp:
    realtime: int  # µs since the epoch
    monotonic: int  # µs of CLOCK_MONOTONIC

    @classmethod
    def now(cls) -> Timestamp:
        return cls(time.clock_gettime_ns(time.CLOCK_REALTIME) // 1000,
                   time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    @classmethod
    def boot(cls) -> Timestamp:
        """The boot time, as the .host machine reports it: 252's dual_timestamp_from_boottime(0),
        CLOCK_BOOTTIME 0 mapped onto the other two clocks in µs, 0 where that would be negative.
        The monotonic part is 0 then: 252's C reads its clocks within a µs of each other, ours
        may take a few, so CLOCK_MONOTONIC is read first (it never runs ahead of BOOTTIME)."""
        monotonic = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000
        realtime = time.clock_gettime_ns(time.CLOCK_REALTIME) // 1000
        return cls(max(realtime - boot, 0), max(monotonic - boot, 0))


@dataclass(eq=False)
class Machine:
    name: str
    cls: MachineClass = MachineClass.UNKNOWN
    id: bytes = b""  # 16 bytes, or b"" when unset (an all-zero id counts as unset)
    service: str = ""
    root_directory: str = ""
    unit: str = ""
    scope_job: str = ""
    leader: int = 0
    timestamp: Timestamp | None = None
    netif: list[int] = field(default_factory=list)
    started: bool = False
    stopping: bool = False
    finalized: bool = False  # its files are gone; MachineRemoved was sent if it was announced
    # The scope is one this daemon made (a reloaded machine's too, when its unit has the name
    # the daemon gives scopes): garbage collection stops it. Nobody else's unit is stopped.
    own_scope: bool = False
    # This daemon holds something of the scope to let go when the machine goes (systemd1: an
    # AddRef reference, which dies with the bus connection, so not a reloaded machine's;
    # cgroupfs: the cgroup to remove).
    referenced: bool = False

    @functools.cached_property
    def path(self) -> str:
        return machine_path(self.name)  # the name never changes: escape it once

    @property
    def state(self) -> str:
        if self.cls is MachineClass.HOST:
            return "running"
        if self.stopping:
            return "closing"
        if self.scope_job:
            return "opening"
        return "running"

    @property
    def id_bytes(self) -> bytes:
        """The Id property: 16 bytes, or empty when unset."""
        return self.id if self.id and any(self.id) else b""
