"""Working inside a busybox container that runs no systemd and no D-Bus (spec §8): shell and
login through the unchanged machinectl in a real terminal, PTY, os-release, root directory,
copies (with hostile symlinks), bind mounts; and the errors for VMs and .host."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, busctl, have
from tests.helpers.images import make_node

from ..support import (
    DEST,
    MACHINE,
    MANAGER,
    MANAGER_PATH,
    Nspawn,
    Processes,
    dbus_call_error,
    machine_path,
    machinectl,
    mcall,
    mcall_data,
    register_machine,
)
from .support import Containers, Tmux, busybox_copy, run_on_terminal, unique

LOOP = "while :; do sleep 1; done"

pytestmark = pytest.mark.skipif(not have("systemd-nspawn") or not have("tmux"),
                                reason="needs systemd-nspawn and tmux")


@pytest.fixture(scope="module")
def tree(busybox_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_copy(busybox_tree, tmp_path_factory.mktemp("bb") / "root")


@pytest.fixture(scope="module")
def ct(daemon: tuple[BusDaemon, Machined], tree: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nspawn]:
    bus, machined = daemon
    cts = Containers(bus, machined, Processes(), tmp_path_factory.mktemp("bb-ct"))
    try:
        yield cts.start(tree, "bb", LOOP)
    finally:
        cts.close()


def root_of(ct: Nspawn) -> Path:
    """The container's root as its leader sees it (its mounts included)."""
    return Path(f"/proc/{ct.leader}/root")


def call_error(bus: BusDaemon, method: str, signature: str, *args: object) -> str:
    out = mcall(bus, method, signature, *args, check=False)
    assert out.returncode != 0, out.stdout
    return out.stderr.strip().removeprefix("Call failed: ")


def dbus_call(bus: BusDaemon, method: str, signature: str, args: list[object],
              path: str = MANAGER_PATH, iface: str = MANAGER) -> object:
    import dbus

    conn = dbus.bus.BusConnection(bus.address)
    try:
        return conn.call_blocking(DEST, path, iface, method, signature, args, timeout=30)
    finally:
        conn.close()


# ------------------------------------------------------------------------------ terminals
def test_shell_command_with_environment(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    script = ("echo X=$X; tty; id -u; readlink /proc/self/ns/pid; readlink /proc/self/ns/mnt; "
              "cat /proc/self/cgroup; cat /proc/1/cgroup; echo TERM=$TERM HOME=$HOME")
    # machinectl hands options after the machine name to the program: --setenv goes before
    screen = run_on_terminal(bus, f"machinectl shell --setenv=X=1 {ct.name} /bin/sh -c '{script}'",
                             tmp_path, until="HOME=")
    assert "X=1" in screen, screen
    assert re.search(r"^/dev/pts/\d+\s*$", screen, re.M), screen
    assert re.search(r"^0\s*$", screen, re.M), screen
    for ns in ("pid", "mnt"):
        assert os.readlink(f"/proc/{ct.leader}/ns/{ns}") in screen, (ns, screen)
    for hierarchy in ("0::", "name=systemd:"):
        cgroups = [line for line in screen.splitlines() if hierarchy in line]
        assert len(cgroups) in (0, 2) and len(set(cgroups)) <= 1, screen  # the leader's
    assert "HOME=/root" in screen and "TERM=" in screen, screen


def test_shell_as_user_interactive(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    t = Tmux(bus, f"machinectl shell alice@{ct.name}", tmp_path)
    try:
        t.wait("Connected to machine")
        t.send("id; echo HOME=$HOME; pwd; echo DONE", "Enter")
        screen = t.wait("DONE\n")
        assert "uid=1000(alice) gid=1000(alice)" in screen, screen
        assert "10(wheel)" in screen, screen
        assert "HOME=/home/alice" in screen and "\n/home/alice" in screen, screen
        t.send("exit", "Enter")
        t.wait_dead()
        assert "Connection to machine" in t.screen() and "terminated" in t.screen()
    finally:
        t.close()


def test_shell_unknown_user(bus: BusDaemon, ct: Nspawn) -> None:
    err = call_error(bus, "OpenMachineShell", "sssasas", ct.name, "mallory", "/bin/sh", 0, 0)
    assert f"User 'mallory' does not exist in machine '{ct.name}'." in err


def test_login_prompt(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    t = Tmux(bus, f"machinectl login {ct.name}", tmp_path)
    try:
        t.wait("login:")
        t.send("root", "Enter")  # root has an empty password in this tree
        t.send("echo LOGGED-$((40+2))", "Enter")
        t.wait("LOGGED-42")
        t.send("C-]", "C-]", "C-]")
        t.wait_dead()
    finally:
        t.close()


def test_open_pty_in_container_devpts(bus: BusDaemon, ct: Nspawn) -> None:
    import fcntl

    fd_obj, path = dbus_call(bus, "OpenMachinePTY", "s", [ct.name])  # type: ignore[misc]
    master = fd_obj.take()
    try:
        (number,) = struct.unpack("I", fcntl.ioctl(master, 0x80045430, b"\0" * 4))
        assert path == f"/dev/pts/{number}"
        # the slave lives in the container's own devpts instance, not the host's
        inside = os.stat(root_of(ct) / "dev/pts" / str(number))
        assert stat.S_ISCHR(inside.st_mode)
        assert inside.st_dev != os.stat("/dev/pts").st_dev
    finally:
        os.close(master)


# ------------------------------------------------------------------------------ facts
def test_os_release_list_status(bus: BusDaemon, ct: Nspawn) -> None:
    data = mcall_data(bus, "GetMachineOSRelease", "s", ct.name)[0]
    assert data == {"ID": "tiny", "NAME": "Tiny", "PRETTY_NAME": "Tiny busybox OS",
                    "VERSION_ID": "1"}
    assert bjson_machine(bus, ct.name, "GetOSRelease") == [data]
    rows = [line.split() for line in machinectl(bus, "list").stdout.splitlines()]
    assert [ct.name, "container", "systemd-nspawn", "tiny", "1", "-"] in rows, rows
    status = machinectl(bus, "status", ct.name).stdout
    assert re.search(r"^\s*OS: Tiny busybox OS$", status, re.M), status
    assert "UID Shift" not in status


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_os_release_that_is_not_a_file_is_refused_at_once(bus: BusDaemon, ct: Nspawn,
                                                          tree: Path, kind: str) -> None:
    """A FIFO would have blocked the daemon's event loop for good (252 waits on it too)."""
    etc = tree / "etc/os-release"
    saved = os.readlink(etc)
    etc.unlink()
    try:
        make_node(etc, kind)
        err = call_error(bus, "GetMachineOSRelease", "s", ct.name)
        assert err == "Child died abnormally.", err
        assert mcall_data(bus, "GetMachine", "s", ct.name)  # and the daemon goes on serving
    finally:
        etc.unlink()
        etc.symlink_to(saved)


def bjson_machine(bus: BusDaemon, name: str, method: str) -> object:
    out = busctl(bus, "--json=short", "call", DEST, machine_path(name), MACHINE, method)
    return json.loads(out.stdout)["data"]


def test_no_private_network_and_no_shift(bus: BusDaemon, ct: Nspawn) -> None:
    err = call_error(bus, "GetMachineAddresses", "s", ct.name)
    assert err == f"Machine {ct.name} does not use private networking"
    assert mcall_data(bus, "GetMachineUIDShift", "s", ct.name) == [0]
    assert mcall_data(bus, "MapFromMachineUser", "su", ct.name, 1000) == [1000]
    assert mcall_data(bus, "MapFromMachineGroup", "su", ct.name, 5) == [5]


def test_open_root_directory(bus: BusDaemon, ct: Nspawn) -> None:
    fd_obj = dbus_call(bus, "OpenMachineRootDirectory", "s", [ct.name])
    fd = fd_obj.take()  # type: ignore[attr-defined]
    try:
        assert os.fstat(fd).st_ino == os.stat(root_of(ct)).st_ino
        assert "bin" in os.listdir(fd)
        # through the fd the container's own mounts are seen (its /proc is mounted there)
        assert os.path.exists(f"/proc/self/fd/{fd}/proc/1/cmdline")
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ copies
def test_copy_to_and_from(bus: BusDaemon, ct: Nspawn, tree: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub/file").write_text("hello")
    os.chmod(src / "sub/file", 0o640)
    os.chown(src / "sub/file", 1234, 4321)
    (src / "link").symlink_to("sub/file")
    (src / "abs").symlink_to("/etc/shadow")
    machinectl(bus, "copy-to", ct.name, str(src), "/tmp/copied")
    inside = root_of(ct) / "tmp/copied"
    assert (inside / "sub/file").read_text() == "hello"
    st = os.stat(inside / "sub/file")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 4321)
    assert os.readlink(inside / "link") == "sub/file"
    assert os.readlink(inside / "abs") == "/etc/shadow"  # kept as a symlink, not followed

    # an existing target: FileExists, unless --force (replace)
    out = machinectl(bus, "copy-to", ct.name, str(src / "sub/file"), "/tmp/copied/sub/file",
                     check=False)
    assert out.returncode != 0 and "File exists" in out.stderr, out.stderr
    (src / "sub/file").write_text("again")
    machinectl(bus, "copy-to", "--force", ct.name, str(src / "sub/file"),
               "/tmp/copied/sub/file")
    assert (inside / "sub/file").read_text() == "again"

    # and back
    back = tmp_path / "back"
    machinectl(bus, "copy-from", ct.name, "/tmp/copied", str(back))
    assert (back / "sub/file").read_text() == "again"
    assert os.readlink(back / "abs") == "/etc/shadow"
    machinectl(bus, "copy-from", ct.name, "/etc/hostname", str(tmp_path / "hn"))
    assert (tmp_path / "hn").read_text() == "tinyhost\n"


def test_copy_errors(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    n = ct.name
    assert "No such file or directory" in call_error(bus, "CopyFromMachine", "sss", n,
                                                     "/nonexistent", str(tmp_path / "x"))
    assert "No such file or directory" in call_error(bus, "CopyToMachine", "sss", n,
                                                     "/etc/hostname", "/no/such/dir/x")
    assert call_error(bus, "CopyToMachine", "sss", n, "tmp/x", "/x") == \
        "Source path must be absolute."
    assert call_error(bus, "CopyToMachine", "sss", n, "/x", "tmp/y") == \
        "Destination path must be absolute."
    assert call_error(bus, "CopyToMachineWithFlags", "ssst", n, "/x", "/y", 2) == \
        "Invalid argument"
    assert call_error(bus, "CopyToMachine", "sss", ".host", "/x", "/y") == \
        "Copying files is only supported on container machines."


def test_copy_hostile_symlinks(bus: BusDaemon, ct: Nspawn, tree: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "data").write_text("host secret")
    # symlinks planted by the container that point to a host path
    evil = root_of(ct) / "tmp/evil"
    evil.symlink_to(str(secret))
    (root_of(ct) / "tmp/etc").symlink_to("/etc")

    # reading through them resolves inside the container: no host file is read
    err = call_error(bus, "CopyFromMachine", "sss", ct.name, "/tmp/evil/data",
                     str(tmp_path / "stolen"))
    assert "No such file or directory" in err
    assert not (tmp_path / "stolen").exists()
    machinectl(bus, "copy-from", ct.name, "/tmp/etc/hostname", str(tmp_path / "hn"))
    assert (tmp_path / "hn").read_text() == "tinyhost\n"  # the container's, not the host's

    # writing through them never writes on the host
    src = tmp_path / "payload"
    src.write_text("planted")
    err = call_error(bus, "CopyToMachine", "sss", ct.name, str(src), "/tmp/evil/planted")
    assert "No such file or directory" in err
    assert not (secret / "planted").exists()
    assert (secret / "data").read_text() == "host secret"


def test_copy_symlink_swap_during_copy(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    """The container swaps a directory of a tree being copied for a symlink to a host path,
    again and again: whatever the timing, nothing on the host outside the target is touched."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "data").write_text("host secret")
    base = root_of(ct) / "tmp/swap"
    (base / "d").mkdir(parents=True)
    for i in range(200):
        (base / "d" / f"f{i}").write_text("x" * 100)
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            try:
                os.rename(base / "d", base / "d.real")
                os.symlink(str(secret), base / "d")
                os.unlink(base / "d")
                os.rename(base / "d.real", base / "d")
            except OSError:
                pass

    t = threading.Thread(target=swapper)
    t.start()
    try:
        for i in range(8):
            dest = tmp_path / f"out{i}"
            mcall(bus, "CopyFromMachine", "sss", ct.name, "/tmp/swap", str(dest), check=False)
            for dirpath, _dirs, files in os.walk(dest):
                for f in files:
                    p = Path(dirpath) / f
                    assert p.is_symlink() or p.read_text() != "host secret"
            mcall(bus, "CopyToMachineWithFlags", "ssst", ct.name, str(tmp_path / f"out{i}"),
                  "/tmp/swap/d/in", 1, check=False)
    finally:
        stop.set()
        t.join()
    assert sorted(os.listdir(secret)) == ["data"]
    assert (secret / "data").read_text() == "host secret"


# ------------------------------------------------------------------------------ bind mounts
def test_bind_mount(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    src = tmp_path / "shared"
    src.mkdir()
    (src / "hello").write_text("from the host")
    machinectl(bus, "bind", "--mkdir", ct.name, str(src), "/mnt/shared")
    assert (root_of(ct) / "mnt/shared/hello").read_text() == "from the host"
    (root_of(ct) / "mnt/shared/back").write_text("from the container")
    assert (src / "back").read_text() == "from the container"

    machinectl(bus, "bind", "--mkdir", "--read-only", ct.name, str(src), "/mnt/ro")
    with pytest.raises(OSError) as e:
        (root_of(ct) / "mnt/ro/nope").write_text("x")
    assert e.value.errno == 30  # EROFS

    f = tmp_path / "single"
    f.write_text("one file")
    machinectl(bus, "bind", "--mkdir", ct.name, str(f), "/etc/single")
    assert (root_of(ct) / "etc/single").read_text() == "one file"

    out = machinectl(bus, "bind", ct.name, str(src), "/no/such/dir", check=False)
    assert out.returncode != 0
    assert (f"Failed to mount {src} on /no/such/dir in machine's namespace: "
            "No such file or directory") in out.stderr, out.stderr
    assert call_error(bus, "BindMountMachine", "sssbb", ct.name, "tmp", "", "false",
                      "false") == "Source path must be absolute and normalized."
    assert call_error(bus, "BindMountMachine", "sssbb", ct.name, "/tmp", "/a/../b", "false",
                      "false") == "Destination path must be absolute and normalized."


# ------------------------------------------------------------------------------ VMs, .host
def test_vm_and_host_answers(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    procs = Processes()
    try:
        sleeper = procs.sleeper()
        vm = unique("vm")
        register_machine(bus, vm, sleeper.pid, cls="vm")
        expected = {
            ("GetMachineAddresses", "s"):
                "Requesting IP address data is only supported on container machines.",
            ("GetMachineOSRelease", "s"):
                "Requesting OS release data is only supported on container machines.",
            ("GetMachineUIDShift", "s"):
                "UID/GID shift may only be determined for container machines.",
            ("OpenMachinePTY", "s"): "Operation not supported",
            ("OpenMachineLogin", "s"): "Operation not supported",
            ("OpenMachineRootDirectory", "s"):
                "Opening the root directory is only supported on container machines.",
        }
        for (method, sig), text in expected.items():
            name, msg = dbus_call_error(bus, DEST, MANAGER_PATH, MANAGER, method, sig, [vm])
            assert (name, msg) == ("org.freedesktop.DBus.Error.NotSupported", text), method
        name, msg = dbus_call_error(bus, DEST, MANAGER_PATH, MANAGER, "OpenMachineShell",
                                    "sssasas", [vm, "", "", [], []])
        assert (name, msg) == ("org.freedesktop.DBus.Error.NotSupported",
                               "Operation not supported")
        name, msg = dbus_call_error(bus, DEST, MANAGER_PATH, MANAGER, "BindMountMachine",
                                    "sssbb", [vm, "/tmp", "", False, False])
        assert msg == "Bind mounting is only supported on container machines."
        name, msg = dbus_call_error(bus, DEST, MANAGER_PATH, MANAGER, "MapFromMachineUser",
                                    "su", [vm, 0])
        assert (name, msg) == ("org.freedesktop.DBus.Error.InvalidArgs",
                               "Not supported for non-container machines.")
    finally:
        procs.cleanup()

    # .host
    assert mcall_data(bus, "GetMachineUIDShift", "s", ".host") == [0]
    host = mcall_data(bus, "GetMachineOSRelease", "s", ".host")[0]
    assert host["ID"] == "debian"
    assert call_error(bus, "MapFromMachineUser", "su", ".host", 0) == \
        "Not supported for non-container machines."
    assert call_error(bus, "MapFromMachineUser", "su", ".host", 4294967295) == \
        "Invalid user ID 4294967295"
    assert call_error(bus, "MapToMachineUser", "u", 1000) == \
        "User 1000 belongs to host UID range"
    assert call_error(bus, "MapToMachineGroup", "u", 1000) == \
        "Group 1000 belongs to host GID range"
    assert call_error(bus, "BindMountMachine", "sssbb", ".host", "/tmp", "", "false",
                      "false") == "Bind mounting is only supported on container machines."
    addrs = mcall_data(bus, "GetMachineAddresses", "s", ".host")[0]
    assert all(fam in (socket.AF_INET, socket.AF_INET6) for fam, _a in addrs)
    fd_obj, path = dbus_call(bus, "OpenMachinePTY", "s", [".host"])  # type: ignore[misc]
    os.close(fd_obj.take())
    assert path.startswith("/dev/pts/")


def test_host_shell(bus: BusDaemon, ct: Nspawn, tmp_path: Path) -> None:
    run_on_terminal(bus, "machinectl shell --setenv=Y=ok .host /bin/sh -c 'echo HOST-$Y'",
                    tmp_path, until="HOST-ok")


def test_shell_errors(bus: BusDaemon, ct: Nspawn) -> None:
    assert call_error(bus, "OpenMachineShell", "sssasas", ct.name, "root", "bin/sh", 0, 0) == \
        "Specified path 'bin/sh' is not absolute"
    assert call_error(bus, "OpenMachineShell", "sssasas", ct.name, "root", "/bin/sh", 0, 1,
                      "FOO") == "Invalid environment assignments"
    out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                          "busctl", "--system", "call", DEST, MANAGER_PATH, MANAGER,
                          "OpenMachinePTY", "s", ct.name], env=bus.env(), capture_output=True,
                         text=True, timeout=30)
    assert out.stderr.strip() == "Call failed: Access denied"  # busctl's words for it
