"""The tree copy of Copy{From,To}Machine keeps hard links within the copied tree, as 252's
COPY_HARDLINKS does (spec §8.9), and leaves nothing of its link store behind."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined.linux.copy import Owner, copy_entry


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
    with pytest.raises(FileExistsError):
        copy(src, dst)
    copy(src, dst, replace=True)
    assert link_groups(dst) == [["a/one", "b/two", "three"], ["b/fifo", "fifo"]]
    assert (dst / "b/two").read_text() == "again"
    assert list(entries(dst)) == list(entries(src))


def test_a_single_linked_file_is_copied(src: Path, tmp_path: Path) -> None:
    copy(src / "three", tmp_path / "copy")
    st = os.stat(tmp_path / "copy")
    assert (st.st_nlink, (tmp_path / "copy").read_text()) == (1, "linked")
