"""Pure pieces of working inside machines: env-file parsing, ID maps and shifts, the argument
checks of shell/bind/copy, and operations (forked children: counted, capped, killed)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import time

import pytest

from machined.core.envfile import parse_env_bytes, parse_env_file
from machined.core.errors import ErrnoError, InvalidArgs, LimitsExceeded
from machined.core.machine import Machine
from machined.core.operations import Operations
from machined.core.uidmap import check_id, map_from, map_to, parse_map, shift_of
from machined.core.validate import bind_args, copy_args, shell_args
from machined.linux import namespaces as ns


def test_env_file() -> None:
    text = ('# comment\n; also\nID=debian\nNAME="Debian GNU/Linux"\n'
            "PRETTY_NAME='Debian 12 (bookworm)'\n  VERSION_ID=\"12\"\n"
            'ESC="a \\"b\\" c"\nLONG=one\\\ntwo\nBAD LINE\nEMPTY=\nID=again\n')
    assert parse_env_file(text) == [  # a key again: its first place, its last value
        ("ID", "again"), ("NAME", "Debian GNU/Linux"), ("PRETTY_NAME", "Debian 12 (bookworm)"),
        ("VERSION_ID", "12"), ("ESC", 'a "b" c'), ("LONG", "onetwo"), ("EMPTY", "")]


# What the live 252 gave for a container's /etc/os-release holding the left side.
AS_252 = [
    ("C='mi'x\"ed\"\n", {"C": 'mix"ed"'}),  # quotes are literal in an unquoted part
    ('C="a\\nb"\nF="a\\xb"\n', {"C": "a\\nb", "F": "a\\xb"}),  # the backslash stays
    ('E="\\$\\`\\"\\\\"\n', {"E": '$`"\\'}),
    ("C='p\\\nq'\n", {"C": "p\\\nq"}),  # single quotes take all as it is
    ("export A=1\n1A=x\nA-B=y\nA.B=z\nA B=two words\n",
     {"export A": "1", "1A": "x", "A-B": "y", "A.B": "z", "A B": "two words"}),
    ('B="val  "  \n', {"B": "val  "}),
    ('A=val # comment\nC="q" # c\n', {"A": "val # comment", "C": "q# c"}),
    ("A=#notcomment\nB= #x\n", {"A": "#notcomment", "B": "#x"}),
    ("B='q' tail\n", {"B": "qtail"}),
    ('A="open\nB=2\n', {"A": "open\nB=2\n"}),  # the file ended inside the quotes
    ("A=1\rB=2\r", {"A": "1", "B": "2"}),
    ("A=1\r\nB=2", {"A": "1", "B": "2"}),
    ("\ufeffA=1\nB=2\n", {"\ufeffA": "1", "B": "2"}),
    ("# a comment \\\nSTILL=comment\nX=1\n", {"X": "1"}),  # 252: the escape goes on
    ("A=one\\\n  two\n", {"A": "one  two"}),
    ("  LEAD=1\nTRAIL  =2\n=x\n==y\nNOVALUE\n", {"LEAD": "1", "TRAIL": "2", "=": "y"}),
]


@pytest.mark.parametrize(("text", "pairs"), AS_252)
def test_env_file_as_252(text: str, pairs: dict[str, str]) -> None:
    assert dict(parse_env_file(text)) == pairs
    assert dict(parse_env_bytes(text.encode())) == pairs


def test_env_file_bytes_refused_as_252() -> None:
    for data, err in ((b"B=\xff\xfe\n", errno.EINVAL), (b"B\xff=1\n", errno.EINVAL),
                      (b"A=1\nB=a\0b\n", errno.EBADMSG)):
        with pytest.raises(ErrnoError) as e:
            parse_env_bytes(data)
        assert e.value.errno == err, data
    assert parse_env_bytes(b"# \xff in a comment\nA=1\n") == [("A", "1")]


def test_uid_shift() -> None:
    assert shift_of(None, None) == 0
    one = "         0     100000      65536\n"
    assert shift_of(one, one) == 100000
    assert shift_of("0 0 4294967295\n", "0 0 4294967295\n") == 0
    for uid_map, gid_map in ((one + "65536 300000 10\n", one), (one, "0 200000 65536\n"),
                             ("1 100000 65536\n", "1 100000 65536\n"),
                             ("0 100000 1000\n", "0 100000 1000\n")):
        with pytest.raises(ErrnoError) as e:
            shift_of(uid_map, gid_map)
        assert (e.value.errno, e.value.message) == (errno.ENXIO, os.strerror(errno.ENXIO))
    with pytest.raises(ErrnoError) as e:
        shift_of("x y z\n", "x y z\n")
    assert e.value.errno == errno.EBADMSG


def test_map_from_and_to() -> None:
    lines = parse_map("0 100000 65536\n")
    assert map_from(1000, lines) == 101000
    assert map_from(70000, lines) is None
    assert map_to(101000, lines) == 1000
    assert map_to(99999, lines) is None
    assert map_to(5, parse_map("0 0 4294967295\n")) is None  # identity lines never match
    two = parse_map("0 100000 65536\n1 300000 65536\n")
    assert [map_to(outer, two) for outer in (165535, 365534)] == [65535, 65535]  # callers refuse
    with pytest.raises(InvalidArgs, match="Invalid user ID 65535"):
        check_id(65535, "user")
    with pytest.raises(InvalidArgs, match="Invalid group ID 4294967295"):
        check_id(4294967295, "group")


def test_argument_checks() -> None:
    user, path, argv = shell_args("", "", ["ignored"], [])
    assert (user, path, argv[:2]) == ("root", "/bin/sh", ["sh", "-c"])
    assert shell_args("u", "/bin/ls", [], ["A=1"]) == ("u", "/bin/ls", ["/bin/ls"])
    assert shell_args("u", "/bin/ls", ["ls", "-l"], []) == ("u", "/bin/ls", ["ls", "-l"])
    with pytest.raises(InvalidArgs, match="Specified path 'bin/sh' is not absolute"):
        shell_args("", "bin/sh", [], [])
    with pytest.raises(InvalidArgs, match="Invalid environment assignments"):
        shell_args("", "/bin/sh", [], ["FOO"])
    assert bind_args("/a", "") == ("/a", "/a")
    for bad in ("a", "/a/../b", "/a//b", "/a/./b"):
        with pytest.raises(InvalidArgs, match="Source path must be absolute and normalized."):
            bind_args(bad, "")
    with pytest.raises(InvalidArgs, match="Destination path must be absolute and normalized."):
        bind_args("/a", "/b/..")
    assert copy_args("/a", "", 1) == ("/a", "/a", True)
    with pytest.raises(InvalidArgs, match="Invalid argument"):
        copy_args("rel", "rel", 2)  # flags are checked first
    with pytest.raises(InvalidArgs, match="Source path must be absolute."):
        copy_args("rel", "/b", 0)
    with pytest.raises(InvalidArgs, match="Destination path must be absolute."):
        copy_args("/a", "b", 0)


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _sleeper(seconds: float) -> tuple[int, socket.socket]:
    def work(sock: socket.socket) -> None:
        time.sleep(seconds)

    return ns.fork_child(work)


async def test_operations_cap_and_kill() -> None:
    ops = Operations(_kill, limit=3)
    m1, m2 = Machine("one"), Machine("two")
    started = []
    for m in (m1, m1, m2):
        pid, sock = _sleeper(60)
        started.append(asyncio.ensure_future(ops.run(m, pid, ns.collect(pid, sock))))
    await asyncio.sleep(0)
    assert len(ops) == 3
    with pytest.raises(LimitsExceeded, match="Too many ongoing copies."):
        ops.check_capacity("Too many ongoing copies.")
    ops.machine_gone(m1)  # its two children are killed and reaped; the other one runs on
    results = await asyncio.gather(*started[:2])
    assert all(not r.exited and os.WTERMSIG(r.status) == signal.SIGKILL for r in results)
    assert len(ops) == 1
    ops.check_capacity()
    ops.kill_all()
    assert not (await started[2]).exited
    assert len(ops) == 0


async def test_child_results() -> None:
    def fails(sock: socket.socket) -> None:
        raise FileNotFoundError(errno.ENOENT, "nope")

    result = await ns.run_child(fails)
    assert (result.code, result.errno) == (ns.EXIT_ERRNO, errno.ENOENT)

    def sends_fd(sock: socket.socket) -> int:
        ns.send(sock, b"hello", [os.open("/", os.O_RDONLY)])
        return 7

    result = await ns.run_child(sends_fd)
    assert (result.code, result.messages, len(result.fds)) == (7, [b"hello"], 1)
    assert os.fstat(result.fds[0]).st_ino == os.stat("/").st_ino
    result.close_fds()


async def test_cancelled_collect_kills_the_child() -> None:
    pid, sock = _sleeper(60)
    task = asyncio.ensure_future(ns.collect(pid, sock))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped
