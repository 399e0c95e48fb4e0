"""Removing, cloning and marking images where trees are awkward, the live 252 decides: trees
with immutable and append-only files, nested (read-only) btrfs subvolumes, trees deeper than
PATH_MAX, the top directory of a copied clone, a symlink out of the pool. Each test builds its
images alike in both pools of the `pair` fixture (tests/e2e/test_images_against_252.py) and
compares the answers and what is left on disk."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.client import MANAGER as MGR
from tests.helpers.client import MANAGER_PATH as M
from tests.helpers.images import deep_tree, is_immutable, make_tree, run
from tests.helpers.real252 import REAL_MACHINED

from .test_images_against_252 import Pair, both, pair  # noqa: F401  (pair: the fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mounts)")

WHO = ("real", "ours")


# Subvolumes need the btrfs pools: these tests take the pair fixture with that parameter only.
ON_BTRFS = pytest.mark.parametrize("pair", ["btrfs"], indirect=True)


def subvolume(path: Path) -> None:
    run("btrfs", "subvolume", "create", str(path))


def read_only(path: Path, on: bool = True) -> None:
    run("btrfs", "property", "set", "-ts", str(path), "ro", "true" if on else "false")


def is_read_only(path: Path) -> bool:
    return "ro=true" in run("btrfs", "property", "get", "-ts", str(path), "ro")


def left(top: Path) -> list[tuple[str, str]]:
    """What is left of a tree: each path below it with its type, the top included."""
    if not top.exists() and not top.is_symlink():
        return []
    found = [(".", "dir")]
    for p in top.rglob("*"):
        kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
        found.append((str(p.relative_to(top)), kind))
    return sorted(found)


def scrub(*paths: Path) -> None:
    """Undo chattr +i/+a and btrfs read-only flags below `paths` and delete them: a test
    leaves nothing behind, also when it fails (a btrfs pool goes with its file system)."""
    for path in paths:
        if not path.exists():
            continue
        subprocess.run(["chattr", "-R", "-i", "-a", str(path)], capture_output=True,
                       check=False)
        if on_btrfs_path(path):
            out = subprocess.run(["btrfs", "subvolume", "list", "-o", str(path)],
                                 capture_output=True, text=True, check=False).stdout
            for line in out.splitlines():
                sub = path.parent / line.split(" path ")[-1].split("/", 1)[-1]
                subprocess.run(["btrfs", "property", "set", "-ts", str(sub), "ro", "false"],
                               capture_output=True, check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True,
                       check=False)


def on_btrfs_path(path: Path) -> bool:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                          text=True, check=False).stdout.strip() == "btrfs"


@contextlib.contextmanager
def images(two: Pair, *names: str) -> Iterator[dict[str, dict[str, Path]]]:
    """Each pool's path of each of `names`, scrubbed afterwards."""
    paths = {who: {n: two.pools[who] / n for n in names} for who in WHO}
    try:
        yield paths
    finally:
        for who in WHO:
            scrub(*paths[who].values())


def same(answers: dict[str, Any], what: str) -> Any:
    assert answers["real"] == answers["ours"], f"{what}\n  252:  {answers['real']}\n" \
        f"  ours: {answers['ours']}"
    return answers["real"]


# ------------------------------------------------------------------------------ remove
def frozen_tree(top: Path) -> None:
    """An OS tree with immutable and append-only files among others, and an immutable
    directory with files in it."""
    make_tree(top)
    for d in ("var/log", "var/lib/a/b", "srv/locked", "opt/x/y"):
        (top / d).mkdir(parents=True)
    for f in ("var/log/one", "var/log/append", "var/lib/a/b/frozen", "var/lib/a/b/two",
              "var/lib/a/three", "srv/locked/inside", "opt/x/y/z"):
        (top / f).write_text(f)
    run("chattr", "+i", str(top / "var/lib/a/b/frozen"))
    run("chattr", "+a", str(top / "var/log/append"))
    run("chattr", "+i", str(top / "srv/locked"))


def test_remove_goes_on_past_failures(pair: Pair) -> None:  # noqa: F811
    with images(pair, "frozen") as paths:
        for who in WHO:
            frozen_tree(paths[who]["frozen"])
        answer = same(both(pair, M, MGR, "RemoveImage", "s", "frozen"), "RemoveImage frozen")
        assert answer == ("error", ("org.freedesktop.DBus.Error.AccessDenied",
                                    "Operation not permitted"))
        rest = same({who: left(paths[who]["frozen"]) for who in WHO}, "left on disk")
        assert rest == [(".", "dir"), ("srv", "dir"), ("srv/locked", "dir"),
                        ("srv/locked/inside", "file"), ("var", "dir"), ("var/lib", "dir"),
                        ("var/lib/a", "dir"), ("var/lib/a/b", "dir"),
                        ("var/lib/a/b/frozen", "file"), ("var/log", "dir"),
                        ("var/log/append", "file")]


def test_remove_a_tree_deeper_than_path_max(pair: Pair) -> None:  # noqa: F811
    with images(pair, "deep") as paths:
        for who in WHO:
            deep_tree(paths[who]["deep"], 1500)
        assert same(both(pair, M, MGR, "RemoveImage", "s", "deep"), "RemoveImage deep") == \
            ("ok", ())
        assert not any(paths[who]["deep"].exists() for who in WHO)


def nested_subvolumes(top: Path, top_is_subvolume: bool) -> None:
    """A tree with a read-only subvolume in it (holding files and a subvolume of its own)
    and a writable one further down."""
    if top_is_subvolume:
        subvolume(top)
    make_tree(top)
    subvolume(top / "ro")
    (top / "ro/file").write_text("in a read-only subvolume")
    subvolume(top / "ro/inner")
    (top / "ro/inner/file").write_text("in a subvolume of a read-only one")
    (top / "usr/lib/deeper").mkdir()
    subvolume(top / "usr/lib/deeper/rw")
    (top / "usr/lib/deeper/rw/file").write_text("x")
    read_only(top / "ro/inner")
    read_only(top / "ro")


@ON_BTRFS
@pytest.mark.parametrize("kind", ["subvolume", "directory"])
def test_remove_nested_read_only_subvolumes(pair: Pair, kind: str) -> None:  # noqa: F811
    with images(pair, "nest") as paths:
        for who in WHO:
            nested_subvolumes(paths[who]["nest"], kind == "subvolume")
        image = same(both(pair, M, MGR, "GetImage", "s", "nest"), "GetImage nest")
        assert image[0] == "ok"
        assert same(both(pair, M, MGR, "RemoveImage", "s", "nest"), "RemoveImage nest") == \
            ("ok", ())
        assert not any(paths[who]["nest"].exists() for who in WHO)
        subvols = {who: run("btrfs", "subvolume", "list", str(pair.pools[who])) for who in WHO}
        assert not any("nest" in s for s in subvols.values()), subvols


def pid_of_252(two: Pair) -> int:
    """The pid of the 252 of this pair: its pool mounts live in its own mount namespace."""
    address = two.env["real"]["DBUS_SYSTEM_BUS_ADDRESS"].encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(REAL_MACHINED):
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if b"DBUS_SYSTEM_BUS_ADDRESS=" + address in env:
                    return int(pid)
    raise AssertionError("the 252 of this pair is not running")


def test_remove_with_a_mount_point_inside_is_a_deliberate_difference(
        pair: Pair,  # noqa: F811
) -> None:
    """252 deletes around a mount point and answers ENOTEMPTY; ours refuses with EBUSY before
    anything is deleted (docs/compatibility.md)."""
    pid = pid_of_252(pair)
    with images(pair, "mnt") as paths:
        try:
            for who in WHO:
                top = paths[who]["mnt"]
                make_tree(top)
                (top / "srv/data").mkdir(parents=True)
                # 252 sees the pool in a mount namespace of its own
                where = "/var/lib/machines/mnt/srv/data" if who == "real" else \
                    str(top / "srv/data")
                enter = ["nsenter", "-t", str(pid), "-m"] if who == "real" else []
                run(*enter, "mount", "-t", "tmpfs", "tmpfs", where)
                run(*enter, "sh", "-c", f"echo kept > {where}/kept")
            answers = both(pair, M, MGR, "RemoveImage", "s", "mnt")
            assert answers["real"] == ("error", ("System.Error.ENOTEMPTY",
                                                 "Directory not empty"))
            assert answers["ours"] == ("error", ("System.Error.EBUSY",
                                                 "Device or resource busy"))
            assert left(paths["real"]["mnt"]) == [(".", "dir"), ("srv", "dir"),
                                                  ("srv/data", "dir")]
            assert (paths["ours"]["mnt"] / "etc/hostname").exists()  # nothing deleted
            assert (paths["ours"]["mnt"] / "srv/data/kept").exists()
        finally:
            subprocess.run(["nsenter", "-t", str(pid), "-m", "umount",
                            "/var/lib/machines/mnt/srv/data"], capture_output=True, check=False)
            subprocess.run(["umount", str(paths["ours"]["mnt"] / "srv/data")],
                           capture_output=True, check=False)


# ------------------------------------------------------------------------------ clone
def test_clone_leaves_out_a_mount_point_inside(pair: Pair) -> None:  # noqa: F811
    """A copied clone stays on the source's file system: a mount point inside is left out
    altogether, as 252 leaves it out (cp -x alone would make it an empty directory)."""
    pid = pid_of_252(pair)
    with images(pair, "mnt2", "mnt2c") as paths:
        try:
            for who in WHO:
                top = paths[who]["mnt2"]
                make_tree(top)
                (top / "srv/data").mkdir(parents=True)
                (top / "srv/other").mkdir()
                where = "/var/lib/machines/mnt2/srv/data" if who == "real" else \
                    str(top / "srv/data")
                enter = ["nsenter", "-t", str(pid), "-m"] if who == "real" else []
                run(*enter, "mount", "-t", "tmpfs", "tmpfs", where)
                run(*enter, "sh", "-c", f"echo elsewhere > {where}/file")
            same(both(pair, M, MGR, "CloneImage", "ssb", "mnt2", "mnt2c", False), "clone")
            assert left(paths["real"]["mnt2c"]) == left(paths["ours"]["mnt2c"])
            assert not (paths["ours"]["mnt2c"] / "srv/data").exists()
            assert (paths["ours"]["mnt2c"] / "srv/other").is_dir()
        finally:
            subprocess.run(["nsenter", "-t", str(pid), "-m", "umount",
                            "/var/lib/machines/mnt2/srv/data"], capture_output=True, check=False)
            subprocess.run(["umount", str(paths["ours"]["mnt2"] / "srv/data")],
                           capture_output=True, check=False)


@ON_BTRFS
def test_clone_leaves_out_a_subvolume_in_a_plain_directory(pair: Pair) -> None:  # noqa: F811
    """The same for a subvolume nested in a directory image: another file system to a copy."""
    with images(pair, "dirnest", "dirnestc") as paths:
        for who in WHO:
            top = paths[who]["dirnest"]
            make_tree(top)
            subvolume(top / "sv")
            (top / "sv/inside").write_text("in the subvolume")
        same(both(pair, M, MGR, "CloneImage", "ssb", "dirnest", "dirnestc", False), "clone")
        assert left(paths["real"]["dirnestc"]) == left(paths["ours"]["dirnestc"])
        assert not (paths["ours"]["dirnestc"] / "sv").exists()


def top_facts(path: Path, since: float) -> dict[str, Any]:
    st = os.lstat(path)
    return {"mode": oct(stat.S_IMODE(st.st_mode)), "owner": (st.st_uid, st.st_gid),
            "xattrs": sorted(os.listxattr(path, follow_symlinks=False)),
            "immutable": is_immutable(path),
            "mtime": "fresh" if st.st_mtime >= since - 1 else st.st_mtime_ns}


def dress_top(top: Path) -> None:
    """A top directory with a mode, owner, xattrs, an ACL and a time of its own."""
    os.chown(top, 1234, 5678)
    os.chmod(top, 0o710)
    os.setxattr(top, "user.top", b"source")
    with contextlib.suppress(FileNotFoundError, subprocess.CalledProcessError):
        run("setfacl", "-m", "u:4321:rx", str(top))
    os.utime(top, (1_000_000_000, 1_000_000_000))


@pytest.mark.parametrize("ro", [False, True], ids=["writable", "read-only"])
def test_clone_of_a_directory_makes_its_own_top(pair: Pair, ro: bool) -> None:  # noqa: F811
    with images(pair, "dressed", "dressed2") as paths:
        for who in WHO:
            top = make_tree(paths[who]["dressed"])
            (top / "etc/hostname").chmod(0o600)
            dress_top(top)
        since = time.time()
        assert same(both(pair, M, MGR, "CloneImage", "ssb", "dressed", "dressed2", ro),
                    "CloneImage") == ("ok", ())
        facts = same({who: top_facts(paths[who]["dressed2"], since) for who in WHO},
                     "the clone's top")
        assert facts["mode"] == "0o755" and facts["owner"] == (0, 0)
        assert facts["xattrs"] == [] and facts["mtime"] == "fresh"
        same({who: oct(os.lstat(paths[who]["dressed2"] / "etc/hostname").st_mode)
              for who in WHO}, "below the top, all is copied")
        same(both(pair, M, MGR, "GetImage", "s", "dressed2"), "GetImage")


@ON_BTRFS
def test_snapshot_clone_of_a_subvolume_keeps_its_top(pair: Pair) -> None:  # noqa: F811
    with images(pair, "dsub", "dsub2") as paths:
        for who in WHO:
            subvolume(paths[who]["dsub"])
            make_tree(paths[who]["dsub"])
            dress_top(paths[who]["dsub"])
        since = time.time()
        assert same(both(pair, M, MGR, "CloneImage", "ssb", "dsub", "dsub2", False),
                    "CloneImage") == ("ok", ())
        same({who: top_facts(paths[who]["dsub2"], since) for who in WHO}, "the snapshot's top")


@ON_BTRFS
def test_read_only_clone_makes_nested_subvolumes_read_only(pair: Pair) -> None:  # noqa: F811
    with images(pair, "nsrc", "ncopy") as paths:
        for who in WHO:
            top = paths[who]["nsrc"]
            subvolume(top)
            make_tree(top)
            subvolume(top / "one")
            subvolume(top / "one/two")
            (top / "usr/lib/far").mkdir()
            subvolume(top / "usr/lib/far/three")
            (top / "usr/lib/far/three/file").write_text("x")
        assert same(both(pair, M, MGR, "CloneImage", "ssb", "nsrc", "ncopy", True),
                    "CloneImage read-only") == ("ok", ())
        flags = same({who: {n: is_read_only(paths[who]["ncopy"] / n)
                            for n in (".", "one", "one/two", "usr/lib/far/three")}
                      for who in WHO}, "read-only flags of the clone")
        assert all(flags.values()), flags
        same({who: left(paths[who]["ncopy"]) for who in WHO}, "the clone's tree")
        same({who: is_read_only(paths[who]["nsrc"] / "one") for who in WHO},
             "the source stays writable")


# ------------------------------------------------------------------------------ read-only
def test_mark_read_only_of_a_symlink_out_of_the_pool(pair: Pair) -> None:  # noqa: F811
    with images(pair, "linkout") as paths:
        targets = {}
        try:
            for who in WHO:
                targets[who] = make_tree(pair.pools[who].parents[2] / "outside-linkout")
                paths[who]["linkout"].symlink_to(targets[who])
            for on in (True, False):
                answer = same(both(pair, M, MGR, "MarkImageReadOnly", "sb", "linkout", on),
                              f"MarkImageReadOnly {on}")
                assert answer == ("error", ("System.Error.ELOOP",
                                            "Too many levels of symbolic links"))
                assert not any(is_immutable(t) for t in targets.values())
        finally:
            scrub(*targets.values())
