"""The booted tier: a Debian bookworm system with systemd as PID 1 (tests/helpers/testvm.py), this
project installed into it with scripts/install.sh from a wheelhouse (offline: the test VM has no
network), and the scenario run against the real systemd, dbus-daemon and polkitd inside.

One VM per test module; the tests of a module run in file order and share it."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.busdaemon import REPO
from tests.helpers.daemon import have
from tests.helpers.testvm import TestVM, TreeUnavailable, debian_tree

from .scenario import start_container

MIRROR = os.environ.get("MIRROR", "http://deb.debian.org/debian")
# What the installer needs of the checkout inside the VM.
SOURCES = ("units", "policy", "scripts")
# Everything of the system that install may touch (path, mode, owner, group, type, link target;
# the hash of every file) and the dpkg diversions: equal before install and after uninstall.
SNAPSHOT = r"""{ find /etc /usr -xdev -printf '%p %m %U %G %y %l\n';
    find /etc /usr -xdev -type f -exec sha256sum {} +; dpkg-divert --list; } | sort"""


def archive_reachable() -> bool:
    try:
        with urllib.request.urlopen(f"{MIRROR}/dists/bookworm/Release", timeout=15):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def bookworm_tree() -> Path:
    if os.geteuid() != 0:
        pytest.skip("the booted tests need root")
    if not have("systemd-nspawn"):
        pytest.skip("systemd-container is not installed")
    try:
        return debian_tree()
    except TreeUnavailable as e:
        if not archive_reachable():
            pytest.skip(f"debootstrap cannot reach the Debian archive {MIRROR}: no test VM ({e})")
        raise


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of this checkout and its pinned dependencies, built on the host."""
    wheels = tmp_path_factory.mktemp("wheelhouse")
    out = subprocess.run([str(REPO / "scripts/install.sh"), "wheelhouse", str(wheels)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return wheels


class InstalledVM(TestVM):
    """A test VM with the project copied in (/root/src, /root/wheels) and installed."""

    before_install = ""

    def install(self) -> subprocess.CompletedProcess[str]:
        return self.run("/root/src/scripts/install.sh", "install", "--wheelhouse", "/root/wheels",
                        timeout=300)

    def snapshot(self) -> str:
        return self.sh(SNAPSHOT, timeout=120).stdout

    def machinectl(self, *args: str, user: str | None = None,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("machinectl", "--no-pager", "--no-legend", *args, user=user, check=check)


@pytest.fixture(scope="module")
def vm(bookworm_tree: Path, wheelhouse: Path, busybox_tree: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstalledVM]:
    v = InstalledVM(bookworm_tree, tmp_path_factory.mktemp("testvm"), "dropin")
    try:
        v.boot()
        src = v.path("/root/src")
        src.mkdir()
        for d in SOURCES:
            shutil.copytree(REPO / d, src / d, symlinks=True)
        shutil.copytree(wheelhouse, v.path("/root/wheels"))
        # a non-root user for the polkit checks, before the snapshot (it changes /etc)
        v.run("useradd", "--create-home", "alice")
        # container trees for nested nspawn (one per container: nspawn locks its directory)
        for name in ("tiny", "tinya", "tinyb", "tinyc", "tinyd", "tiny-e", "tinyu"):
            shutil.copytree(busybox_tree, v.path(f"/var/lib/machines/{name}"), symlinks=True)
        # a machine of the distribution's machined (252), which ours must take over
        start_container(v, "tinyd")
        v.before_install = v.snapshot()
        v.install()
        yield v
    finally:
        v.stop()
