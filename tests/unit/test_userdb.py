"""core/userdb (the records of io.systemd.Machine) and varlink.answer (the protocol rules), with
made-up machines and ID maps; tests/e2e/test_userdb.py compares the whole with 252."""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest

from machined.core.errors import ErrnoError
from machined.core.machine import Machine, MachineClass
from machined.core.userdb import (
    SERVICE,
    UserDatabase,
    VarlinkError,
    parse_id,
    valid_user_group_name,
)
from machined.varlink import answer, userdb_methods

MAPS = {
    "ct": ("0 100000 65536\n", "0 200000 65536\n"),
    "two": ("0 500000 10\n10 600000 10\n", "0 500000 20\n"),
    "plain": ("0 0 4294967295\n", "0 0 4294967295\n"),
    "vm": ("0 700000 65536\n", "0 700000 65536\n"),
    "gone": (None, None),
}
BROKEN = ("nonsense\n", "nonsense\n")


def machines() -> dict[str, Machine]:
    out = {}
    for name in MAPS:
        cls = MachineClass.VM if name == "vm" else MachineClass.CONTAINER
        out[name] = Machine(name=name, cls=cls, leader=1000 + len(out))
    return out


def db(table: dict[str, Machine] | None = None) -> UserDatabase:
    table = machines() if table is None else table

    def read_map(m: Machine, kind: str) -> str | None:
        if m.name == "denied":
            raise ErrnoError(errno.EACCES)
        uids, gids = BROKEN if m.name == "broken" else MAPS.get(m.name, (None, None))
        return uids if kind == "uid_map" else gids

    return UserDatabase(lambda: list(table.values()), table.get, read_map)


def user(**params: Any) -> dict[str, Any]:
    return db().get_user_record({**params, "service": SERVICE})


def error_of(call: Any, *args: Any, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    with pytest.raises(VarlinkError) as e:
        call(*args, **kwargs)
    return e.value.name, e.value.parameters


NO_RECORD = ("io.systemd.UserDatabase.NoRecordFound", {})


def test_user_by_uid_and_by_name() -> None:
    record = user(uid=100042)["record"]
    assert record == {"userName": "vu-ct-42", "uid": 100042, "gid": 65534,
                      "realName": "UID 42 of Container ct", "homeDirectory": "/",
                      "shell": "/usr/sbin/nologin", "locked": True, "service": SERVICE,
                      "disposition": "container"}
    assert list(record) == ["userName", "uid", "gid", "realName", "homeDirectory", "shell",
                            "locked", "service", "disposition"]  # 252's order on the wire
    assert user(userName="vu-ct-42") == user(uid=100042)
    assert user(userName="vu-ct-42", uid=100042) == user(uid=100042)


def test_group_record() -> None:
    got = db().get_group_record({"gid": 200003, "service": SERVICE})
    assert got == {"record": {"groupName": "vg-ct-3", "gid": 200003,
                              "description": "GID 3 of Container ct", "service": SERVICE,
                              "disposition": "container"}}
    assert db().get_group_record({"groupName": "vg-ct-3", "service": SERVICE}) == got


def test_maps_with_several_lines() -> None:
    assert user(uid=600003)["record"]["userName"] == "vu-two-13"
    assert user(userName="vu-two-13")["record"]["uid"] == 600003
    # gid_map covers 0..19 in one line
    assert db().get_group_record({"gid": 500013, "service": SERVICE})["record"]["groupName"] \
        == "vg-two-13"


@pytest.mark.parametrize("params", [
    {"uid": 1000},                    # the host's range
    {"uid": 65534},
    {"uid": 165536},                  # past the end of the map
    {"uid": 700000},                  # a VM
    {"userName": "vu-vm-0"},
    {"userName": "vu-nope-0"},
    {"userName": "vu-ct-65536"},      # not in the map
    {"userName": "vu-ct-65535"},      # not a valid UID
    {"userName": "vu-ct-007"},        # parse_uid refuses leading zeros
    {"userName": "vu-ct-+7"},
    {"userName": "vu-ct-"},
    {"userName": "vu-ct"},
    {"userName": "vg-ct-1"},          # a group's name
    {"userName": "bad name"},
    {"userName": ""},
    {"userName": "x" * 32},
])
def test_no_record(params: dict[str, Any]) -> None:
    assert error_of(user, **params) == NO_RECORD


def test_identity_map_translates_names_but_never_host_ids() -> None:
    # a container without a user namespace of its own: 252 maps its names to the same IDs
    assert user(userName="vu-plain-7")["record"]["uid"] == 7
    assert error_of(user, uid=70000) == NO_RECORD  # identity lines are ignored this way round


def test_names_252_cannot_make_are_not_made() -> None:
    table = {"a.b": Machine(name="a.b", cls=MachineClass.CONTAINER, leader=1)}
    MAPS["a.b"] = ("0 100000 65536\n", "0 100000 65536\n")
    try:
        assert error_of(db(table).get_user_record, {"uid": 100001, "service": SERVICE}) \
            == NO_RECORD
    finally:
        del MAPS["a.b"]


def test_inner_id_that_is_no_valid_id() -> None:
    assert error_of(user, uid=165535) == ("io.systemd.System", {"errno": errno.EINVAL})


def test_conflicts() -> None:
    conflict = ("io.systemd.UserDatabase.ConflictingRecordFound", {})
    assert error_of(user, uid=100001, userName="vu-ct-0") == conflict
    assert error_of(user, userName="vu-ct-0", uid=100001) == conflict
    # the ID decides which record: one that is not found is not a conflict
    assert error_of(user, uid=1000, userName="vu-ct-0") == NO_RECORD


def test_map_files() -> None:
    # a leader gone: skipped when scanning by ID, an error when asked by name (as 252)
    assert error_of(user, uid=900001) == NO_RECORD
    assert error_of(user, userName="vu-gone-1") == ("io.systemd.System",
                                                     {"errno": errno.ENOENT})
    table = machines()
    table["broken"] = Machine(name="broken", cls=MachineClass.CONTAINER, leader=8)
    assert error_of(db(table).get_user_record, {"userName": "vu-broken-1",
                                                "service": SERVICE}) == \
        ("io.systemd.System", {"errno": errno.EBADMSG})
    table["denied"] = Machine(name="denied", cls=MachineClass.CONTAINER, leader=9)
    assert error_of(db(table).get_user_record, {"userName": "vu-denied-1",
                                                "service": SERVICE}) == \
        ("io.systemd.System", {"errno": errno.EACCES})


def test_broken_map_while_scanning_is_an_error() -> None:
    only_broken = {"broken": Machine(name="broken", cls=MachineClass.CONTAINER, leader=1)}
    assert error_of(db(only_broken).get_user_record, {"uid": 100000, "service": SERVICE}) == \
        ("io.systemd.System", {"errno": errno.EBADMSG})


@pytest.mark.parametrize(("params", "expected"), [
    ({}, ("io.systemd.UserDatabase.BadService", {})),
    (None, ("io.systemd.UserDatabase.BadService", {})),
    ({"uid": 100000}, ("io.systemd.UserDatabase.BadService", {})),
    ({"uid": 100000, "service": "io.systemd.Home"}, ("io.systemd.UserDatabase.BadService", {})),
    ({"service": SERVICE}, ("io.systemd.UserDatabase.EnumerationNotSupported", {})),
    ({"uid": "1", "service": SERVICE}, ("io.systemd.System", {"errno": errno.EINVAL})),
    ({"uid": True, "service": SERVICE}, ("io.systemd.System", {"errno": errno.EINVAL})),
    ({"uid": 2.5, "service": SERVICE}, ("io.systemd.System", {"errno": errno.EINVAL})),
    ({"uid": -1, "service": SERVICE}, ("io.systemd.System", {"errno": errno.EINVAL})),
    ({"uid": 65535, "service": SERVICE}, ("io.systemd.System", {"errno": errno.EINVAL})),
    ({"uid": 2**32 - 1, "service": SERVICE}, ("io.systemd.System", {"errno": errno.EINVAL})),
    ({"uid": 2**32, "service": SERVICE}, ("io.systemd.System", {"errno": errno.EINVAL})),
    ({"userName": None, "service": SERVICE}, ("io.systemd.System", {"errno": errno.EINVAL})),
    ({"service": None}, ("io.systemd.System", {"errno": errno.EINVAL})),
    # fields in the order sent: the first bad one decides
    ({"x": 1, "uid": "1"}, ("io.systemd.System", {"errno": errno.EADDRNOTAVAIL})),
    ({"uid": "1", "x": 1}, ("io.systemd.System", {"errno": errno.EINVAL})),
    ({"groupName": "vg-ct-1", "service": SERVICE},
     ("io.systemd.System", {"errno": errno.EADDRNOTAVAIL})),
])
def test_parameters(params: dict[str, Any] | None, expected: tuple[str, dict[str, Any]]) -> None:
    assert error_of(db().get_user_record, params) == expected


def test_integral_float_is_an_id() -> None:
    assert user(uid=100000.0)["record"]["uid"] == 100000


def test_memberships() -> None:
    assert error_of(db().get_memberships, {"userName": "vu-ct-1", "service": SERVICE}) == \
        NO_RECORD
    assert error_of(db().get_memberships, {"service": "x"}) == \
        ("io.systemd.UserDatabase.BadService", {})
    assert error_of(db().get_memberships, {"uid": 1, "service": SERVICE}) == \
        ("io.systemd.System", {"errno": errno.EADDRNOTAVAIL})


def test_name_rules() -> None:
    for good in ("a", "_", "vu-ct-1", "A9_-", "x" * 31):
        assert valid_user_group_name(good)
    for bad in ("", "1abc", "-a", "a.b", "a b", "x" * 32, "ä", "a:b"):
        assert not valid_user_group_name(bad)
    assert [parse_id(t) for t in ("0", "7", "4294967294", "4294967295", "65535", "07", "+7",
                                  " 7", "7 ", "1e3", "")] == \
        [0, 7, 4294967294, None, None, None, None, None, None, None, None]


# ------------------------------------------------------------------ the protocol
def ask(data: bytes) -> str | None:
    reply = answer(userdb_methods(db()), data)
    if reply is None:
        return None
    assert reply.endswith(b"\0")
    return reply[:-1].decode()


def call(method: str, parameters: Any = None, **extra: Any) -> bytes:
    message: dict[str, Any] = {"method": method, **extra}
    if parameters is not None:
        message["parameters"] = parameters
    return json.dumps(message).encode()


def test_replies_are_compact_json() -> None:
    got = ask(call("io.systemd.UserDatabase.GetGroupRecord",
                   {"gid": 200003, "service": SERVICE}))
    assert got == ('{"parameters":{"record":{"groupName":"vg-ct-3","gid":200003,'
                   '"description":"GID 3 of Container ct","service":"io.systemd.Machine",'
                   '"disposition":"container"}}}')
    assert ask(call("io.systemd.UserDatabase.GetUserRecord", {"uid": 5, "service": SERVICE},
                    more=True)) == '{"error":"io.systemd.UserDatabase.NoRecordFound",' \
                                   '"parameters":{}}'


def test_unknown_methods() -> None:
    assert ask(call("io.systemd.UserDatabase.Nope", {})) == \
        '{"error":"org.varlink.service.MethodNotFound",' \
        '"parameters":{"method":"io.systemd.UserDatabase.Nope"}}'
    assert ask(call("org.varlink.service.GetInfo", {})) == \
        '{"error":"org.varlink.service.MethodNotImplemented",' \
        '"parameters":{"method":"org.varlink.service.GetInfo"}}'


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[1]", b"1", b'"x"', b"\xff\xfe", b'{"parameters":{}}',
    b'{"method":5}', b'{"method":"io.systemd.UserDatabase.GetUserRecord","parameters":[]}',
    b'{"method":"io.systemd.UserDatabase.GetUserRecord","more":"yes"}',
    b'{"method":"io.systemd.UserDatabase.GetUserRecord","oneway":1}',
    b'{"method":"io.systemd.UserDatabase.GetUserRecord","upgrade":false}',
    b'{"method":"io.systemd.UserDatabase.GetUserRecord","oneway":true}',
    b"[" * 100000,
])
def test_hang_up(data: bytes) -> None:
    assert ask(data) is None


def test_unexpected_failure_is_an_errno_reply() -> None:
    def broken(_params: Any) -> dict[str, Any]:
        raise RuntimeError("bug")

    reply = answer({"x.Y": broken}, call("x.Y", {}))
    assert reply == b'{"error":"io.systemd.System","parameters":{"errno":5}}\0'
