"""The README's first command as a new user runs it: scripts/demo.sh brings the daemon up on a
private bus with a container registered through systemd-nspawn, the commands it prints work,
and `scripts/demo.sh stop` leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers.busdaemon import REPO
from tests.helpers.daemon import cgroup2_mount, wait_for

from .support import pid_alive

DEMO = str(REPO / "scripts" / "demo.sh")
RUN = Path("/run/machined-demo")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the demo runs as root")


def test_demo_and_the_commands_it_prints(tmp_path: Path) -> None:
    if RUN.exists():
        pytest.fail(f"{RUN} exists: a demo already runs here")
    pids: list[int] = []
    try:
        out = subprocess.run([DEMO], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        assert re.search(r"^demo +container +systemd-nspawn +tiny +1 ", out.stdout, re.M), \
            out.stdout
        pids = [int((RUN / f"{what}.pid").read_text()) for what in ("dbus", "machined", "nspawn")]
        exported = re.search(r"export DBUS_SYSTEM_BUS_ADDRESS=(\S+)", out.stdout)
        assert exported, out.stdout
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": exported.group(1)}

        def run(*cmd: str) -> str:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)
            assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
            return done.stdout

        assert "demo" in run("machinectl", "list")
        status = run("machinectl", "status", "demo")
        assert "OS: Tiny busybox OS" in status and "Unit: machine-demo.scope" in status, status
        assert "Class=container" in run("machinectl", "show", "demo")
        assert "hello" in run("machinectl", "shell", "demo", "/bin/echo", "hello")
        run("machinectl", "copy-from", "demo", "/etc/hostname", str(tmp_path / "hostname"))
        assert (tmp_path / "hostname").read_text() == "demo\n"
        run("machinectl", "kill", "demo", "--signal=SIGCONT")
        assert "/org/freedesktop/machine1/machine/demo" in run("busctl", "tree",
                                                               "org.freedesktop.machine1")
        run("machinectl", "terminate", "demo")
        wait_for(lambda: "demo" not in run("machinectl", "list", "--no-legend"), 10,
                 what="the demo container to go")
        wait_for(lambda: not pid_alive(pids[2]), 10, what="systemd-nspawn to exit")
    finally:
        subprocess.run([DEMO, "stop"], capture_output=True, timeout=60)
    assert not RUN.exists()
    for pid in pids:
        assert not pid_alive(pid), pid
    wait_for(lambda: not (Path(cgroup2_mount()) / "machine.slice/machine-demo.scope").exists(),
             10, what="the demo's scope to be removed")
