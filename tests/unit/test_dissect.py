"""Raw images' metadata: what fails before anything is mounted."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from machined.linux import dissect


def test_no_loop_devices_is_enoent_as_in_252(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there are no loop devices (a container, PrivateDevices=), 252's metadata calls
    fail with the errno of opening /dev/loop-control, not with losetup's EIO."""
    image = tmp_path / "x.raw"
    image.write_bytes(b"\0" * 4096)
    monkeypatch.setattr(dissect, "LOOP_CONTROL", str(tmp_path / "loop-control"))
    with pytest.raises(OSError) as raised:
        dissect.read_metadata(str(image))
    assert raised.value.errno == errno.ENOENT
