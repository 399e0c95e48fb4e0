"""A process in a user namespace of its own, with ID maps, as a container leader (nspawn -U)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Runs as: python -c SCRIPT CGROUP_PROCS UID_MAP GID_MAP. Joins the cgroup, forks a child that
# unshares a user namespace and waits until its maps are written (only a process outside may
# write them), then execs sleep; prints the child's PID and exits.
_SCRIPT = r"""
import ctypes, os, sys
open(sys.argv[1], "w").write(str(os.getpid()))
libc = ctypes.CDLL(None, use_errno=True)
unshared_r, unshared_w = os.pipe()
mapped_r, mapped_w = os.pipe()
pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        os._exit(1)
    os.write(unshared_w, b"u")
    os.read(mapped_r, 1)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.execvp("sleep", ["sleep", "600"])
if os.read(unshared_r, 1) != b"u":
    sys.exit("the child could not unshare its user namespace")
for name, text in (("uid_map", sys.argv[2]), ("gid_map", sys.argv[3])):
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write(text)
os.write(mapped_w, b"m")
print(pid)
"""


def spawn_userns_leader(cgroup: Path, uid_map: str, gid_map: str) -> int:
    """PID of a `sleep` in cgroup (made if missing) and in a new user namespace whose maps are
    uid_map and gid_map ("INSIDE OUTSIDE COUNT" lines). The caller kills it (e.g. through the
    cgroup)."""
    cgroup.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(cgroup / "cgroup.procs"),
                          uid_map, gid_map], capture_output=True, text=True, check=True,
                         timeout=30)
    return int(out.stdout)
