"""Run the machined of this checkout against a private bus, and clean up after it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .busdaemon import REPO, BusDaemon
from .process import stop_process

STATE_DIR = Path("/run/systemd/machines")


def busctl(bus: BusDaemon, *args: str, check: bool = True, user: str | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess[str]:
    cmd = ["busctl", "--system", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user if user != 'nobody' else 'nogroup'}",
               "--clear-groups", *cmd]
    return subprocess.run(cmd, env=bus.env(), capture_output=True, text=True, check=check,
                          timeout=timeout)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)


class Machined:
    """One daemon process; `log` collects its stderr. Its userdb socket goes into the bus's
    directory (`userdb_socket`), not the host's /run/systemd/userdb where nss-systemd looks."""

    def __init__(self, bus: BusDaemon, *extra: str, env: dict[str, str] | None = None) -> None:
        self.bus = bus
        self.env = {**bus.env(), **(env or {})}
        self.userdb_dir = bus.dir / "userdb"
        if not any(a.startswith("--userdb-dir") for a in extra):
            extra = (*extra, f"--userdb-dir={self.userdb_dir}")
        self.extra = extra
        self.log_path = bus.dir / f"machined.{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "machined", "--log-level=debug", *self.extra],
            cwd=REPO, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._ready, 15, what="machined to own org.freedesktop.machine1")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError("machined exited early:\n" + self.log)
        out = busctl(self.bus, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                     "org.freedesktop.DBus", "NameHasOwner", "s", "org.freedesktop.machine1",
                     check=False)
        return out.stdout.strip() == "b true" and "Ready" in self.log

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def userdb_socket(self) -> Path:
        return self.userdb_dir / "io.systemd.Machine"

    def stop(self) -> int | None:
        assert self.proc is not None
        code = stop_process(self.proc, 10)
        self.log_file.close()
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.log_file.close()

    def unexpected_errors(self) -> list[str]:
        """Lines that show the daemon hit something it did not expect (firewalld's rule: a
        test fails when the daemon logs an unexpected error)."""
        return [line for line in self.log.splitlines()
                if "Traceback" in line or "Unexpected error" in line or " CRITICAL " in line]


def cgroup2_mount() -> str:
    sys.path.insert(0, str(REPO))
    from machined.linux.cgroups import cgroup2_mount as find

    mount = find()
    assert mount, "no cgroup2 hierarchy"
    return mount


def clean_state() -> None:
    """Remove state files and empty machine scopes a test run may have left."""
    if STATE_DIR.exists():
        for entry in STATE_DIR.iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()
    slice_dir = Path(cgroup2_mount()) / "machine.slice"
    if slice_dir.exists():
        for dirpath, _dirs, _files in os.walk(slice_dir, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
    from machined.linux.cgroups import systemd_v1_mount  # the path is set: see cgroup2_mount

    remove_empty_cgroups(systemd_v1_mount(), "machine-*.scope")


def remove_empty_cgroups(mount: str | None, pattern: str) -> None:
    """rmdir the empty cgroups matching pattern in machine.slice of the hierarchy at mount
    (the name=systemd one of a hybrid host, where nspawn mirrors its cgroup), subtrees first."""
    if mount is None:
        return
    for scope in (Path(mount) / "machine.slice").glob(pattern):
        for dirpath, _dirs, _files in os.walk(scope, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def require_root() -> None:
    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
