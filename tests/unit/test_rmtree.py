"""Removing image trees as 252's rm_rf does (machined/linux/rmtree.py): past failures, at any
depth, with a handful of fds, never through a symlink or into another file system. What the
live 252 does with the same trees is compared in tests/e2e/test_images_changes_against_252.py."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined.linux.rmtree import remove_tree
from tests.helpers.images import deep_tree

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chattr, mount)")


@pytest.fixture
def few_fds() -> Iterator[None]:
    """A soft fd limit far below the depth of the trees removed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_tree_goes_symlinks_unfollowed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    top = tmp_path / "top"
    (top / "a/b").mkdir(parents=True)
    (top / "a/b/f").write_text("f")
    (top / "a/link").symlink_to(outside)
    (top / "dangling").symlink_to("/nonexistent")
    os.mkfifo(top / "fifo")
    remove_tree(str(top))
    assert not top.exists() and (outside / "keep").exists()


def test_a_symlink_top_is_unlinked(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    (tmp_path / "target/keep").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    remove_tree(str(tmp_path / "link"))
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "target/keep").exists()


def test_depth_and_fd_limit_do_not_stop_it(tmp_path: Path, few_fds: None) -> None:
    deep_tree(tmp_path / "deep", 1500)
    before = len(os.listdir("/proc/self/fd"))
    remove_tree(str(tmp_path / "deep"))
    assert not (tmp_path / "deep").exists()
    assert len(os.listdir("/proc/self/fd")) == before  # nothing left open


def test_a_missing_tree_is_no_error(tmp_path: Path) -> None:
    remove_tree(str(tmp_path / "gone"))


@root_only
def test_it_goes_on_past_failures_and_raises_the_first(tmp_path: Path) -> None:
    top = tmp_path / "top"
    for d in ("a", "b/c", "d"):
        (top / d).mkdir(parents=True)
    for f in ("a/1", "a/frozen", "a/2", "b/c/appended", "b/c/3", "d/4", "5"):
        (top / f).write_text(f)
    subprocess.run(["chattr", "+i", str(top / "a/frozen")], check=True)
    subprocess.run(["chattr", "+a", str(top / "b/c/appended")], check=True)
    try:
        with pytest.raises(PermissionError) as e:
            remove_tree(str(top))
        assert e.value.errno == errno.EPERM
        left = sorted(str(p.relative_to(top)) for p in top.rglob("*"))
        assert left == ["a", "a/frozen", "b", "b/c", "b/c/appended"]
    finally:
        subprocess.run(["chattr", "-i", "-a", str(top / "a/frozen"), str(top / "b/c/appended")],
                       check=False)


@root_only
def test_a_mount_point_below_is_ebusy_before_anything_goes(tmp_path: Path) -> None:
    top = tmp_path / "top"
    (top / "a/mnt").mkdir(parents=True)
    (top / "a/file").write_text("x")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(top / "a/mnt")], check=True)
    try:
        (top / "a/mnt/inside").write_text("x")
        with pytest.raises(OSError) as e:
            remove_tree(str(top))
        assert e.value.errno == errno.EBUSY
        assert (top / "a/file").exists() and (top / "a/mnt/inside").exists()
    finally:
        subprocess.run(["umount", str(top / "a/mnt")], check=False)
    remove_tree(str(top))
    assert not top.exists()
