"""Image changes on disk (linux/imagefs.py) that need no file system of their own."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from machined.linux import imagefs


def test_a_failing_cp_is_summed_up_in_a_few_lines(tmp_path: Path) -> None:
    """cp writes a line per failing file (thousands into a full pool): the log gets three."""
    missing = [str(tmp_path / f"missing{i}") for i in range(5)]
    with pytest.raises(OSError) as e:
        imagefs._cp("-a", "--", *missing, str(tmp_path))
    assert e.value.errno == errno.EIO
    assert str(e.value.strerror).count("missing") == 3
    assert str(e.value.strerror).endswith("(and 2 more lines)")
