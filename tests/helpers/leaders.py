"""Leaders for the machines a test registers: processes in cgroups of their own."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from .daemon import wait_for
from .process import stop_process


class CgroupLeaders:
    """Sleepers (and other leaders handed in with track()) in cgroups of their own; close()
    kills whatever is left in those cgroups and removes them."""

    def __init__(self) -> None:
        self.cgroups: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def sleeper(self, cgroup: Path) -> int:
        """PID of a `sleep` in cgroup (made if missing)."""
        self.track(cgroup)
        cgroup.mkdir(parents=True, exist_ok=True)
        p = subprocess.Popen(["sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec sleep 600"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.procs.append(p)
        wait_for(lambda: str(p.pid) in (cgroup / "cgroup.procs").read_text().split(), 5)
        return p.pid

    def track(self, cgroup: Path) -> None:
        self.cgroups.append(cgroup)

    def close(self) -> None:
        for cgroup in reversed(self.cgroups):  # a cgroup's children before it
            with contextlib.suppress(OSError):
                (cgroup / "cgroup.kill").write_text("1")
            with contextlib.suppress(AssertionError):
                wait_for(lambda c=cgroup: not (c / "cgroup.procs").exists()
                         or not (c / "cgroup.procs").read_text().strip(), 5)
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        for p in self.procs:
            stop_process(p, 5)
