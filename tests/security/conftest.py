"""Fixtures of the security tests: a system-policy bus, the daemon on a private image pool,
raw clients running as root and as nobody, and a stand-in polkit."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.client import RawClient
from tests.helpers.daemon import Machined, busctl, clean_state, wait_for

PREFIX = "sec"  # every machine these tests register starts with it


class Sleepers:
    """Leader processes started by a test; all killed at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

        self.orphans: list[int] = []

    def start(self) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["sleep", "600"])
        self.procs.append(p)
        return p

    def start_orphan(self) -> int:
        """A sleeper whose parent is not this process: a caller that registers its own child
        counts as its supervisor and is moved into the machine's scope with it (the cgroupfs
        backend's nspawn --keep-unit rule), which a test process must avoid."""
        out = subprocess.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
        pid = int(out.stdout)
        self.orphans.append(pid)
        return pid

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for pid in self.orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def image_root() -> Path:
    """A private image search path root (ROOT/var/lib/machines is the pool)."""
    root = Path(tempfile.mkdtemp(prefix="machined-sec-images."))
    (root / "var/lib/machines").mkdir(parents=True)
    return root


@pytest.fixture
def images() -> Iterator[Path]:
    """A private image pool for one test, removed afterwards (also read-only images)."""
    root = image_root()
    yield root
    remove_tree(root)


def make_image(root: Path, name: str) -> Path:
    image = root / "var/lib/machines" / name
    (image / "etc").mkdir(parents=True, exist_ok=True)
    (image / "etc/os-release").write_text("ID=sectest\nNAME=Sectest\n")
    (image / "etc/hostname").write_text("sechost\n")
    return image


def remove_tree(path: Path) -> None:
    # images marked read-only are immutable (chattr +i) or mode 0555
    subprocess.run(["chattr", "-R", "-i", str(path)], check=False, capture_output=True)
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


class Polkit:
    """python-dbusmock's polkitd template, started and stopped on demand."""

    def __init__(self, bus: BusDaemon) -> None:
        self.bus = bus
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dbusmock", "--system", "-t", "polkitd"], env=self.bus.env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: busctl(self.bus, "status", "org.freedesktop.PolicyKit1",
                                check=False).returncode == 0, 15, what="mock polkitd")

    def allow(self, *actions: str) -> None:
        busctl(self.bus, "call", "org.freedesktop.PolicyKit1",
               "/org/freedesktop/PolicyKit1/Authority", "org.freedesktop.DBus.Mock",
               "SetAllowed", "as", str(len(actions)), *actions)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait()
        self.proc = None


def start_daemon(bus: BusDaemon, root: Path, *extra: str, clean: bool = True) -> Machined:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if clean:
        clean_state()
    return Machined(bus, "--scope-backend=cgroupfs", "--stop-timeout=3",
                    f"--image-root={root}", *extra)


def stop_daemon(d: Machined) -> list[str]:
    """Stop the daemon; the unexpected errors it logged, each with the lines that follow."""
    d.stop()
    keep = os.environ.get("MACHINED_KEEP_LOG")  # a path: keep the daemon's log for a post-mortem
    if keep:
        Path(keep).write_text(d.log)
    lines = d.log.splitlines()
    unexpected = set(d.unexpected_errors())
    errors = ["\n".join(lines[i:i + 25]) for i, line in enumerate(lines) if line in unexpected]
    clean_state()
    return errors


@pytest.fixture(scope="module")
def sec_bus() -> Iterator[BusDaemon]:
    """A bus with Debian's default-deny policy plus the shipped policy file."""
    b = BusDaemon("system")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def sec_images() -> Iterator[Path]:
    root = image_root()
    yield root
    remove_tree(root)


@pytest.fixture(scope="module")
def sec_daemon(sec_bus: BusDaemon, sec_images: Path) -> Iterator[Machined]:
    d = start_daemon(sec_bus, sec_images)
    yield d
    errors = stop_daemon(d)
    assert not errors, "machined logged unexpected errors:\n" + "\n".join(errors)


@pytest.fixture(scope="module")
def sleepers() -> Iterator[Sleepers]:
    s = Sleepers()
    yield s
    s.close()


@pytest.fixture(scope="module")
def root_client(sec_bus: BusDaemon, sec_daemon: Machined) -> Iterator[RawClient]:
    c = RawClient(sec_bus)
    yield c
    c.close()


@pytest.fixture(scope="module")
def nobody_client(sec_bus: BusDaemon, sec_daemon: Machined) -> Iterator[RawClient]:
    c = RawClient(sec_bus, "nobody")
    yield c
    c.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
