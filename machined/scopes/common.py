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


def no_unit(pid: int, err: int) -> ErrnoError:
    """The error RegisterMachine gives when the leader's unit is not found (§6.3.2, note the
    space)."""
    return ErrnoError(err, f"Failed to determine unit of process {pid} : {os.strerror(err)}")


def leader_unit(pid: int) -> tuple[str, str]:
    """(unit holding pid, pid's cgroup), or no_unit()."""
    try:
        path = cgroups.pid_cgroup(pid)
        unit = cgroups.unit_of_cgroup(path)
    except ErrnoError as e:
        raise no_unit(pid, e.errno) from None
    if unit is None:
        raise no_unit(pid, errno.ENXIO)
    return unit, path
