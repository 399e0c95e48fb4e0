"""The tree copy of Copy{From,To}Machine: hard links within the copied tree stay hard links,
as 252's COPY_HARDLINKS keeps them (spec §8.9), and nothing of the link store is left behind;
copies into an existing tree merge and replace as 252's do (seen with the live 252 daemon:
tests/e2e/inside/test_against_252.py)."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined.linux.copy import Owner, copy_entry
from tests.helpers.images import deep_tree


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """a/one, b/two and three are one file; fifo and b/fifo one FIFO; lonely has one link;
    outside/shared is linked to from the tree but lies outside it."""
    tree = tmp_path / "src"
    (tree / "a").mkdir(parents=True)
    (tree / "b").mkdir()
    (tree / "a/one").write_text("linked")
    os.chmod(tree / "a/one", 0o640)
    os.link(tree / "a/one", tree / "b/two")
    os.link(tree / "a/one", tree / "three")
    os.mkfifo(tree / "fifo")
    os.link(tree / "fifo", tree / "b/fifo")
    (tree / "lonely").write_text("alone")
    (tree / "sym").symlink_to("a/one")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/shared").write_text("shared")
    os.link(tmp_path / "outside/shared", tree / "a/shared")
    os.utime(tree, ns=(1_000_000_000, 2_000_000_000))
    return tree


def copy(src: Path, dst: Path, replace: bool = False) -> None:
    sfd = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY)
    dfd = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        copy_entry(sfd, src.name, dfd, dst.name, replace, Owner())
    finally:
        os.close(sfd)
        os.close(dfd)


def link_groups(tree: Path) -> list[list[str]]:
    """The names of each inode with more than one name in the tree (symlinks not followed)."""
    by_inode: dict[int, list[str]] = {}
    for p in sorted(tree.rglob("*")):
        by_inode.setdefault(os.lstat(p).st_ino, []).append(str(p.relative_to(tree)))
    return sorted(names for names in by_inode.values() if len(names) > 1)


def entries(tree: Path) -> Iterator[str]:
    return (str(p.relative_to(tree)) for p in sorted(tree.rglob("*")))


def test_hard_links_in_the_tree_stay_hard_links(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    copy(src, dst)
    assert link_groups(dst) == [["a/one", "b/two", "three"], ["b/fifo", "fifo"]]
    assert list(entries(dst)) == list(entries(src))  # no link store left behind
    st = os.stat(dst / "three")
    assert (stat.S_IMODE(st.st_mode), st.st_nlink, (dst / "three").read_text()) == \
        (0o640, 3, "linked")
    assert stat.S_ISFIFO(os.lstat(dst / "b/fifo").st_mode)
    assert os.stat(dst / "a/shared").st_nlink == 1  # its other name is not in the tree
    assert os.readlink(dst / "sym") == "a/one"
    # the store came and went before the top directory got the source's times
    assert os.stat(dst).st_mtime_ns == 2_000_000_000


def test_replacing_keeps_the_links(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    copy(src, dst)
    (src / "a/one").write_text("again")
    copy(src, dst)  # merged: what is there stays
    assert (dst / "b/two").read_text() == "linked"
    copy(src, dst, replace=True)
    assert link_groups(dst) == [["a/one", "b/two", "three"], ["b/fifo", "fifo"]]
    assert (dst / "b/two").read_text() == "again"
    assert list(entries(dst)) == list(entries(src))


def test_a_single_linked_file_is_copied(src: Path, tmp_path: Path) -> None:
    copy(src / "three", tmp_path / "copy")
    st = os.stat(tmp_path / "copy")
    assert (st.st_nlink, (tmp_path / "copy").read_text()) == (1, "linked")


def test_merging_into_an_existing_tree(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for tree, mode, text in ((src, 0o755, "new"), (dst, 0o700, "old")):
        (tree / "d").mkdir(parents=True)
        os.chmod(tree / "d", mode)
        (tree / "d/f").write_text(text)
    (src / "d/added").write_text("added")
    (src / "dir-here").mkdir()  # a directory where the target has a file
    (dst / "dir-here").write_text("file")
    (src / "file-here").write_text("file")  # a file where the target has a directory
    (dst / "file-here").mkdir()
    for replace in (False, True):
        with pytest.raises(NotADirectoryError):  # after the other entries were copied
            copy(src, dst, replace)
        assert (dst / "d/added").read_text() == "added"
        assert (dst / "d/f").read_text() == ("new" if replace else "old")
        assert stat.S_IMODE(os.stat(dst / "d").st_mode) == 0o700  # merged into, not changed
        assert (dst / "dir-here").read_text() == "file"
        assert (dst / "file-here").is_dir()  # not replaced, and no error for it


def test_the_top_is_not_merged_into_unless_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("file")
    (tmp_path / "dir").mkdir()
    (tmp_path / "target-file").write_text("there")
    for replace in (False, True):
        with pytest.raises(FileExistsError):  # a directory is not replaced with a file
            copy(tmp_path / "file", tmp_path / "dir", replace)
        with pytest.raises(NotADirectoryError):
            copy(tmp_path / "dir", tmp_path / "target-file", replace)
    with pytest.raises(FileExistsError):
        copy(tmp_path / "file", tmp_path / "target-file")
    copy(tmp_path / "file", tmp_path / "target-file", replace=True)
    assert (tmp_path / "target-file").read_text() == "file"


def test_sockets_and_fifos_are_made_anew(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(src / "sock"))
        os.mkfifo(src / "fifo")
        os.utime(src / "fifo", ns=(5_000_000_000, 6_000_000_000))
        copy(src, tmp_path / "dst")
        copy(src / "sock", tmp_path / "top-sock")
    assert stat.S_ISSOCK(os.lstat(tmp_path / "dst/sock").st_mode)
    assert stat.S_ISSOCK(os.lstat(tmp_path / "top-sock").st_mode)
    st = os.lstat(tmp_path / "dst/fifo")
    assert stat.S_ISFIFO(st.st_mode) and st.st_mtime_ns == 6_000_000_000


def test_only_user_xattrs_are_copied(tmp_path: Path) -> None:
    """As 252's copy: user.* only (security.capability would give a file capabilities)."""
    (tmp_path / "src").write_text("x")
    try:
        os.setxattr(tmp_path / "src", "user.kept", b"1")
    except OSError as e:
        pytest.skip(f"no user xattrs here: {e}")
    if os.geteuid() == 0:
        os.setxattr(tmp_path / "src", "trusted.dropped", b"2")
        os.setxattr(tmp_path / "src", "security.dropped", b"3")
    copy(tmp_path / "src", tmp_path / "dst")
    assert os.listxattr(tmp_path / "dst") == ["user.kept"]


def unnest(top: Path) -> int:
    """Remove what deep_tree() made, without recursion or long paths; returns the levels."""
    here = os.open(".", os.O_RDONLY)
    levels = 0
    try:
        os.chdir(top)
        while os.path.isdir("a"):
            os.chdir("a")
            levels += 1
        for name in os.listdir("."):
            os.unlink(name)  # the file at the bottom
        for _ in range(levels):
            os.chdir("..")
            os.rmdir("a")
    finally:
        os.fchdir(here)
        os.close(here)
    return levels


@contextlib.contextmanager
def fd_limit(soft: int) -> Iterator[None]:
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def test_deep_trees_as_deep_as_the_fds_go(tmp_path: Path) -> None:
    """252's copy has no depth limit of its own (2,100 levels copied, seen with the live 252):
    it holds two fds per level and ends with EMFILE where they run out. Python's recursion
    limit must not stop ours first."""
    deep_tree(tmp_path / "deep", 2100, name="a")
    (tmp_path / "deep/sibling").write_text("copied all the same")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with fd_limit(min(hard, 8192)):
            copy(tmp_path / "deep", tmp_path / "copy")
        assert unnest(tmp_path / "copy") == 2100
        with fd_limit(256), pytest.raises(OSError) as e:
            copy(tmp_path / "deep", tmp_path / "cut")
        assert e.value.errno == errno.EMFILE
        assert (tmp_path / "cut/sibling").read_text() == "copied all the same"
    finally:
        for name in ("deep", "copy", "cut"):
            if (tmp_path / name).exists():
                unnest(tmp_path / name)
