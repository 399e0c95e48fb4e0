"""Children forked by the daemon (to enter machines, to run shells) have none of its fds but
those asked for, and programs get the soft fd limit the daemon started with."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import textwrap

import pytest

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


def test_program_gets_the_soft_fd_limit_the_daemon_started_with_and_no_fds() -> None:
    # What a shell forked by the daemon itself (cgroupfs mode) starts with: the daemon lifts
    # its own soft limit for its pidfds, the program gets the one it had, as a service of
    # systemd's would.
    script = textwrap.dedent("""
        import os
        from machined.linux import process, terminal
        process.raise_fd_limit()
        held = os.open("/dev/null", os.O_RDONLY)
        os.set_inheritable(held, True)
        master, slave = os.openpty()
        program = terminal.Program("root", "/bin/sh",
                                   ["/bin/sh", "-c", "ulimit -Sn; ls /proc/self/fd; echo END"], [])
        pid = terminal._fork_program(slave, terminal.lookup_user("root"), "/bin/sh", program)
        os.close(slave)
        out = b""
        while b"END" not in out:
            out += os.read(master, 4096)
        os.waitpid(pid, 0)
        print(out.decode().replace("\\r", ""))
    """)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 512)
    if low == hard:
        pytest.skip("no hard fd limit above 512 to lift the soft limit to")

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=30, preexec_fn=lower).stdout.split()
    assert out[0] == str(low), out
    assert out[1:-1] == ["0", "1", "2", "3"], out  # stdio, and ls's own directory fd
