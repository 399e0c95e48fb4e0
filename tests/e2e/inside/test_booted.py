"""Working inside a container booted with systemd (an overlay of the cached Debian tree from
scripts/debian-tree.sh; the cache itself is never written): shell and login through machinectl
in a real terminal, -M transports of busctl/systemctl/journalctl, os-release in list/status."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.busdaemon import REPO, BusDaemon
from tests.helpers.daemon import Machined, have, wait_for

from ..support import Nspawn, Processes, machinectl
from .support import Containers, Tmux, run_on_terminal

pytestmark = pytest.mark.skipif(not have("systemd-nspawn") or not have("tmux")
                                or not have("debootstrap"),
                                reason="needs systemd-nspawn, tmux and debootstrap")


@pytest.fixture(scope="module")
def debian_tree() -> Path:
    out = subprocess.run([str(REPO / "scripts/debian-tree.sh")], capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        pytest.skip("no Debian tree: " + out.stderr[-500:])
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def overlay(debian_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("booted")
    upper, work, merged = base / "upper", base / "work", base / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={debian_tree},upperdir={upper},workdir={work}", str(merged)],
                   check=True, timeout=30)
    try:
        merged.chmod(0o755)
        # a user of our own, written into the overlay
        with open(merged / "etc/passwd", "a") as f:
            f.write("bob:x:1500:1500:Bob:/home/bob:/bin/bash\n")
        with open(merged / "etc/group", "a") as f:
            f.write("bob:x:1500:\n")
        with open(merged / "etc/shadow", "a") as f:
            f.write("bob:!:19000:0:99999:7:::\n")
        (merged / "home/bob").mkdir(parents=True)
        os.chown(merged / "home/bob", 1500, 1500)
        yield merged
    finally:
        subprocess.run(["umount", "-l", str(merged)], timeout=30)


@pytest.fixture(scope="module")
def ct(daemon: tuple[BusDaemon, Machined], overlay: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nspawn]:
    bus, machined = daemon
    cts = Containers(bus, machined, Processes(), tmp_path_factory.mktemp("booted-ct"))
    try:
        c = Nspawn(bus, cts.procs, overlay, "in4boot" + os.urandom(3).hex(), [],
                   cts.workdir, options=("--boot",))
        cts.started.append(c)
        c.wait_registered(60)

        def booted() -> bool:
            out = subprocess.run(["systemctl", "-M", c.name, "is-system-running"],
                                 env=bus.env(), capture_output=True, text=True, timeout=30)
            return out.stdout.strip() in ("running", "degraded")

        wait_for(booted, 90, 0.5, "the container to boot")
        yield c
    finally:
        with contextlib.suppress(Exception):
            machinectl(bus, "poweroff", cts.started[0].name, check=False)
            cts.started[0].proc.wait(20)
        cts.close()


def test_shell_runs_in_the_booted_container(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    script = "echo X=$X; tty; readlink /proc/self/ns/pid; ps -p 1 -o comm=; echo END"
    screen = run_on_terminal(
        bus, f"machinectl shell --setenv=X=booted {ct.name} /bin/sh -c '{script}'", tmp_path,
        until="END")
    assert "X=booted" in screen, screen
    assert os.readlink(f"/proc/{ct.leader}/ns/pid") in screen, screen
    assert re.search(r"^systemd\s*$", screen, re.M), screen


def test_shell_as_user_with_login_shell(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    t = Tmux(bus, f"machinectl shell bob@{ct.name}", tmp_path)
    try:
        t.wait("Connected to machine")
        t.send("echo I-am-$(id -un)-in-$PWD-with-$0", "Enter")
        screen = t.wait("I-am-bob-in-/home/bob-with-/bin/bash")  # getent found the login shell
        t.send("exit", "Enter")
        t.wait_dead()
        assert "terminated" in t.screen(), screen
    finally:
        t.close()


def test_login_prompt(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    t = Tmux(bus, f"machinectl login {ct.name}", tmp_path)
    try:
        t.wait("login:")
        t.send("root", "Enter")  # the cached tree's root has an empty password
        t.send("echo LOGGED-$((40+2)) $(tty)", "Enter")
        screen = t.wait("LOGGED-42 /dev/pts/")
        t.send("C-]", "C-]", "C-]")
        t.wait_dead()
    finally:
        t.close()
    assert "testvm login:" in screen, screen


def test_transports_and_journal(bus: BusDaemon, ct: Nspawn) -> None:
    env = bus.env()
    out = subprocess.run(["busctl", "-M", ct.name, "get-property", "org.freedesktop.systemd1",
                          "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
                          "Virtualization"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.strip() == 's "systemd-nspawn"', out.stderr
    out = subprocess.run(["journalctl", "-M", ct.name, "--no-pager", "-q", "-n", "200"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "systemd" in out.stdout and out.stdout.count("\n") > 5, out.stdout


def test_os_release_in_list_and_status(bus: BusDaemon, ct: Nspawn) -> None:
    rows = [line.split() for line in machinectl(bus, "list").stdout.splitlines()]
    assert [ct.name, "container", "systemd-nspawn", "debian", "12", "-"] in rows, rows
    status = machinectl(bus, "status", ct.name).stdout
    assert "OS: Debian GNU/Linux 12 (bookworm)" in status, status
