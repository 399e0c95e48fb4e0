"""Containers shared by the tests of working inside machines (module-scoped: starting one
costs a second), and a real terminal (tmux) to drive machinectl shell/login through."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, cgroup2_mount, clean_state, wait_for

from ..support import Nspawn, Processes, cgroup_pids, scope_name

# Not the e2e prefix: the per-test cleanup of conftest.py would kill our shared containers.
PREFIX = "in4"
PROPAGATE = Path("/run/systemd/nspawn/propagate")
APPLETS = ("login", "id", "stat", "readlink", "ln", "mkdir", "rm", "env", "tty", "touch", "mv",
           "ls", "cat", "echo", "sleep", "ip", "test", "printf", "chown", "getty", "wc")


def unique(tag: str) -> str:
    return f"{PREFIX}{tag}{uuid.uuid4().hex[:5]}"


def busybox_copy(base: Path, dest: Path) -> Path:
    """A private copy of the busybox tree with more applets and two users."""
    shutil.copytree(base, dest, symlinks=True)
    dest.chmod(0o755)  # the copy got the mode of pytest's private temporary directory
    for applet in APPLETS:
        link = dest / "bin" / applet
        if not link.exists() and not link.is_symlink():
            link.symlink_to("busybox")
    (dest / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n")
    (dest / "etc/group").write_text("root:x:0:\nalice:x:1000:\nwheel:x:10:alice\n")
    (dest / "etc/shadow").write_text("root::19000::::::\nalice:!:19000::::::\n")
    (dest / "home/alice").mkdir(parents=True)
    os.chown(dest / "home/alice", 1000, 1000)
    return dest


@dataclass
class Containers:
    bus: BusDaemon
    machined: Machined
    procs: Processes
    workdir: Path
    started: list[Nspawn] = field(default_factory=list)

    def start(self, tree: Path, tag: str, script: str, options: tuple[str, ...] = ()) -> Nspawn:
        ct = Nspawn(self.bus, self.procs, tree, unique(tag), ["/bin/sh", "-c", script],
                    self.workdir, options=options)
        self.started.append(ct)
        ct.wait_registered(30)
        return ct

    def close(self) -> None:
        self.procs.cleanup()
        mount = Path(cgroup2_mount()) / "machine.slice"
        for ct in self.started:
            scope = mount / scope_name(ct.name)
            with contextlib.suppress(OSError):
                (scope / "cgroup.kill").write_text("1")
            with contextlib.suppress(AssertionError):
                wait_for(lambda s=scope: not s.exists() or not cgroup_pids(s), 5)
            for dirpath, _dirs, _files in os.walk(scope, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
            # nspawn removes its propagation directory only when it exits by itself
            shutil.rmtree(PROPAGATE / ct.name, ignore_errors=True)


def module_daemon() -> Iterator[tuple[BusDaemon, Machined]]:
    bus = BusDaemon("open")
    clean_state()
    d = Machined(bus, "--stop-timeout=3", "--scope-backend=cgroupfs")
    try:
        yield bus, d
    finally:
        d.stop()
        errors = d.unexpected_errors()
        log = d.log
        clean_state()
        bus.stop()
    assert not errors, "machined logged unexpected errors:\n" + log[-5000:]


class Tmux:
    """A real terminal: a tmux server of our own running one command."""

    def __init__(self, bus: BusDaemon, command: str, workdir: Path) -> None:
        self.socket = str(workdir / f"tmux-{uuid.uuid4().hex[:6]}")
        env = {**os.environ, **bus.env(), "TERM": "xterm"}
        self.env = env
        conf = workdir / "tmux.conf"  # set before the command runs: it may exit at once
        conf.write_text("set -g remain-on-exit on\n")
        subprocess.run(["tmux", "-S", self.socket, "-f", str(conf), "new-session", "-d",
                        "-x", "160", "-y", "40", command], env=env, check=True, timeout=10)

    def screen(self) -> str:
        out = subprocess.run(["tmux", "-S", self.socket, "capture-pane", "-p", "-S", "-200"],
                             env=self.env, capture_output=True, text=True, timeout=10)
        return out.stdout

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "-S", self.socket, "send-keys", *keys], env=self.env,
                       check=True, timeout=10)

    def wait(self, text: str, timeout: float = 15) -> str:
        try:
            wait_for(lambda: text in self.screen(), timeout, 0.1)
        except AssertionError:
            raise AssertionError(f"no {text!r} on the terminal:\n{self.screen()}") from None
        return self.screen()

    def dead(self) -> bool:
        out = subprocess.run(["tmux", "-S", self.socket, "display-message", "-p",
                              "#{pane_dead}"], env=self.env, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() == "1"

    def wait_dead(self, timeout: float = 15) -> None:
        try:
            wait_for(self.dead, timeout, 0.1)
        except AssertionError:
            raise AssertionError(f"the terminal's command still runs:\n{self.screen()}") from None

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], env=self.env,
                       capture_output=True, timeout=10)
        with contextlib.suppress(OSError):
            os.unlink(self.socket)
        time.sleep(0)


def run_on_terminal(bus: BusDaemon, command: str, workdir: Path, until: str) -> str:
    """Run command on a real terminal until `until` is on it and the command has exited (for
    machinectl shell: the shell's exit closes the session); returns the screen."""
    t = Tmux(bus, command, workdir)
    try:
        t.wait(until)
        t.wait_dead()
        return t.screen()
    finally:
        t.close()
