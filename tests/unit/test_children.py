"""Children forked by the daemon (to enter machines) have none of its fds but those asked for."""

from __future__ import annotations

import asyncio
import os
import socket

from machined.linux import namespaces as ns


def test_child_keeps_only_stdio_its_socket_and_what_it_is_given() -> None:
    kept_r, kept_w = os.pipe()
    other_r, other_w = os.pipe()

    def work(sock: socket.socket) -> None:
        open_fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        sock.send(repr((open_fds, sock.fileno())).encode())

    try:
        result = asyncio.run(ns.run_child(work, keep=(kept_r,)))
        assert result.code == 0
        open_fds, sock_fd = eval(result.messages[0])  # noqa: S307 - our own child's repr
        expected = {0, 1, 2, sock_fd, kept_r}
        assert expected <= set(open_fds)
        assert len(set(open_fds) - expected) == 1  # the listing's own directory fd
        assert other_r not in open_fds and other_w not in open_fds and kept_w not in open_fds
    finally:
        for fd in (kept_r, kept_w, other_r, other_w):
            os.close(fd)
