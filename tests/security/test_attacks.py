"""Known attacks on machined (spec §4, §5, §7.4, §8, §10; the unprivileged tests systemd added to
TEST-13-NSPAWN after the local-root bug of its 258 release candidates)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import (
    Nspawn,
    Processes,
    kill_test_cgroups,
    pid_alive,
    unique_name,
)
from tests.helpers.busdaemon import BusDaemon
from tests.helpers.client import MANAGER_PATH, RawClient
from tests.helpers.daemon import STATE_DIR, Machined, wait_for

from .conftest import (
    make_image,
    start_daemon,
    stop_daemon,
)

INVALID = "org.freedesktop.DBus.Error.InvalidArgs"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
LOCKS = Path("/run/systemd/nspawn/locks")


@pytest.fixture
def daemon(bus: BusDaemon, images: Path) -> Iterator[Machined]:
    d = start_daemon(bus, images)
    try:
        yield d
    finally:
        errors = stop_daemon(d)
        kill_test_cgroups()
    assert not errors, "machined logged unexpected errors:\n" + "\n".join(errors)


@pytest.fixture
def root(bus: BusDaemon, daemon: Machined) -> Iterator[RawClient]:
    c = RawClient(bus)
    yield c
    c.close()


@pytest.fixture
def nobody(bus: BusDaemon, daemon: Machined) -> Iterator[RawClient]:
    # the open bus: only the daemon's own checks stand between nobody and the method
    c = RawClient(bus, "nobody")
    yield c
    c.close()


@pytest.fixture
def procs() -> Iterator[Processes]:
    p = Processes()
    yield p
    p.cleanup()


def register(client: RawClient, name: str, leader: int, cls: str = "container",
             root: str = "") -> tuple[object, ...]:
    return client.manager("RegisterMachine", "sayssus", name, b"", "sec", cls, leader, root)


def names(client: RawClient) -> list[str]:
    answer = client.manager("ListMachines")
    assert answer[0] == "ok", answer
    return [m[0] for m in answer[1][0]]


# ------------------------------------------------------------------ registration
@pytest.mark.parametrize("method", ["RegisterMachine", "CreateMachine"])
def test_nobody_cannot_make_a_root_process_a_leader(root: RawClient, nobody: RawClient,
                                                    procs: Processes, method: str) -> None:
    """Registering is root-only in 252 (no UNPRIVILEGED flag): a non-root caller cannot claim a
    process it does not own (nor its own) as a machine leader, whatever the bus policy."""
    victim = procs.sleeper()
    for leader in (victim.pid, 0, os.getpid()):
        args: tuple[object, ...] = ("secsteal", b"", "", "container", leader, "")
        sig = "sayssus"
        if method == "CreateMachine":
            args, sig = (*args, []), "sayssusa(sv)"
        answer = nobody.manager(method, sig, *args)
        assert answer == ("error", ACCESS_DENIED,
                          f"Access to org.freedesktop.machine1.Manager.{method}() not permitted.")
    assert "secsteal" not in names(root)
    assert not (STATE_DIR / "secsteal").exists()
    assert pid_alive(victim.pid)


def test_class_host_is_refused(root: RawClient, procs: Processes) -> None:
    """Debian's fix for CVE-2026-4105 (spec §5.3): nobody registers a second "host"."""
    leader = procs.sleeper().pid
    assert register(root, "sechost", leader, cls="host") == (
        "error", INVALID, "Invalid machine class parameter")
    assert root.manager("CreateMachine", "sayssusa(sv)", "sechost", b"", "", "host", leader, "",
                        []) == ("error", INVALID, "Invalid machine class parameter")
    assert "sechost" not in names(root)


# ------------------------------------------------------------------ PID reuse
def spawn_with_pid(pid: int, procs: Processes, cmd: list[str]) -> subprocess.Popen[bytes] | None:
    """A new process that gets exactly `pid` (ns_last_pid, as CRIU does); None if other
    processes of the machine keep taking it."""
    for _ in range(50):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        p = procs.spawn(cmd)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


def reuse(pid: int, procs: Processes) -> subprocess.Popen[bytes]:
    p = spawn_with_pid(pid, procs, ["sleep", "600"])
    if p is None:
        pytest.skip(f"could not get PID {pid} again (a busy machine)")
    return p


def test_dead_leader_pid_reused_while_running(root: RawClient, procs: Processes) -> None:
    """The daemon follows the leader through a pidfd: once it died, a new process that gets
    the same PID is nobody's leader."""
    first = procs.sleeper()
    assert register(root, "secreuse", first.pid)[0] == "ok"
    first.kill()
    first.wait()


    wait_for(lambda: "secreuse" not in names(root), 10, what="the machine to go")
    second = reuse(first.pid, procs)
    assert root.manager("GetMachineByPID", "u", second.pid)[1] == \
        "org.freedesktop.machine1.NoMachineForPID"
    assert "secreuse" not in names(root)


@pytest.mark.parametrize("how", ["RegisterMachine", "CreateMachine"])
def test_dead_leader_pid_reused_while_daemon_down(bus: BusDaemon, daemon: Machined,
                                                  root: RawClient, procs: Processes,
                                                  how: str) -> None:
    """The daemon is down when the leader dies and its PID is taken again: at start-up it must
    not adopt the stranger as the machine's leader (spec §7.4 says 252 trusts LEADER blindly;
    we do not)."""
    first = procs.sleeper()
    if how == "RegisterMachine":
        assert register(root, "secreuse", first.pid)[0] == "ok"
    else:
        assert root.manager("CreateMachine", "sayssusa(sv)", "secreuse", b"", "", "container",
                            first.pid, "", [])[0] == "ok"
    daemon.kill9()
    first.kill()
    first.wait()
    second = reuse(first.pid, procs)
    daemon.start()
    assert "secreuse" not in names(root)
    assert root.manager("GetMachineByPID", "u", second.pid)[1] == \
        "org.freedesktop.machine1.NoMachineForPID"
    assert not (STATE_DIR / "secreuse").exists()
    assert pid_alive(second.pid)


# ------------------------------------------------------------------ image names
BAD_NAMES = ["a/b", "..", ".", "../escape", "x/../../escape", "/abs", "", "a" * 256, "\x01ctl",
             "\x7f", ".#temp"]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=[repr(b)[:20] for b in BAD_NAMES])
def test_image_names_that_escape_or_hide(root: RawClient, images: Path, bad: str) -> None:
    make_image(images, "secgood")
    outside = set(images.rglob("*"))
    message = f"Image name '{bad}' is invalid."
    for member, sig, args in (("RemoveImage", "s", (bad,)),
                              ("MarkImageReadOnly", "sb", (bad, True)),
                              ("GetImageOSRelease", "s", (bad,)),
                              ("SetImageLimit", "st", (bad, 1 << 20)),
                              ("RenameImage", "ss", (bad, "x")),
                              ("CloneImage", "ssb", (bad, "x", False)),
                              ("RenameImage", "ss", ("secgood", bad)),
                              ("CloneImage", "ssb", ("secgood", bad, False))):
        assert root.manager(member, sig, *args) == ("error", INVALID, message), member
    assert root.manager("GetImage", "s", bad)[1] == "org.freedesktop.machine1.NoSuchImage"
    assert set(images.rglob("*")) == outside  # nothing made, moved or removed
    assert (images / "var/lib/machines/secgood/etc/os-release").exists()


def test_image_name_of_255_bytes(root: RawClient, images: Path) -> None:
    """255 bytes is a valid name (256 is not, above), but as in 252 the lookup of NAME.raw and
    the name lock file "name-NAME" are too long: the error says so, and nothing is left
    behind."""
    make_image(images, "secgood")
    before = set(images.rglob("*"))
    assert root.manager("GetImage", "s", "b" * 255) == (
        "error", "System.Error.ENAMETOOLONG", "File name too long")
    assert root.manager("CloneImage", "ssb", "secgood", "b" * 255, False) == (
        "error", "System.Error.ENAMETOOLONG", "File name too long")
    assert set(images.rglob("*")) == before


def test_nul_in_image_name_cannot_be_sent(root: RawClient, images: Path) -> None:
    """The D-Bus wire format has no NUL in strings: libraries refuse to build such a message
    (dbus-python) or end the string at the NUL (sd-bus takes C strings), so the daemon only
    ever sees a valid prefix; nothing reaches it with a NUL in a name."""
    import dbus

    make_image(images, "secgood")
    msg = dbus.lowlevel.MethodCallMessage("org.freedesktop.machine1", MANAGER_PATH,
                                          "org.freedesktop.machine1.Manager", "RemoveImage")
    with pytest.raises(ValueError, match="embedded null"):
        msg.append("secgood\x00/../..", signature="s")
    assert (images / "var/lib/machines/secgood/etc/os-release").exists()
    assert root.manager("ListImages")[0] == "ok"


def test_image_object_paths_do_not_escape(root: RawClient, images: Path) -> None:
    """Object path labels are unescaped to names (spec §2.2): "_2e_2e" is "..", "_2f" is "/"."""
    make_image(images, "secgood")
    for label in ("_2e_2e", "a_2fb", "_2e_2e_2fsecgood", "_2e_23secgood"):
        answer = root.call(f"{MANAGER_PATH}/image/{label}", "org.freedesktop.machine1.Image",
                           "Remove")
        assert answer[:2] == ("error", "org.freedesktop.DBus.Error.UnknownObject"), label
    assert (images / "var/lib/machines/secgood/etc/os-release").exists()


# ------------------------------------------------------------------ CleanPool and locks
def test_clean_pool_never_removes_an_image_in_use(bus: BusDaemon, daemon: Machined,
                                                  root: RawClient, images: Path,
                                                  busybox_tree: Path, procs: Processes,
                                                  tmp_path: Path) -> None:
    pool = images / "var/lib/machines"
    hidden = pool / ".e2esecbusy"
    subprocess.run(["cp", "-a", str(busybox_tree), str(hidden)], check=True)
    make_image(images, ".secidle")
    st = os.stat(hidden)
    name = unique_name("busy")
    try:
        ct = Nspawn(bus, procs, hidden, name, ["/bin/sh", "-c", "sleep 60"], tmp_path)
        ct.wait_registered()
        answer = root.manager("CleanPool", "s", "hidden")
        assert answer[0] == "ok", answer
        removed = [n for n, _usage in answer[1][0]]
        assert removed == [".secidle"]
        assert (hidden / "bin/busybox").exists()
        assert not (pool / ".secidle").exists()
    finally:
        procs.cleanup()
        (LOCKS / f"inode-{st.st_dev}:{st.st_ino}").unlink(missing_ok=True)
        (pool / ".#.e2esecbusy.lck").unlink(missing_ok=True)
    # no longer in use: now it goes
    answer = root.manager("CleanPool", "s", "hidden")
    assert answer[0] == "ok" and [n for n, _ in answer[1][0]] == [".e2esecbusy"], answer


# ------------------------------------------------------------------ working inside machines
@pytest.fixture
def hostile_tree(busybox_tree: Path, tmp_path: Path) -> Iterator[Path]:
    """A container root whose os-release and a directory are symlinks aimed at host files."""
    tree = tmp_path / "hostile"
    subprocess.run(["cp", "-a", str(busybox_tree), str(tree)], check=True)
    (tree / "etc/os-release").unlink()
    (tree / "usr/lib/os-release").unlink()
    (tree / "etc/os-release").symlink_to("/etc/shadow")
    (tree / "evil").symlink_to("/etc")
    (tree / "evildir").symlink_to("/root")
    yield tree
    shutil.rmtree(tree, ignore_errors=True)


def chrooted_leader(procs: Processes, tree: Path) -> int:
    p = procs.spawn(["chroot", str(tree), "/bin/sleep", "600"])


    wait_for(lambda: os.readlink(f"/proc/{p.pid}/root") == str(tree), 5, what="chroot")
    return p.pid


def test_os_release_symlink_to_a_root_only_host_file(root: RawClient, procs: Processes,
                                                     hostile_tree: Path) -> None:
    """The daemon reads os-release inside the machine's root: a symlink to /etc/shadow resolves
    there (nothing), never to the host's shadow."""
    leader = chrooted_leader(procs, hostile_tree)
    assert register(root, "secosrel", leader, root=str(hostile_tree))[0] == "ok"
    answer = root.manager("GetMachineOSRelease", "s", "secosrel")
    assert answer == ("error", "org.freedesktop.DBus.Error.Failed",
                      "Machine does not contain OS release information")
    assert "root" not in repr(answer[1:])


def test_copy_through_container_symlinks_stays_inside(root: RawClient, procs: Processes,
                                                      hostile_tree: Path,
                                                      tmp_path: Path) -> None:
    leader = chrooted_leader(procs, hostile_tree)
    assert register(root, "seccopy", leader, root=str(hostile_tree))[0] == "ok"
    # copy-from: /evil/shadow in the container is the container's /etc/shadow (absent)
    target = tmp_path / "stolen"
    answer = root.manager("CopyFromMachine", "sss", "seccopy", "/evil/shadow", str(target))
    assert answer[0] == "error", answer
    assert not target.exists()
    # copy-to: writing /evildir/planted must not land in the host's /root
    src = tmp_path / "payload"
    src.write_text("planted\n")
    answer = root.manager("CopyToMachine", "sss", "seccopy", str(src), "/evildir/planted")
    assert not Path("/root/planted").exists()
    with contextlib.suppress(FileNotFoundError):
        Path("/root/planted").unlink()
    # and a plain container path is the container's, even for a leader that is only chrooted
    marker = f"/seccopy-marker-{os.getpid()}"
    try:
        assert root.manager("CopyToMachine", "sss", "seccopy", str(src), marker) == ("ok", ())
        assert (hostile_tree / marker.lstrip("/")).read_text() == "planted\n"
        assert not Path(marker).exists()
    finally:
        with contextlib.suppress(FileNotFoundError):
            Path(marker).unlink()


def test_no_unprivileged_shell_into_a_machine_in_the_host_user_namespace(
        root: RawClient, nobody: RawClient, procs: Processes) -> None:
    """The 258-rc bug: a machine whose leader shares the host's user namespace is the host;
    an unprivileged caller (polkit absent here) gets no shell, login or PTY in it."""
    leader = procs.sleeper().pid
    assert register(root, "secshell", leader)[0] == "ok"
    for member, sig, args in (("OpenMachineShell", "sssasas",
                               ("secshell", "root", "/bin/sh", ["/bin/sh"], [])),
                              ("OpenMachineLogin", "s", ("secshell",))):
        answer = nobody.manager(member, sig, *args)
        assert answer == ("error", ACCESS_DENIED, "Permission denied"), member
    assert nobody.manager("OpenMachinePTY", "s", "secshell")[1] == ACCESS_DENIED
    with contextlib.suppress(ProcessLookupError):
        os.kill(leader, signal.SIGKILL)
