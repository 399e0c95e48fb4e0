"""Reading files of images and containers (linux/fs.read_in_root, read_opened): symlinks stay
inside the root, only so much is read, and whatever the file is, the reader neither waits for
good nor keeps a descriptor."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined.linux import fs
from tests.helpers.images import make_node


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "etc").mkdir()
    before = open_fds()
    yield tmp_path
    assert open_fds() <= before, "a descriptor was left open"


def test_a_regular_file_is_read_and_symlinks_resolve_inside_the_root(root: Path) -> None:
    (root / "real").write_bytes(b"ID=x\n")
    (root / "etc/os-release").symlink_to("/real")
    assert fs.read_in_root(str(root), "/etc/os-release") == b"ID=x\n"


def test_no_more_than_the_limit_is_read(root: Path) -> None:
    (root / "big").write_bytes(b"a" * 200_000)
    where = fs.open_in_root(str(root), "big", os.O_PATH)
    assert fs.read_opened(where, 70_000, devices=False) == b"a" * 70_000


@pytest.mark.parametrize(("kind", "code"), [
    ("dir", errno.EISDIR), ("fifo", errno.EBADFD), ("socket", errno.ENXIO),
    ("null", errno.EACCES)])
def test_what_is_not_a_regular_file_is_refused_at_once(root: Path, kind: str, code: int) -> None:
    if kind == "null" and os.geteuid() != 0:
        pytest.skip("mknod needs root")
    make_node(root / "etc/hostname", kind)  # a FIFO, opened for reading, would wait for good
    with pytest.raises(OSError) as e:
        fs.read_in_root(str(root), "etc/hostname")
    assert e.value.errno == code


def test_devices_are_read_without_blocking_where_allowed(root: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    make_node(root / "zero", "zero")
    where = fs.open_in_root(str(root), "zero", os.O_PATH)
    assert fs.read_opened(where, 100_000, devices=True) == bytes(100_000)
