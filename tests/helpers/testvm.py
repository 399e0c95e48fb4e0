"""A "test VM": the cached Debian bookworm tree of scripts/debian-tree.sh booted with systemd as
PID 1 in `systemd-nspawn --boot`, on a host that may have no systemd at all.

The tree is never modified: the container runs on an overlay whose upper layer lives in a temp
dir. Without a host systemd, nspawn cannot get a scope of its own, so it is started inside a
cgroup that looks like one (machine.slice/testvm-NAME.scope, in every hierarchy systemd inside
will use) with --register=no --keep-unit. Commands run inside by entering all namespaces of the
container's PID 1 (nsenter), with a clean environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from .busdaemon import REPO
from .daemon import cgroup2_mount, wait_for

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LEGACY_SYSTEMD_HIERARCHY = Path("/sys/fs/cgroup/systemd")  # name=systemd on hybrid hosts


class TreeUnavailable(Exception):
    """The Debian tree could not be built (debootstrap cannot reach the archive)."""


def debian_tree() -> Path:
    """Build once (cached) and return the bookworm tree."""
    out = subprocess.run([str(REPO / "scripts/debian-tree.sh")], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        raise TreeUnavailable(out.stderr.strip().splitlines()[-1:] or out.stderr)
    return Path(out.stdout.strip())


class TestVM:
    __test__ = False  # not a pytest class

    def __init__(self, tree: Path, workdir: Path, name: str = "testvm") -> None:
        self.tree = tree
        self.name = name
        self.workdir = workdir
        self.root = workdir / "root"
        self.log_path = workdir / "console.log"
        self.scope = f"machine.slice/testvm-{name}.scope"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self._mounted = False
        self._scoped = False  # the fake scope cgroups exist

    # ------------------------------------------------------------------ life cycle
    def mount(self) -> None:
        """The tree at self.root, writable, on an overlay (without booting it)."""
        for d in ("upper", "work", "root"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.tree},upperdir={self.workdir / 'upper'},"
                        f"workdir={self.workdir / 'work'}", str(self.root)], check=True)
        self._mounted = True

    def boot(self, timeout: float = 120) -> None:
        self.mount()
        procs_files = []
        self._scoped = True
        for hier in self._hierarchies():
            (hier / self.scope).mkdir(parents=True, exist_ok=True)
            procs_files.append(str(hier / self.scope / "cgroup.procs"))
        # the shell moves itself into the fake scope, then becomes nspawn
        enter = "".join(f'echo $$ > "{p}"; ' for p in procs_files)
        cmd = ["sh", "-c", enter + 'exec "$@"', "sh", "systemd-nspawn", "--boot", "--quiet",
               "--register=no", "--keep-unit", "--private-network", "--console=read-only",
               "-D", str(self.root), "-M", self.name]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._find_leader, 30, 0.05, "the container's systemd to start")
        deadline = time.monotonic() + timeout
        while True:
            out = self.run("systemctl", "is-system-running", "--wait", check=False,
                           timeout=timeout)
            state = out.stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"test VM did not boot ({state!r} {out.stderr}):\n"
                                   + self.console)
            time.sleep(0.1)

    def _hierarchies(self) -> list[Path]:
        hiers = [Path(cgroup2_mount())]
        if LEGACY_SYSTEMD_HIERARCHY.is_dir():
            hiers.append(LEGACY_SYSTEMD_HIERARCHY)
        return hiers

    def _find_leader(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError("systemd-nspawn exited:\n" + self.console)
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") \
                    .read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    self.leader = int(child)
                    return True
        return False

    def stop(self) -> None:
        """Power off (SIGRTMIN+4 to systemd), kill what is left, unmount, remove cgroups."""
        if self.proc is not None and self.proc.poll() is None:
            if self.leader:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGRTMIN + 4)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._scoped:
            for hier in self._hierarchies():
                self._remove_cgroup(hier / self.scope)
        if self._mounted:
            subprocess.run(["umount", str(self.root)], check=False)
            self._mounted = False
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.workdir / "upper"),
                        str(self.workdir / "work")], check=False)

    @staticmethod
    def _remove_cgroup(path: Path) -> None:
        if not path.is_dir():
            return
        with contextlib.suppress(OSError):
            (path / "cgroup.kill").write_text("1")
        for dirpath, _dirs, _files in os.walk(path, topdown=False):
            for _ in range(50):
                try:
                    os.rmdir(dirpath)
                    break
                except OSError:
                    time.sleep(0.1)

    @property
    def console(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    # ------------------------------------------------------------------ commands inside
    def command(self, *args: str, user: str | None = None) -> list[str]:
        env = ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "TERM=dumb",
               f"HOME={'/root' if user is None else '/home/' + user}", "SYSTEMD_PAGER=",
               "SYSTEMD_COLORS=0"]
        cmd = ["nsenter", "-t", str(self.leader), "-a", *env]
        if user is not None:
            cmd += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        return cmd + list(args)

    def run(self, *args: str, user: str | None = None, check: bool = True,
            timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(self.command(*args, user=user), capture_output=True, text=True,
                             timeout=timeout, input=input)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed with {out.returncode}:\n"
                                 f"{out.stdout}{out.stderr}")
        return out

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kw)  # type: ignore[arg-type]

    def path(self, inside: str) -> Path:
        """A path of the container, seen from the host (through the overlay)."""
        return self.root / inside.lstrip("/")
