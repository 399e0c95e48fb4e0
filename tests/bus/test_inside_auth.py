"""Authorization of the methods that work inside machines (spec §4.3): polkit actions and
details, no authorization for the facts, and only root gets a shell in a machine that shares
the host's user namespace (even when polkit says yes)."""

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, busctl, clean_state

from .test_auth import DEST, IFACE, PATH, polkit, polkit_allow, register, sleeper

__all__ = ["polkit", "sleeper"]  # fixtures shared with test_auth.py
MACHINE_PATH = "/org/freedesktop/machine1/machine/inauth"
MACHINE = "org.freedesktop.machine1.Machine"


@pytest.fixture
def daemon(polkit: BusDaemon) -> Iterator[Machined]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    clean_state()
    d = Machined(polkit, "--scope-backend=cgroupfs", "--stop-timeout=3")
    yield d
    d.stop()
    clean_state()
    assert not d.unexpected_errors()


def nobody(bus: BusDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return busctl(bus, "call", DEST, *args, user="nobody", check=False)


def test_inside_methods_ask_polkit(daemon: Machined, polkit: BusDaemon,
                                   sleeper: subprocess.Popen[bytes]) -> None:
    bus = polkit
    register(bus, "inauth", sleeper.pid)  # a "container" in the host's namespaces
    denied = [
        (PATH, IFACE, "CopyToMachine", "sss", "inauth", "/etc/hostname", "/tmp/x"),
        (PATH, IFACE, "BindMountMachine", "sssbb", "inauth", "/tmp", "/mnt", "false", "false"),
        (MACHINE_PATH, MACHINE, "OpenPTY"),
        (MACHINE_PATH, MACHINE, "OpenLogin"),
        (MACHINE_PATH, MACHINE, "OpenShell", "ssasas", "", "", "0", "0"),
        (MACHINE_PATH, MACHINE, "OpenRootDirectory"),
    ]
    for path, iface, *call in denied:
        out = nobody(bus, path, iface, *call)
        assert out.stderr.strip() == "Call failed: Access denied", call
    calls = (bus.dir / "polkit.calls").read_text()
    for text in ("org.freedesktop.machine1.manage-machines", "org.freedesktop.machine1.open-pty",
                 "org.freedesktop.machine1.login", "org.freedesktop.machine1.shell",
                 '"verb": "copy", "src": "/etc/hostname", "dest": "/tmp/x"',
                 '"verb": "bind", "src": "/tmp", "dest": "/mnt"', '"verb": "open_root_directory"',
                 '{"machine": "inauth", "verb": "login"}',
                 '{"machine": "inauth", "user": "root", "program": "/bin/sh"}'):
        assert text in calls, (text, calls)

    # no authorization for facts
    out = nobody(bus, PATH, IFACE, "GetMachineUIDShift", "s", "inauth")
    assert out.stdout.strip() == "u 0", out.stderr
    out = nobody(bus, PATH, IFACE, "GetMachineOSRelease", "s", ".host")
    assert out.returncode == 0 and "ID" in out.stdout, out.stderr

    # polkit says yes: a PTY is fine, a shell in the host's user namespace is not
    polkit_allow(bus, "org.freedesktop.machine1.open-pty", "org.freedesktop.machine1.shell",
                 "org.freedesktop.machine1.host-shell")
    out = nobody(bus, MACHINE_PATH, MACHINE, "OpenPTY")
    assert out.returncode == 0 and "/dev/pts/" in out.stdout, out.stderr
    out = nobody(bus, MACHINE_PATH, MACHINE, "OpenShell", "ssasas", "", "", "0", "0")
    assert out.stderr.strip() == "Call failed: Access denied"
    out = nobody(bus, PATH, IFACE, "OpenMachineShell", "sssasas", ".host", "", "", "0", "0")
    assert out.stderr.strip() == "Call failed: Access denied"
