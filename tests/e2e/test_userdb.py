"""The userdb service io.systemd.Machine (spec §12): the same conversations with the real 252 and
with ours in one run must get the same bytes back; and glibc, through nss-systemd, shows the
names of a user-namespaced container's IDs (what `ls -l` on its files prints)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, busctl, cgroup2_mount, clean_state, wait_for
from tests.helpers.leaders import CgroupLeaders
from tests.helpers.real252 import REAL_MACHINED, USERDB_DIR, RealMachined, host_dirs, side_by_side
from tests.helpers.userns import spawn_userns_leader

U = "io.systemd.UserDatabase."
SVC = "io.systemd.Machine"
HANGUP = "<hangup>"

# name, class, uid map, gid map (None: no user namespace of its own)
MACHINES = [
    ("e2eudb", "container", "0 100000 65536", "0 200000 65536"),
    ("e2eudb.dot", "container", "0 300000 65536", "0 300000 65536"),
    ("e2eudbvm", "vm", "0 400000 65536", "0 400000 65536"),
    ("e2eudbplain", "container", None, None),
]


def _user(params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"method": U + "GetUserRecord", "parameters": params, **extra}


def _group(params: dict[str, Any]) -> dict[str, Any]:
    return {"method": U + "GetGroupRecord", "parameters": params}


# Each conversation runs on a connection of its own; dicts are sent as JSON, bytes as they are.
CONVERSATIONS: list[list[Any]] = [
    [_user({"uid": 100000, "service": SVC})],
    [_user({"uid": 100005, "service": SVC}, more=True)],
    [_user({"uid": 100000.0, "service": SVC})],
    [_user({"userName": "vu-e2eudb-7", "service": SVC})],
    [_user({"userName": "vu-e2eudb-7", "uid": 100007, "service": SVC})],
    [_user({"userName": "vu-e2eudb-7", "uid": 100008, "service": SVC})],
    [_user({"userName": "vu-e2eudb-0", "uid": 100001, "service": SVC})],
    [_user({"uid": 1000, "service": SVC})],
    [_user({"uid": 65534, "service": SVC})],
    [_user({"uid": 165535, "service": SVC})],
    [_user({"uid": 165536, "service": SVC})],
    [_user({"uid": 4294967294, "service": SVC})],
    [_user({"uid": 300005, "service": SVC})],  # e2eudb.dot: no valid user name
    [_user({"uid": 400005, "service": SVC})],  # a VM
    [_user({"userName": "vu-e2eudbvm-5", "service": SVC})],
    [_user({"userName": "vu-e2eudbplain-7", "service": SVC})],
    [_user({"userName": "vu-e2eudb-65535", "service": SVC})],
    [_user({"userName": "vu-e2eudb-65536", "service": SVC})],
    [_user({"userName": "vu-e2eudb-007", "service": SVC})],
    [_user({"userName": "vu-e2eudb-+7", "service": SVC})],
    [_user({"userName": "vu-e2eudb-", "service": SVC})],
    [_user({"userName": "vu-nope-0", "service": SVC})],
    [_user({"userName": "vu--1", "service": SVC})],
    [_user({"userName": "VU-e2eudb-1", "service": SVC})],
    [_user({"userName": "x" * 40, "service": SVC})],
    [_user({"userName": "bad name!", "service": SVC})],
    [_user({"userName": "", "service": SVC})],
    [_user({"service": SVC})],
    [_user({"uid": 100000, "service": "x"})],
    [_user({"uid": 100000})],
    [{"method": U + "GetUserRecord"}],
    [{"method": U + "GetUserRecord", "parameters": None}],
    [_user({"uid": "abc", "service": SVC})],
    [_user({"uid": True, "service": SVC})],
    [_user({"uid": 1.5, "service": SVC})],
    [_user({"uid": -1, "service": SVC})],
    [_user({"uid": 65535, "service": SVC})],
    [_user({"uid": 4294967295, "service": SVC})],
    [_user({"uid": 4294967296, "service": SVC})],
    [_user({"userName": None, "service": SVC})],
    [_user({"userName": 5, "service": SVC})],
    [_user({"uid": 100000, "service": None})],
    [_user({"uid": 100000, "service": SVC, "bogus": 1})],
    [_user({"zzz": 1, "uid": "x"})],
    [_user({"uid": "x", "zzz": 1})],
    [_user({"service": "bad", "uid": "x"})],
    [_group({"gid": 200003, "service": SVC})],
    [_group({"groupName": "vg-e2eudb-3", "service": SVC})],
    [_group({"gid": 200000, "groupName": "vg-e2eudb-1", "service": SVC})],
    [_group({"gid": 100003, "service": SVC})],
    [_group({"gid": 265535, "service": SVC})],
    [_group({"groupName": "vu-e2eudb-3", "service": SVC})],
    [_group({"userName": "vg-e2eudb-3", "service": SVC})],
    [_group({"service": SVC})],
    [{"method": U + "GetMemberships", "parameters": {"userName": "vu-e2eudb-3", "service": SVC},
      "more": True}],
    [{"method": U + "GetMemberships", "parameters": {"service": SVC}}],
    [{"method": U + "GetMemberships", "parameters": {"service": "x"}}],
    [{"method": U + "GetMemberships", "parameters": {"userName": 5, "service": SVC}}],
    [{"method": "org.varlink.service.GetInfo", "parameters": {}}],
    [{"method": "org.varlink.service.GetInterfaceDescription",
      "parameters": {"interface": "io.systemd.UserDatabase"}}],
    [{"method": U + "Nope", "parameters": {}}],
    [_user({"uid": 100000, "service": SVC}), _user({"uid": 100001, "service": SVC}),
     _group({"gid": 200002, "service": SVC})],
    [_user({"uid": 100000, "service": SVC}, oneway=True)],
    [_user({"uid": 100000, "service": SVC}, oneway=True), _user({"uid": 1, "service": SVC})],
    [_user({"uid": 100000, "service": SVC}, more="yes")],
    [_user({"uid": 100000, "service": SVC}, upgrade=False)],
    [{"method": 5, "parameters": {}}],
    [{"method": U + "GetUserRecord", "parameters": []}],
    [b"not json"],
    [b"[1,2]"],
    [b'{"parameters":{}}'],
    [b""],
    # what 252's parser refuses though Python's json would take it (a booted sweep found them)
    [b'{"method":"' + U.encode() + b'GetUserRecord","parameters":{"userName":"vu-e2eudb-1",'
     b'"userName":"vu-e2eudb-2","service":"' + SVC.encode() + b'"}}'],
    [b'{"method":"' + U.encode() + b'Nope","parameters":{"uid":1,"uid":2}}'],
    [b'{"method":"' + U.encode() + b'GetUserRecord","method":"' + U.encode()
     + b'GetGroupRecord","parameters":{}}'],
    [b'{"method":"' + U.encode() + b'GetUserRecord","parameters":{"userName":"vu-\\u0000x",'
     b'"service":"' + SVC.encode() + b'"}}'],
    [b'{"method":"' + U.encode() + b'GetUserRecord","parameters":{"userName":"vu-\\ud800",'
     b'"service":"' + SVC.encode() + b'"}}'],
    [b'{"method":"' + U.encode() + b'GetUserRecord","parameters":{"userName":"vu-\\ud83d'
     b'\\ude00","service":"' + SVC.encode() + b'"}}'],
]


def _converse(path: str, messages: list[Any]) -> list[str]:
    """What came back for each message: a reply's text, or HANGUP (and nothing after it)."""
    out: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        for i, message in enumerate(messages):
            data = message if isinstance(message, bytes) else json.dumps(message).encode()
            try:
                s.sendall(data + b"\0")
                oneway = isinstance(message, dict) and message.get("oneway") is True
                if oneway and i + 1 < len(messages):
                    continue
                reply = _read_reply(s)
            except (ConnectionResetError, BrokenPipeError):
                reply = HANGUP
            out.append(reply)
            if reply == HANGUP:
                break
    return out


def _read_reply(s: socket.socket) -> str:
    reply = b""
    while not reply.endswith(b"\0"):
        chunk = s.recv(65536)
        if not chunk:
            return HANGUP
        reply += chunk
    return reply[:-1].decode()


@dataclass
class World:
    ours: Machined
    real: RealMachined | None


def _register(bus: BusDaemon, leaders: dict[str, int]) -> None:
    for name, cls, _uids, _gids in MACHINES:
        busctl(bus, "call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
               "org.freedesktop.machine1.Manager", "RegisterMachine", "sayssus", name, "0",
               "test", cls, str(leaders[name]), "/")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    slice_dir = Path(cgroup2_mount()) / "machine.slice"
    leaders = CgroupLeaders()
    with host_dirs(slice_dir):
        try:
            pids = {}
            for i, (name, _cls, uids, gids) in enumerate(MACHINES):
                scope = slice_dir / f"udbtest-{i}.scope"
                if uids is None:
                    pids[name] = leaders.sleeper(scope)
                else:
                    assert gids is not None
                    leaders.track(scope)
                    pids[name] = spawn_userns_leader(scope, uids, gids)
            with side_by_side("--scope-backend=cgroupfs") as two:
                for bus in (two.real_bus, two.ours_bus):
                    if bus is not None:
                        _register(bus, pids)
                yield World(two.ours, two.real)
        finally:
            leaders.close()


def test_same_answers_as_252(world: World) -> None:
    if world.real is None:
        pytest.fail(f"{REAL_MACHINED} is missing: the set-up installs systemd-container")
    real = [_converse(world.real.userdb_socket, c) for c in CONVERSATIONS]
    ours = [_converse(str(world.ours.userdb_socket), c) for c in CONVERSATIONS]
    differ = [f"{c}\n  252:  {r}\n  ours: {o}"
              for c, r, o in zip(CONVERSATIONS, real, ours, strict=True) if r != o]
    assert not differ, "answers differ from 252's:\n" + "\n".join(differ)


def test_records(world: World) -> None:
    """What the comparison rests on, spelled out: the records themselves."""
    path = str(world.ours.userdb_socket)
    (reply,) = _converse(path, CONVERSATIONS[0])
    assert json.loads(reply) == {"parameters": {"record": {
        "userName": "vu-e2eudb-0", "uid": 100000, "gid": 65534,
        "realName": "UID 0 of Container e2eudb", "homeDirectory": "/",
        "shell": "/usr/sbin/nologin", "locked": True, "service": SVC,
        "disposition": "container"}}}
    (reply,) = _converse(path, [_group({"groupName": "vg-e2eudb-3", "service": SVC})])
    assert json.loads(reply) == {"parameters": {"record": {
        "groupName": "vg-e2eudb-3", "gid": 200003, "description": "GID 3 of Container e2eudb",
        "service": SVC, "disposition": "container"}}}
    (reply,) = _converse(path, [_user({"uid": 100007, "userName": "vu-e2eudb-8",
                                        "service": SVC})])
    assert json.loads(reply) == {"error": U + "ConflictingRecordFound", "parameters": {}}
    assert _converse(path, [b"not json"]) == [HANGUP]


def test_socket_is_world_accessible(world: World) -> None:
    assert oct(world.ours.userdb_socket.stat().st_mode & 0o777) == "0o666"


def test_nss_names_of_container_ids(world: World, tmp_path: Path) -> None:
    """glibc's getpwuid/getgrgid through nss-systemd, which asks every socket in
    /run/systemd/userdb: there, in a mount namespace of getent's own, is our socket."""
    probe = tmp_path / "owned"
    probe.write_text("")
    os.chown(probe, 100007, 200003)
    script = (f"mount --bind {world.ours.userdb_dir} {USERDB_DIR} && "
              f"getent passwd 100000 vu-e2eudb-5 && getent group 200003 && "
              f"stat -c %U:%G {probe}")
    env = {k: v for k, v in os.environ.items() if k != "SYSTEMD_BYPASS_USERDB"}
    with host_dirs():
        out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                             capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "vu-e2eudb-0:x:100000:65534:UID 0 of Container e2eudb:/:/usr/sbin/nologin",
        "vu-e2eudb-5:x:100005:65534:UID 5 of Container e2eudb:/:/usr/sbin/nologin",
        "vg-e2eudb-3:x:200003:",
        "vu-e2eudb-7:vg-e2eudb-3",
    ]


def test_abuse_leaves_it_serving(world: World) -> None:
    """Over-long messages and too many connections from one user are hung up on; the service
    goes on answering everyone else."""
    import resource

    path = str(world.ours.userdb_socket)
    assert _converse(path, [b"x" * 70000]) == [HANGUP]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    held: list[socket.socket] = []
    try:
        for _ in range(1024):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(s)
            s.connect(path)
        # all 1024 are served...
        assert _converse_on(held[0], _user({"uid": 100000, "service": SVC})) != HANGUP
        assert _converse_on(held[-1], _user({"uid": 100000, "service": SVC})) != HANGUP
        # ...the next one of the same user is not
        assert _converse(path, CONVERSATIONS[0]) == [HANGUP]
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    wait_for(lambda: _converse(path, CONVERSATIONS[0]) != [HANGUP], 10,
             what="the service to take connections again")


def _converse_on(s: socket.socket, message: dict[str, Any]) -> str:
    s.settimeout(10)
    s.sendall(json.dumps(message).encode() + b"\0")
    return _read_reply(s)


def test_runs_without_the_service_when_its_socket_cannot_be_made(bus: BusDaemon,
                                                                 tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    clean_state()
    d = Machined(bus, "--scope-backend=cgroupfs", f"--userdb-dir={blocker}/userdb")
    try:
        assert "Failed to bind to varlink socket" in d.log
        out = busctl(bus, "call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
                     "org.freedesktop.machine1.Manager", "GetMachine", "s", ".host")
        assert out.stdout.strip() == 'o "/org/freedesktop/machine1/machine/_2ehost"'
    finally:
        d.stop()
        clean_state()
    assert not d.unexpected_errors()


def test_pipelined_and_split_calls(world: World) -> None:
    """Calls sent back to back are answered in order; a call may arrive in pieces."""
    import time

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(world.ours.userdb_socket))
        calls = [_user({"uid": 100000 + i, "service": SVC}) for i in range(300)]
        s.sendall(b"".join(json.dumps(c).encode() + b"\0" for c in calls))
        data = b""
        while data.count(b"\0") < len(calls):
            chunk = s.recv(65536)
            assert chunk, "hung up"
            data += chunk
        names = [json.loads(r)["parameters"]["record"]["userName"]
                 for r in data.split(b"\0")[:-1]]
        assert names == [f"vu-e2eudb-{i}" for i in range(300)]
        message = json.dumps(_group({"gid": 200009, "service": SVC})).encode() + b"\0"
        s.sendall(message[:10])
        time.sleep(0.2)
        s.sendall(message[10:])
        reply = _read_reply(s)
        assert json.loads(reply)["parameters"]["record"]["groupName"] == "vg-e2eudb-9"
