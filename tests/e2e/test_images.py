"""The image pool against the unchanged machinectl and busctl: every image type on real file
systems made here (directory trees, btrfs on a loop file with and without quota, GPT and bare
ext4 raw images, a loop block device), every verb, the errors of 252, locks shared with
systemd-nspawn, and a 1 GiB clone during which the daemon keeps answering."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bus.test_auth import polkit, polkit_allow  # noqa: F401  (fixture)
from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, busctl, clean_state, have
from tests.helpers.images import (
    Pool,
    is_immutable,
    loop_devices_of,
    make_node,
    make_tree,
    mounts_below,
    run,
)

from .support import DEST, MANAGER, MANAGER_PATH, Nspawn, Processes, machinectl

IMAGE = "org.freedesktop.machine1.Image"
UINT64_MAX = 2**64 - 1
LOCKS = Path("/run/systemd/nspawn/locks")


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool()
    yield p
    p.cleanup()


@pytest.fixture
def imaged(bus: BusDaemon, pool: Pool) -> Iterator[Machined]:
    clean_state()
    d = Machined(bus, "--scope-backend=cgroupfs", f"--image-root={pool.root}")
    yield d
    d.stop()
    errors = d.unexpected_errors()
    clean_state()
    assert not errors, "machined logged unexpected errors:\n" + "\n".join(errors)


def call(bus: BusDaemon, method: str, sig: str = "", *args: Any, user: str | None = None,
         path: str = MANAGER_PATH, iface: str = MANAGER) -> Any:
    out = busctl(bus, "--json=short", "--timeout=120", "call", DEST, path, iface, method,
                 *([sig, *map(str, args)] if sig else []), user=user, timeout=150)
    return json.loads(out.stdout)["data"] if out.stdout.strip() else []


def error(bus: BusDaemon, method: str, sig: str = "", *args: Any, user: str | None = None,
          path: str = MANAGER_PATH, iface: str = MANAGER) -> str:
    """The error of a failing call, as `Name: message` (dbus-send prints both)."""
    cmd = ["dbus-send", "--system", "--print-reply", f"--dest={DEST}", path, f"{iface}.{method}",
           *args_for_dbus_send(sig, args)]
    if user:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
    out = subprocess.run(cmd, env=bus.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out.stdout
    return out.stderr.strip().removeprefix("Error ")


def args_for_dbus_send(sig: str, args: tuple[Any, ...]) -> list[str]:
    kinds = {"s": "string", "b": "boolean", "t": "uint64", "u": "uint32"}
    return [f"{kinds[k]}:{str(a).lower() if k == 'b' else a}" for k, a in zip(sig, args,
                                                                              strict=True)]


def images(bus: BusDaemon) -> dict[str, list[Any]]:
    return {i[0]: i for i in call(bus, "ListImages")[0]}


def props(bus: BusDaemon, name: str) -> dict[str, Any]:
    path = call(bus, "GetImage", "s", name)[0]
    out = busctl(bus, "--json=short", "call", DEST, path, "org.freedesktop.DBus.Properties",
                 "GetAll", "s", "")
    return {k: v["data"] for k, v in json.loads(out.stdout)["data"][0].items()}


# ------------------------------------------------------------------------------ discovery
def test_discovery_types_precedence_and_flags(imaged: Machined, bus: BusDaemon,
                                              pool: Pool) -> None:
    pool.directory("tiny")
    pool.directory(".hidden")
    pool.directory("shadowed", hostname="poolhost")
    pool.directory("shadowed", where=pool.etc, hostname="etchost")
    pool.directory("vendor", where=pool.vendor)
    pool.directory(".#partial")
    (pool.pool / "notanimage").write_text("x")
    (pool.pool / "link").symlink_to(pool.pool / "tiny")
    gpt = pool.gpt_raw("gpt")
    pool.bare_raw("bare")
    os.chmod(pool.pool / "bare.raw", 0o444)
    dev = pool.loop_device(gpt)
    (pool.pool / "blk").symlink_to(dev)

    found = images(bus)
    assert set(found) == {"tiny", ".hidden", "shadowed", "vendor", "link", "gpt", "bare", "blk",
                          ".host"}
    assert found["tiny"][1:3] == ["directory", False]
    assert found["tiny"][5] == UINT64_MAX
    assert found["tiny"][6] == "/org/freedesktop/machine1/image/tiny"
    assert found["vendor"][1:3] == ["directory", True]
    assert found["gpt"][1:3] == ["raw", False]
    assert found["bare"][1:3] == ["raw", True]
    assert found["blk"][1:3] == ["block", False]
    assert found[".host"] == [".host", "directory", False, found[".host"][3], 0, UINT64_MAX,
                              "/org/freedesktop/machine1/image/_2ehost"]
    assert props(bus, "shadowed")["Path"] == str(pool.etc / "shadowed")
    raw = props(bus, "gpt")
    st = os.stat(gpt)
    assert raw["Usage"] == st.st_blocks * 512 and raw["Limit"] == st.st_size == 40 << 20
    assert raw["ModificationTimestamp"] == st.st_mtime_ns // 1000
    assert props(bus, "blk")["Usage"] == 40 << 20

    out = machinectl(bus, "list-images").stdout
    assert "tiny" in out and ".hidden" not in out and "7 images listed." in out
    assert ".hidden" in machinectl(bus, "list-images", "--all").stdout
    tree = busctl(bus, "tree", DEST).stdout
    assert "/org/freedesktop/machine1/image/tiny" in tree
    assert "/org/freedesktop/machine1/image/_2ehost" in tree


def test_listing_sees_changes_made_behind_the_daemons_back(imaged: Machined, bus: BusDaemon,
                                                           pool: Pool) -> None:
    """ListImages keeps what it found between calls; every change must still show at once."""
    tiny = pool.directory("tiny")
    pool.directory("gone")
    raw = pool.bare_raw("disk")
    elsewhere = pool.directory("elsewhere", where=pool.root)
    (pool.pool / "link").symlink_to(elsewhere)
    before = images(bus)
    assert {"tiny", "gone", "disk", "link"} <= set(before)
    run("chattr", "+i", str(tiny))
    os.chmod(raw, 0o444)
    with open(raw, "r+b") as f:
        f.seek(8 << 20)
        f.write(os.urandom(1 << 20))
    run("rm", "-r", str(pool.pool / "gone"))
    pool.directory("new")
    os.rename(pool.pool / "disk.raw", pool.pool / "moved.raw")
    os.setxattr(pool.pool / "new", "user.crtime_usec", struct.pack("<Q", 1000))
    run("chattr", "+i", str(elsewhere))
    gone = "/org/freedesktop/machine1/image/gone"
    busctl(bus, "get-property", DEST, gone, IMAGE, "Name", check=False)
    vanished = busctl(bus, "get-property", DEST, gone, IMAGE, "Name", check=False)
    assert f"Unknown object '{gone}'." in vanished.stderr
    after = images(bus)
    assert after["tiny"][2] is True
    assert "gone" not in after and "disk" not in after
    assert after["moved"][2] is True and after["moved"][5] > before["disk"][5]
    assert after["new"][3] == 1000
    assert after["link"][2] is True
    run("mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(pool.pool / "new"))
    pool.mounts.append(pool.pool / "new")
    assert images(bus)["new"][2] is True
    run("chattr", "-i", str(tiny), str(elsewhere))


def test_show_image_and_metadata_of_every_type(imaged: Machined, bus: BusDaemon,
                                               pool: Pool) -> None:
    pool.directory("tiny", machine_id="0123456789abcdef0123456789abcdef")
    gpt = pool.gpt_raw("gpt")
    bare = pool.bare_raw("bare")
    dev = pool.loop_device(bare)
    (pool.pool / "blk").symlink_to(dev)

    show = dict(line.split("=", 1) for line in
                machinectl(bus, "show-image", "tiny").stdout.splitlines())
    assert show["Name"] == "tiny" and show["Type"] == "directory"
    assert show["Path"] == str(pool.pool / "tiny") and show["ReadOnly"] == "no"
    status = machinectl(bus, "image-status", "tiny").stdout
    assert "Hostname: tinyhost" in status and "Tiny busybox OS" in status
    assert "0123456789abcdef0123456789abcdef" in status
    assert call(bus, "GetImageMachineInfo", "s", "tiny") == [{"DEPLOYMENT": "test"}]

    for name, host in (("gpt", "gpthost"), ("bare", "barehost"), ("blk", "barehost")):
        assert call(bus, "GetImageHostname", "s", name) == [host], name
        osrel = call(bus, "GetImageOSRelease", "s", name)[0]
        assert osrel["PRETTY_NAME"] == "Tiny busybox OS"
        assert call(bus, "GetImageMachineID", "s", name) == [[]]
    path = call(bus, "GetImage", "s", "gpt")[0]
    assert call(bus, "GetOSRelease", path=path, iface=IMAGE)[0]["ID"] == "gpt"
    assert loop_devices_of(gpt) == [] and loop_devices_of(bare) == [dev]
    assert mounts_below(Path("/tmp")) == [] or all("machined-image" not in m
                                                   for m in mounts_below(Path("/tmp")))

    garbage = pool.pool / "garbage.raw"
    garbage.write_bytes(b"\xff" * (1 << 20))
    err = error(bus, "GetImageOSRelease", "s", "garbage")
    assert "Failed to read image metadata: " in err
    assert loop_devices_of(garbage) == []


# ------------------------------------------------------------------------------ errors
def test_errors_as_252(imaged: Machined, bus: BusDaemon, pool: Pool) -> None:
    pool.directory("tiny")
    pool.directory("vendor", where=pool.vendor)
    e = "org.freedesktop.DBus.Error."
    assert error(bus, "GetImage", "s", "a/b") == \
        "org.freedesktop.machine1.NoSuchImage: No image 'a/b' known"
    assert error(bus, "GetImage", "s", "nope") == \
        "org.freedesktop.machine1.NoSuchImage: No image 'nope' known"
    assert error(bus, "RemoveImage", "s", "a/b") == \
        e + "InvalidArgs: Image name 'a/b' is invalid."
    assert error(bus, "RemoveImage", "s", "nope") == \
        "org.freedesktop.machine1.NoSuchImage: No image 'nope' known"
    for method, sig, args in (("RemoveImage", "s", [".host"]),
                              ("RenameImage", "ss", [".host", "x"]),
                              ("MarkImageReadOnly", "sb", [".host", True]),
                              ("SetImageLimit", "st", [".host", 1000]),
                              ("RemoveImage", "s", ["vendor"])):
        assert error(bus, method, sig, *args) == "System.Error.EROFS: Read-only file system"
    assert error(bus, "RenameImage", "ss", "tiny", "a/b") == \
        e + "InvalidArgs: Image name 'a/b' is invalid."
    assert error(bus, "RenameImage", "ss", "tiny", "vendor") == e + "FileExists: File exists"
    assert error(bus, "CloneImage", "ssb", "tiny", "tiny", False) == \
        e + "FileExists: File exists"
    assert error(bus, "CloneImage", "ssb", "tiny", ".host", False) == \
        "System.Error.EBUSY: Device or resource busy"
    assert error(bus, "SetImageLimit", "st", "tiny", 1000) == \
        e + "NotSupported: Operation not supported"
    assert error(bus, "SetImageLimit", "st", "tiny", UINT64_MAX - 1) == \
        e + "InvalidArgs: New limit out of range"
    assert error(bus, "SetPoolLimit", "t", 10**9) == \
        e + "NotSupported: Quota is only supported on btrfs."
    assert error(bus, "CleanPool", "s", "foo") == e + "InvalidArgs: Unknown mode 'foo'."
    path = call(bus, "GetImage", "s", "tiny")[0]
    out = busctl(bus, "call", DEST, path, IMAGE, "Remove", "s", "x", check=False)
    assert "Invalid arguments 's' to call org.freedesktop.machine1.Image.Remove(), " \
           "expecting ''." in out.stderr
    props_ = call(bus, "GetAll", "s", "", path=MANAGER_PATH,
                  iface="org.freedesktop.DBus.Properties")[0]
    assert props_["PoolPath"]["data"] == str(pool.pool)
    assert props_["PoolUsage"]["data"] == props_["PoolLimit"]["data"] == UINT64_MAX
    # nothing was touched
    assert (pool.pool / "tiny/etc/hostname").exists()


def test_unprivileged_callers_are_refused(imaged: Machined, bus: BusDaemon,
                                          pool: Pool) -> None:
    pool.directory("tiny")
    for method, sig, args in (("RemoveImage", "s", ["tiny"]),
                              ("RenameImage", "ss", ["tiny", "new"]),
                              ("CloneImage", "ssb", ["tiny", "new", False]),
                              ("MarkImageReadOnly", "sb", ["tiny", True]),
                              ("SetPoolLimit", "t", [1000]),
                              ("CleanPool", "s", ["all"])):
        assert error(bus, method, sig, *args, user="nobody") == \
            "org.freedesktop.DBus.Error.AccessDenied: Permission denied", method
    # reading needs no authorization
    assert call(bus, "GetImageHostname", "s", "tiny", user="nobody") == ["tinyhost"]
    assert (pool.pool / "tiny").is_dir() and not (pool.pool / "new").exists()


# ------------------------------------------------------------------------------ changing
def _rich_tree(root: Path) -> None:
    """Owners, modes, xattrs, an ACL, hard links, a device node, a sparse file."""
    f = root / "data"
    f.write_text("hello")
    os.chown(f, 1234, 5678)
    os.chmod(f, 0o640)
    os.setxattr(f, "user.test", b"value")
    os.link(f, root / "data-link")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with open(root / "sparse", "wb") as s:
        s.truncate(64 << 20)
        s.write(b"start")
    if have("setfacl"):
        run("setfacl", "-m", "u:4321:r", str(f))


def _check_rich_copy(src: Path, dst: Path) -> None:
    a, b = os.lstat(src / "data"), os.lstat(dst / "data")
    assert (b.st_uid, b.st_gid, stat.S_IMODE(b.st_mode)) == (1234, 5678,
                                                            stat.S_IMODE(a.st_mode))
    assert os.getxattr(dst / "data", "user.test") == b"value"
    assert os.lstat(dst / "data-link").st_ino == b.st_ino
    assert stat.S_ISCHR(os.lstat(dst / "null").st_mode)
    assert os.lstat(dst / "null").st_rdev == os.makedev(1, 3)
    sp = os.lstat(dst / "sparse")
    assert sp.st_size == 64 << 20 and sp.st_blocks * 512 < (1 << 20)
    if have("getfacl"):
        assert "user:4321:r" in run("getfacl", "-p", str(dst / "data"))


def test_directory_clone_rename_read_only_remove_clean(imaged: Machined, bus: BusDaemon,
                                                       pool: Pool) -> None:
    src = pool.directory("tiny")
    _rich_tree(src)
    (pool.settings / "tiny.nspawn").write_text("[Exec]\n")
    (pool.pool / "tiny.nspawn").write_text("[Exec]\n")
    (pool.pool / "tiny.roothash").write_text("00\n")

    machinectl(bus, "clone", "tiny", "copy")
    _check_rich_copy(src, pool.pool / "copy")
    for side in (pool.settings / "copy.nspawn", pool.pool / "copy.nspawn",
                 pool.pool / "copy.roothash"):
        assert stat.S_IMODE(side.stat().st_mode) == 0o664, side
    assert not [p for p in pool.pool.iterdir() if p.name.startswith(".#")]

    machinectl(bus, "clone", "--read-only", "tiny", "frozen")
    assert is_immutable(pool.pool / "frozen")
    assert images(bus)["frozen"][2] is True

    machinectl(bus, "read-only", "copy")
    assert is_immutable(pool.pool / "copy") and props(bus, "copy")["ReadOnly"] is True
    machinectl(bus, "rename", "copy", "moved")
    assert not (pool.pool / "copy").exists() and is_immutable(pool.pool / "moved")
    assert (pool.settings / "moved.nspawn").exists() and (pool.pool / "moved.roothash").exists()
    assert not (pool.settings / "copy.nspawn").exists()
    machinectl(bus, "read-only", "moved", "false")
    assert not is_immutable(pool.pool / "moved")

    machinectl(bus, "remove", "moved", "frozen")
    assert not (pool.pool / "moved").exists() and not (pool.pool / "frozen").exists()
    assert not (pool.settings / "moved.nspawn").exists()
    assert not (pool.pool / "moved.roothash").exists()
    assert "moved" not in images(bus)
    out = busctl(bus, "introspect", DEST, "/org/freedesktop/machine1/image/moved", check=False)
    assert out.returncode != 0

    # a symlink out of the pool is removed, never what it points to
    outside = pool.root / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    (pool.pool / ".link").symlink_to(outside)
    pool.directory(".old")
    pool.directory("vendor", where=pool.vendor)
    cleaned = machinectl(bus, "clean")
    out = cleaned.stdout + cleaned.stderr
    assert "Removed image '.link'" in out and "Removed image '.old'" in out
    assert (outside / "keep").exists() and not (pool.pool / ".link").exists()
    assert call(bus, "CleanPool", "s", "all") == [[["tiny", UINT64_MAX]]]
    assert (pool.vendor / "vendor").is_dir()
    assert set(images(bus)) == {"vendor", ".host"}


def test_raw_clone_rename_read_only_remove(imaged: Machined, bus: BusDaemon,
                                           pool: Pool) -> None:
    raw = pool.bare_raw("disk")
    (pool.pool / "disk.nspawn").write_text("[Exec]\n")
    machinectl(bus, "clone", "--read-only", "disk", "disk2")
    copy = pool.pool / "disk2.raw"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o444
    assert copy.read_bytes() == raw.read_bytes()
    assert (pool.pool / "disk2.nspawn").exists()
    assert images(bus)["disk2"][1:3] == ["raw", True]
    machinectl(bus, "read-only", "disk", "true")
    assert stat.S_IMODE(raw.stat().st_mode) == 0o444
    machinectl(bus, "read-only", "disk", "false")
    assert stat.S_IMODE(raw.stat().st_mode) == 0o644
    disk = call(bus, "GetImage", "s", "disk")[0]  # the Image object's own methods
    call(bus, "MarkReadOnly", "b", "true", path=disk, iface=IMAGE)
    assert stat.S_IMODE(raw.stat().st_mode) == 0o444
    call(bus, "MarkReadOnly", "b", "false", path=disk, iface=IMAGE)
    assert call(bus, "GetHostname", path=disk, iface=IMAGE) == ["diskhost"]
    machinectl(bus, "rename", "disk", "renamed")
    assert (pool.pool / "renamed.raw").exists() and (pool.pool / "renamed.nspawn").exists()
    assert call(bus, "GetImageHostname", "s", "renamed") == ["diskhost"]
    machinectl(bus, "remove", "renamed", "disk2")
    assert not list(pool.pool.glob("*.raw")) and not list(pool.pool.glob("*.nspawn"))


@pytest.mark.parametrize("quota", [True, False], ids=["quota", "noquota"])
def test_btrfs_subvolumes(imaged: Machined, bus: BusDaemon, pool: Pool, quota: bool) -> None:
    pool.btrfs(quota)
    run("btrfs", "subvolume", "create", str(pool.pool / "sub"))
    pool.directory("sub")
    run("btrfs", "subvolume", "create", str(pool.pool / "sub/nested"))
    found = images(bus)
    assert found["sub"][1:3] == ["subvolume", False]

    (pool.pool / "sub/nested/file").write_text("inside")
    machinectl(bus, "clone", "sub", "snap")
    assert os.stat(pool.pool / "snap").st_ino == 256
    assert os.stat(pool.pool / "snap/nested").st_ino == 256  # nested subvolumes come along
    assert (pool.pool / "snap/nested/file").read_text() == "inside"
    assert call(bus, "GetImageHostname", "s", "snap") == ["tinyhost"]
    machinectl(bus, "read-only", "snap")
    assert "true" in run("btrfs", "property", "get", "-ts", str(pool.pool / "snap"), "ro")
    assert props(bus, "snap")["ReadOnly"] is True
    machinectl(bus, "read-only", "snap", "false")

    machinectl(bus, "clone", "sub", "plaincopy")  # from a subvolume: a snapshot
    pool.directory("plain")
    machinectl(bus, "clone", "plain", "fromplain")  # into btrfs: a new subvolume
    assert images(bus)["fromplain"][1] == "subvolume"

    if quota:
        run("btrfs", "quota", "rescan", "-w", str(pool.pool))
        machinectl(bus, "set-limit", "sub", "64M")
        p = props(bus, "sub")
        assert p["Limit"] == 64 << 20 and p["Usage"] != UINT64_MAX
        machinectl(bus, "set-limit", "200M")
        assert call(bus, "Get", "ss", MANAGER, "PoolLimit", iface="org.freedesktop.DBus."
                    "Properties")[0]["data"] == 200 << 20
    else:
        assert props(bus, "sub")["Usage"] == UINT64_MAX

    machinectl(bus, "remove", "sub", "snap", "plaincopy", "fromplain")
    assert not (pool.pool / "sub").exists() and not (pool.pool / "snap").exists()
    subvols = run("btrfs", "subvolume", "list", str(pool.pool))
    assert "sub" not in subvols and "snap" not in subvols


# ------------------------------------------------------------------------------ locks
def _ofd_lock(path: Path, exclusive: bool) -> int:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", kind, 0, 0, 0, 0))  # F_OFD_SETLK
    return fd


def test_locks_shared_with_nspawn(imaged: Machined, bus: BusDaemon, pool: Pool) -> None:
    img = pool.directory("tiny")
    st = os.stat(img)
    LOCKS.mkdir(parents=True, exist_ok=True)
    global_lock = LOCKS / f"inode-{st.st_dev}:{st.st_ino}"
    fd = _ofd_lock(global_lock, exclusive=False)
    try:
        busy = "System.Error.EBUSY: Device or resource busy"
        assert error(bus, "RemoveImage", "s", "tiny") == busy
        assert error(bus, "RenameImage", "ss", "tiny", "x") == busy
        assert error(bus, "MarkImageReadOnly", "sb", "tiny", True) == busy
        assert call(bus, "GetImageOSRelease", "s", "tiny")[0]["ID"] == "tiny"
    finally:
        os.close(fd)
        global_lock.unlink(missing_ok=True)
    local = pool.pool / ".#tiny.lck"
    fd = _ofd_lock(local, exclusive=True)
    try:
        assert error(bus, "GetImageHostname", "s", "tiny") == \
            "System.Error.EBUSY: Failed to read image metadata: Device or resource busy"
    finally:
        os.close(fd)
        local.unlink(missing_ok=True)
    assert call(bus, "GetImageHostname", "s", "tiny") == ["tinyhost"]


def test_image_of_running_nspawn_cannot_be_removed(imaged: Machined, bus: BusDaemon,
                                                   pool: Pool, busybox_tree: Path,
                                                   tmp_path: Path) -> None:
    run("cp", "-a", str(busybox_tree), str(pool.pool / "e2eimg"))
    st = os.stat(pool.pool / "e2eimg")
    procs = Processes()
    try:
        ct = Nspawn(bus, procs, pool.pool / "e2eimg", "e2eimg",
                    ["/bin/sh", "-c", "sleep 60"], tmp_path)
        ct.wait_registered()
        assert error(bus, "RemoveImage", "s", "e2eimg") == \
            "System.Error.EBUSY: Device or resource busy"
        assert error(bus, "RenameImage", "ss", "e2eimg", "other") == \
            "System.Error.EBUSY: Device or resource busy"
    finally:
        procs.cleanup()
        # a killed nspawn cannot remove its lock file
        (LOCKS / f"inode-{st.st_dev}:{st.st_ino}").unlink(missing_ok=True)
        (pool.pool / ".#e2eimg.lck").unlink(missing_ok=True)
    assert (pool.pool / "e2eimg/bin/busybox").exists()


# ------------------------------------------------------------------------------ async
def test_daemon_answers_while_a_1gib_tree_is_cloned(imaged: Machined, bus: BusDaemon,
                                                    pool: Pool) -> None:
    import dbus

    big = pool.directory("big")
    block = os.urandom(1 << 20)
    for i in range(4):
        with open(big / f"blob{i}", "wb") as f:
            for _ in range(256):
                f.write(block)
    clone = subprocess.Popen(["busctl", "--system", "--timeout=300", "call", DEST, MANAGER_PATH,
                              MANAGER, "CloneImage", "ssb", "big", "bigcopy", "false"],
                             env=bus.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    conn = dbus.bus.BusConnection(bus.address)
    latencies: list[float] = []
    try:
        while clone.poll() is None:
            t0 = time.monotonic()
            conn.call_blocking(DEST, MANAGER_PATH, MANAGER, "GetMachine", "s", [".host"])
            latencies.append(time.monotonic() - t0)
            time.sleep(0.01)
    finally:
        conn.close()
        out, err = clone.communicate(timeout=300)
    assert clone.returncode == 0, err
    assert latencies, "the clone ended before any call was made"
    print(f"\n1 GiB clone: {len(latencies)} GetMachine calls during the copy, worst latency "
          f"{max(latencies) * 1000:.1f} ms")
    assert sum(f.stat().st_size for f in (pool.pool / "bigcopy").glob("blob*")) == 1 << 30
    assert (pool.pool / "bigcopy/blob3").read_bytes()[:1 << 20] == block


def test_clone_failure_leaves_nothing_visible(imaged: Machined, bus: BusDaemon,
                                              pool: Pool) -> None:
    outside = pool.root / "big"
    outside.mkdir()
    (outside / "f").write_bytes(os.urandom(1 << 20))
    # the pool on a tmpfs too small for the copy: cp fails half-way
    run("mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(pool.pool))
    pool.mounts.append(pool.pool)
    (pool.pool / "src").symlink_to(outside)
    assert error(bus, "CloneImage", "ssb", "src", "dst", False) == \
        "System.Error.ENOSPC: No space left on device"
    assert [p.name for p in pool.pool.iterdir()] == ["src"]
    assert "dst" not in images(bus)


def test_image_objects_introspect_as_252(imaged: Machined, bus: BusDaemon, pool: Pool) -> None:
    from tests.bus.test_introspection import DATA, live_xml, members

    pool.directory("tiny")
    path = call(bus, "GetImage", "s", "tiny")[0]
    for p in (path, "/org/freedesktop/machine1/image/_2ehost"):
        ours = sorted(members(live_xml(bus, p), IMAGE))
        assert ours == sorted(members((DATA / "image.xml").read_text(), IMAGE))
    children = live_xml(bus, "/org/freedesktop/machine1/image")
    assert '<node name="tiny"/>' in children and '<node name="_2ehost"/>' in children


def test_polkit_decides_image_changes(polkit: BusDaemon, pool: Pool) -> None:  # noqa: F811
    bus = polkit
    pool.directory("tiny")
    clean_state()
    d = Machined(bus, "--scope-backend=cgroupfs", f"--image-root={pool.root}")
    try:
        out = busctl(bus, "call", DEST, MANAGER_PATH, MANAGER, "RenameImage", "ss", "tiny", "new",
                     user="nobody", check=False)
        assert out.stderr.strip() == "Call failed: Access denied"
        polkit_allow(bus, "org.freedesktop.machine1.manage-images")
        busctl(bus, "call", DEST, MANAGER_PATH, MANAGER, "RenameImage", "ss", "tiny", "new",
               user="nobody")
        assert (pool.pool / "new").is_dir()
        calls = (bus.dir / "polkit.calls").read_text()
        assert "org.freedesktop.machine1.manage-images" in calls
        assert "rename" in calls and "new_name" in calls
    finally:
        d.stop()
        clean_state()
    assert not d.unexpected_errors()


def test_image_objects_follow_the_disk(imaged: Machined, bus: BusDaemon, pool: Pool) -> None:
    """One fallback vtable serves the Image objects, as in 252: an image made behind the daemon's
    back is an object (and in `busctl tree`) at once, with no ListImages first; one removed
    behind its back is unknown at once."""
    path = "/org/freedesktop/machine1/image/late"
    pool.directory("late")
    name = busctl(bus, "get-property", DEST, path, IMAGE, "Name").stdout.strip()
    assert name == 's "late"'
    assert path in busctl(bus, "tree", "--list", DEST).stdout.split()
    run("rm", "-rf", str(pool.pool / "late"))
    gone = busctl(bus, "get-property", DEST, path, IMAGE, "Name", check=False)
    assert gone.returncode != 0 and f"Unknown object '{path}'" in gone.stderr
    bad = "/org/freedesktop/machine1/image/_2e_2e_2fetc"  # "../etc"
    assert busctl(bus, "introspect", DEST, bad, check=False).returncode != 0


def test_metadata_files_that_are_not_regular_files_cost_nothing(imaged: Machined, bus: BusDaemon,
                                                                 pool: Pool) -> None:
    """Directories, FIFOs, sockets and device nodes where an image's /etc files are: every call
    answers at once and leaves nothing behind. A directory used to leak a descriptor per call
    (and, in a raw image, a busy mount point under /tmp); a FIFO held a worker thread for good
    (252 waits on it for good)."""
    odd = pool.directory("odd")
    for name, kind in (("hostname", "dir"), ("machine-info", "fifo"), ("machine-id", "zero"),
                       ("os-release", "socket")):
        (odd / "etc" / name).unlink(missing_ok=True)
        make_node(odd / "etc" / name, kind)
    tree = pool.root / "src-oddr"
    make_tree(tree)
    (tree / "etc/hostname").unlink()
    make_node(tree / "etc/hostname", "dir")
    (tree / "etc/machine-info").unlink()
    make_node(tree / "etc/machine-info", "fifo")
    run("truncate", "-s", "8M", str(pool.pool / "oddr.raw"))
    run("mkfs.ext4", "-q", "-F", "-d", str(tree), str(pool.pool / "oddr.raw"))

    scratch = set(Path("/tmp").glob("machined-image-*"))
    fds = len(os.listdir(f"/proc/{imaged.pid}/fd"))
    for _ in range(10):
        assert call(bus, "GetImageHostname", "s", "odd") == [""]
        assert call(bus, "GetImageMachineInfo", "s", "odd") == [{}]
        assert call(bus, "GetImageMachineID", "s", "odd") == [[]]
        assert call(bus, "GetImageOSRelease", "s", "odd") == [{}]
        # as 252: the directory opens but does not read, which fails the raw image's reading
        assert error(bus, "GetImageHostname", "s", "oddr") == \
            "System.Error.EISDIR: Failed to read image metadata: Is a directory"
    assert len(os.listdir(f"/proc/{imaged.pid}/fd")) <= fds + 2  # was +1 per call
    assert set(Path("/tmp").glob("machined-image-*")) == scratch

    (tree / "etc/hostname").rmdir()
    (tree / "etc/hostname").write_text("oddhost\n")
    run("mkfs.ext4", "-q", "-F", "-d", str(tree), str(pool.pool / "oddr.raw"))
    assert call(bus, "GetImageHostname", "s", "oddr") == ["oddhost"]
    assert call(bus, "GetImageMachineInfo", "s", "oddr") == [{}]  # the FIFO is passed over


def test_a_read_only_bind_mount_of_the_same_file_system_is_read_only(
        imaged: Machined, bus: BusDaemon, pool: Pool) -> None:
    """The mount tells, not the device: a read-only bind mount within the pool's own file
    system makes its image read-only (as 252's faccessat(W_OK) sees EROFS)."""
    pool.directory("robind")
    src = pool.root / "robind-src"
    make_tree(src)
    where = pool.pool / "robind"
    run("mount", "--bind", str(src), str(where))
    pool.mounts.append(where)
    run("mount", "-o", "remount,bind,ro", str(where))
    pool.directory("plain")
    listed = images(bus)
    assert listed["robind"][2] is True and listed["plain"][2] is False
    assert props(bus, "robind")["ReadOnly"] is True
