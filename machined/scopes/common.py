"""What both backends share: which unit a process is in."""

from __future__ import annotations

import errno
import os

from ..core.errors import ErrnoError
from ..linux import cgroups


def unit_of_pid(pid: int) -> str | None:
    try:
        return cgroups.unit_of_cgroup(cgroups.pid_cgroup(pid))
    except ErrnoError:
        return None


def leader_unit(pid: int) -> tuple[str, str]:
    """(unit holding pid, pid's cgroup), or the error RegisterMachine gives (§6.3.2, note the
    space)."""
    try:
        path = cgroups.pid_cgroup(pid)
        unit = cgroups.unit_of_cgroup(path)
    except ErrnoError as e:
        raise ErrnoError(e.errno, f"Failed to determine unit of process {pid} : "
                                  f"{os.strerror(e.errno)}") from None
    if unit is None:
        raise ErrnoError(errno.ENXIO, f"Failed to determine unit of process {pid} : "
                                      f"{os.strerror(errno.ENXIO)}")
    return unit, path
