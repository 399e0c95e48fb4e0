"""A busybox container with its own user namespace (--private-users=pick) and network
(--network-veth): UID shift and ID mapping, copies with shifted ownership, bind mounts refused,
addresses from inside its network namespace (busctl, machinectl list/status, nss-mymachines)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, busctl, have, wait_for

from ..support import Nspawn, Processes, machine_path, machinectl, mcall, mcall_data
from .support import Containers, Tmux, busybox_copy, run_on_terminal

ADDR4 = "192.168.252.2"
ADDR6 = "fd00:252::2"
SETUP = (f"ip link set lo up; ip link set host0 up; ip addr add {ADDR4}/24 dev host0; "
         f"ip -6 addr add {ADDR6}/64 dev host0; echo ready > /tmp/ready; "
         "while :; do sleep 1; done")

pytestmark = pytest.mark.skipif(not have("systemd-nspawn"), reason="needs systemd-nspawn")


@pytest.fixture(scope="module")
def ct(daemon: tuple[BusDaemon, Machined], busybox_tree: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nspawn]:
    bus, machined = daemon
    tree = busybox_copy(busybox_tree, tmp_path_factory.mktemp("userns") / "root")
    cts = Containers(bus, machined, Processes(), tmp_path_factory.mktemp("userns-ct"))
    try:
        c = cts.start(tree, "un", SETUP, ("--private-users=pick",
                                          "--private-users-ownership=chown",
                                          "--network-veth"))
        ready = Path(f"/proc/{c.leader}/root/tmp/ready")
        wait_for(ready.exists, 15, what="the container's network setup")
        yield c
    finally:
        cts.close()


def shift_of(ct: Nspawn) -> int:
    base, shift, _range = Path(f"/proc/{ct.leader}/uid_map").read_text().split()
    assert base == "0"
    return int(shift)


def test_uid_shift_and_mapping(bus: BusDaemon, ct: Nspawn) -> None:
    shift = shift_of(ct)
    assert shift >= 65536
    assert mcall_data(bus, "GetMachineUIDShift", "s", ct.name) == [shift]
    assert mcall_data(bus, "MapFromMachineUser", "su", ct.name, 1000) == [shift + 1000]
    assert mcall_data(bus, "MapFromMachineGroup", "su", ct.name, 0) == [shift]
    assert mcall_data(bus, "MapToMachineUser", "u", shift + 1000) == \
        [ct.name, machine_path(ct.name), 1000]
    assert mcall_data(bus, "MapToMachineGroup", "u", shift + 5) == \
        [ct.name, machine_path(ct.name), 5]
    out = mcall(bus, "MapFromMachineUser", "su", ct.name, 70000, check=False)
    assert f"Machine '{ct.name}' has no matching user mappings." in out.stderr
    out = mcall(bus, "MapFromMachineGroup", "su", ct.name, 70000, check=False)
    assert f"Machine '{ct.name}' has no matching group mappings." in out.stderr
    out = mcall(bus, "MapToMachineUser", "u", 4000000000, check=False)
    assert "No matching user mapping for 4000000000." in out.stderr
    status = machinectl(bus, "status", ct.name).stdout
    assert f"UID Shift: {shift}" in status, status


def test_copy_shifts_ownership(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    shift = shift_of(ct)
    src = tmp_path / "f"
    src.write_text("x")
    os.chown(src, 1234, 1234)
    machinectl(bus, "copy-to", ct.name, str(src), "/tmp/f")
    st = os.stat(f"/proc/{ct.leader}/root/tmp/f")
    assert (st.st_uid, st.st_gid) == (shift, shift)  # root of the container

    inner = Path(f"/proc/{ct.leader}/root/tmp/alice-file")
    inner.write_text("y")
    os.chown(inner, shift + 1000, shift + 1000)
    machinectl(bus, "copy-from", ct.name, "/tmp/alice-file", str(tmp_path / "back"))
    st = os.stat(tmp_path / "back")
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_bind_mount_refused(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    out = machinectl(bus, "bind", ct.name, str(tmp_path), "/mnt", check=False)
    assert "Can't bind mount on container with user namespacing applied." in out.stderr


def test_addresses(bus: BusDaemon, ct: Nspawn) -> None:
    addrs = mcall_data(bus, "GetMachineAddresses", "s", ct.name)[0]
    assert addrs[0] == [2, [192, 168, 252, 2]], addrs
    assert [10, list(bytes.fromhex("fd000252" + "0" * 20 + "0002"))] in addrs, addrs
    assert all(fam == 10 for fam, _ in addrs[1:])
    rows = machinectl(bus, "list").stdout
    assert ADDR4 in rows, rows
    status = machinectl(bus, "status", ct.name).stdout
    assert ADDR4 in status and ADDR6 in status, status


def test_nss_mymachines(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    if not any(Path(d, "libnss_mymachines.so.2").exists()
               for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64",
                         "/usr/lib")):
        pytest.skip("libnss-mymachines is not installed")
    conf = tmp_path / "nsswitch.conf"
    conf.write_text("passwd: files\ngroup: files\nhosts: mymachines\n")
    # our nsswitch.conf in a private mount namespace: the host's stays as it is
    script = (f"mount --bind {conf} /etc/nsswitch.conf && getent hosts {ct.name} && "
              f"getent ahostsv4 {ct.name}")
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         env=bus.env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() in ([ADDR6, ct.name], [ADDR4, ct.name]), out.stdout
    assert lines[1].split()[0] == ADDR4, out.stdout


def test_shell_in_user_namespace(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    script = "echo ID=$(id -u):$(id -g); cat /proc/self/uid_map; ls -ln /tmp/ready; echo END"
    screen = run_on_terminal(bus, f"machinectl shell alice@{ct.name} /bin/sh -c '{script}'",
                             tmp_path, until="END")
    assert "ID=1000:1000" in screen, screen
    assert f"0 {shift_of(ct)} 65536" in " ".join(screen.split()), screen
    assert " 0 0 " in " ".join(screen.split()), screen  # root-owned file as root inside


def test_daemon_restart_with_a_shell_open(daemon: tuple[BusDaemon, Machined], ct: Nspawn,
                                          tmp_path: Path) -> None:
    """The daemon's process that holds a shell open in a container with a user namespace of
    its own has none of the daemon's sockets, and dies with a killed daemon even though
    entering the namespace made the kernel forget its parent-death signal: the next daemon
    gets the bus name at once, and the shell goes on (as it does with 252)."""
    bus, machined = daemon
    t = Tmux(bus, f"machinectl shell {ct.name} /bin/sh -c "
                  "'echo UP; read x; echo GOT-$x; sleep 1'", tmp_path)
    try:
        t.wait("UP")
        helpers = [int(pid) for task in Path(f"/proc/{machined.pid}/task").iterdir()
                   for pid in (task / "children").read_text().split()]
        assert helpers, "no process of the daemon holds the shell"
        for pid in helpers:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            assert not [link for link in links if link.startswith("socket:")], links
        machined.kill9()
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in helpers), 5,
                 what="the shell's helper process to die with the daemon")
        machined.start()

        def owner() -> str:
            return busctl(bus, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                          "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s",
                          "org.freedesktop.machine1", check=False).stdout.strip()

        wait_for(lambda: owner() == f"u {machined.pid}", 5, what="the new daemon to own the name")
        assert ct.name in machinectl(bus, "list").stdout
        t.send("hello", "Enter")
        t.wait("GOT-hello")
    finally:
        t.close()
