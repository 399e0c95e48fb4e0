"""Listening AF_UNIX stream sockets and their peers' credentials."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from pathlib import Path

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


class UnixListener:
    """A socket bound at `path` (a stale socket there is replaced, anything else is an error),
    with permissions `mode`, listening; its directory is made 0755 if missing."""

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(str(path))
            st = path.lstat()
            self._identity = (st.st_dev, st.st_ino)
            os.chmod(path, mode)
            self.sock.listen(socket.SOMAXCONN)
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def remove(self) -> None:
        """Unlink the socket file, unless another process has bound a new one there since."""
        with contextlib.suppress(OSError):
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == self._identity:
                self.path.unlink()


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)
