"""scripts/install.sh --root: install into a system tree that is not running (an overlay of the
cached Debian tree, never booted), with the tree's own python3 and dpkg-divert, and uninstall
leaving every file as it was."""

from __future__ import annotations

import difflib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.busdaemon import REPO
from tests.helpers.testvm import TestVM

from .conftest import SNAPSHOT

pytestmark = [pytest.mark.root, pytest.mark.slow]

INSTALL = str(REPO / "scripts/install.sh")


@pytest.fixture
def tree(bookworm_tree: Path, tmp_path: Path) -> Iterator[Path]:
    t = TestVM(bookworm_tree, tmp_path)
    t.mount()
    try:
        yield t.root
    finally:
        t.stop()


def snapshot(root: Path) -> str:
    return subprocess.run(["chroot", str(root), "sh", "-c", SNAPSHOT], capture_output=True,
                          text=True, check=True, timeout=120).stdout


def test_install_and_uninstall_with_root(tree: Path, wheelhouse: Path) -> None:
    before = snapshot(tree)
    subprocess.run([INSTALL, "install", "--root", str(tree), "--wheelhouse", str(wheelhouse)],
                   check=True, capture_output=True, timeout=300)
    # nothing in /etc, which stays the administrator's (systemctl mask, edit, drop-ins)
    assert not (tree / "etc/systemd/system/systemd-machined.service").exists()
    # systemd-container's alias (by name) serves ours as well: no second one
    assert not (tree / "etc/systemd/system/dbus-org.freedesktop.machine1.service").is_symlink()
    assert (tree / "lib/systemd/system/dbus-org.freedesktop.machine1.service").readlink() == \
        Path("systemd-machined.service")
    # the distribution's files moved aside with dpkg-divert, ours in their place
    diversions = subprocess.run(["chroot", str(tree), "dpkg-divert", "--list"],
                                capture_output=True, text=True, check=True).stdout
    for path, ours in [
        ("lib/systemd/system/systemd-machined.service", "units/systemd-machined.service"),
        ("usr/share/dbus-1/system-services/org.freedesktop.machine1.service",
         "units/org.freedesktop.machine1.service"),
        ("usr/share/dbus-1/system.d/org.freedesktop.machine1.conf",
         "policy/org.freedesktop.machine1.conf"),
        ("usr/share/polkit-1/actions/org.freedesktop.machine1.policy",
         "policy/org.freedesktop.machine1.policy"),
    ]:
        assert (tree / path).read_bytes() == (REPO / ours).read_bytes()
        assert (tree / f"{path}.distrib").exists()
        assert f"local diversion of /{path} to /{path}.distrib" in diversions
    version = subprocess.run(["chroot", str(tree), "/usr/lib/machined/bin/python3", "-m",
                              "machined", "--version"], capture_output=True, text=True,
                             check=True).stdout
    assert version.startswith("machined ")
    # a second install refuses, and changes nothing
    again = subprocess.run([INSTALL, "install", "--root", str(tree), "--wheelhouse",
                            str(wheelhouse)], capture_output=True, text=True)
    assert again.returncode != 0 and "already installed" in again.stderr

    subprocess.run([str(tree / "usr/lib/machined/install.sh"), "uninstall", "--root", str(tree)],
                   check=True, capture_output=True, timeout=120)
    after = snapshot(tree)
    assert after == before, "".join(difflib.unified_diff(
        before.splitlines(True), after.splitlines(True), "before", "after"))


def test_install_and_uninstall_without_dpkg(tree: Path, wheelhouse: Path) -> None:
    """Without dpkg nothing keeps a package upgrade from writing over a file in the
    distribution's place: the unit goes to /etc, and the distribution's files it replaces are
    kept as FILE.machined-orig until uninstall."""
    (tree / "var/lib/dpkg/status").rename(tree / "var/lib/dpkg/status.hidden")
    try:
        before = snapshot(tree)
        subprocess.run([INSTALL, "install", "--root", str(tree), "--wheelhouse",
                        str(wheelhouse)], check=True, capture_output=True, timeout=300)
        unit = tree / "etc/systemd/system/systemd-machined.service"
        assert unit.read_bytes() == (REPO / "units/systemd-machined.service").read_bytes()
        distribution = tree / "lib/systemd/system/systemd-machined.service"
        assert b"/lib/systemd/systemd-machined" in distribution.read_bytes()  # untouched
        conf = "usr/share/dbus-1/system.d/org.freedesktop.machine1.conf"
        assert (tree / conf).read_bytes() == \
            (REPO / "policy/org.freedesktop.machine1.conf").read_bytes()
        assert (tree / f"{conf}.machined-orig").exists()
        subprocess.run([str(tree / "usr/lib/machined/install.sh"), "uninstall", "--root",
                        str(tree)], check=True, capture_output=True, timeout=120)
        after = snapshot(tree)
        assert after == before, "".join(difflib.unified_diff(
            before.splitlines(True), after.splitlines(True), "before", "after"))
    finally:
        (tree / "var/lib/dpkg/status.hidden").rename(tree / "var/lib/dpkg/status")
