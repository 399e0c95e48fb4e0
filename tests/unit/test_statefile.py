import os
import stat
from pathlib import Path

from machined.core.machine import Machine, MachineClass, Timestamp
from machined.core.statefile import StateDir, apply, parse_state, serialize


def sample() -> Machine:
    return Machine(
        name="spec-ct", cls=MachineClass.CONTAINER, id=bytes.fromhex("112233445566778899aabbccddeeff00"),
        service="spec-svc", root_directory="/tmp/spec/root", unit="spec-test.scope", leader=21914,
        timestamp=Timestamp(1795305319304102, 530503579), netif=[1, 7], started=True,
    )


def test_serialize_matches_252_example() -> None:
    assert serialize(sample()) == (
        "# This is private data. Do not parse.\n"
        "NAME=spec-ct\nSCOPE=spec-test.scope\nSERVICE=spec-svc\nROOT=/tmp/spec/root\n"
        "ID=112233445566778899aabbccddeeff00\nLEADER=21914\nCLASS=container\n"
        "REALTIME=1795305319304102\nMONOTONIC=530503579\nNETIF=1 7\n"
    )


def test_serialize_omits_absent_keys_and_writes_job() -> None:
    m = Machine(name="x", unit="machine-x.scope", scope_job="/org/freedesktop/systemd1/job/5",
                id=bytes(16))
    text = serialize(m)
    assert "SCOPE_JOB=/org/freedesktop/systemd1/job/5\n" in text
    for key in ("SERVICE=", "ROOT=", "ID=", "LEADER=", "CLASS=", "REALTIME=", "NETIF="):
        assert key not in text


def test_roundtrip_with_escapes() -> None:
    m = sample()
    m.unit = "machine-my\\x2dct.scope"
    m.root_directory = "/srv/with space/x"
    back = Machine(name="spec-ct")
    apply(back, parse_state(serialize(m).encode())[0])
    assert back.unit == m.unit
    assert back.root_directory == m.root_directory
    assert (back.id, back.leader, back.cls, back.netif) == (m.id, m.leader, m.cls, m.netif)
    assert back.timestamp == m.timestamp


def test_escaped_control_characters_read_back_like_252() -> None:
    # 252's env-file reader is not the inverse of cescape: "\\t" reads back as "t".
    m = Machine(name="x")
    apply(m, parse_state(b"ROOT=/a\\tb\n")[0])
    assert m.root_directory == "/atb"


def test_parse_ignores_garbage() -> None:
    m = Machine(name="x")
    apply(m, parse_state(b"ID=zz\nLEADER=abc\nCLASS=foo\nNETIF=1 x -2 3\nREALTIME=1\n")[0])
    assert m.id == b"" and m.leader == 0 and m.cls is MachineClass.UNKNOWN
    assert m.netif == [1, 3] and m.timestamp == Timestamp(1, 0)  # each clock on its own


def test_numbers_and_ids_parsed_as_252() -> None:
    """What the live 252 made of hand-written state files (C integer syntax, ranges)."""
    m = Machine(name="x")
    apply(m, parse_state(b"NETIF=1 x 2 -1 0 +3 010 0x5 007 0o7 99999999999 2147483648\n"
                         b"ID=01234567-89ab-cdef-0123-456789abcdef\nLEADER=1_0\n"
                         b"REALTIME=+17\nMONOTONIC=0x10\n")[0])
    assert m.netif == [1, 2, 3, 8, 5, 7, 7]
    assert m.id == bytes.fromhex("0123456789abcdef0123456789abcdef")
    assert m.leader == 0 and m.timestamp == Timestamp(17, 16)
    m = Machine(name="y")
    apply(m, parse_state(b"ID=01 23 45 67 89 ab cd ef 01 23 45 67 89 ab cd ef\n"
                         b"REALTIME=-5\nMONOTONIC=1_0\n")[0])
    assert m.id == b"" and m.timestamp is None  # neither clock: the start takes the time


def test_load_keeps_what_comes_before_invalid_utf8(tmp_path: Path) -> None:
    d = StateDir(tmp_path)
    (tmp_path / "bad").write_bytes(b"SCOPE=bad.scope\nSERVICE=\xff\xfe\nLEADER=7\n")
    (tmp_path / "nul").write_bytes(b"SCOPE=nul.scope\nSERVICE=a\0b\n")
    loaded = {m.name: m for m in d.load()}
    assert (loaded["bad"].unit, loaded["bad"].service, loaded["bad"].leader) == \
        ("bad.scope", "", 0)
    assert (loaded["nul"].unit, loaded["nul"].service) == ("", "")  # no keys at all


def test_after_a_refused_line_only_the_keys_252_assigns_while_reading_are_kept() -> None:
    """What the live 252 made of it: machine_load() returns before it parses ID, LEADER, CLASS,
    REALTIME, MONOTONIC and NETIF, even when they came before the refused line."""
    data = (b"SCOPE=a.scope\nSCOPE_JOB=/j\nSERVICE=svc\nROOT=/srv\nID=" + b"11" * 16 +
            b"\nLEADER=7\nCLASS=vm\nREALTIME=5\nMONOTONIC=6\nNETIF=7 3\n")
    for bad in (b"FOO=\xff\xfe\n", b"F\xffO=1\n", b"FOO=\xc0\xaf\n", b"FOO=\xed\xa0\x80\n",
                "FOO=\ufffe\n".encode(), "FOO=\ufdd0\n".encode(), "FOO=\U0010ffff\n".encode()):
        values, refusal = parse_state(data + bad)
        assert refusal is not None, bad
        assert values == {"SCOPE": "a.scope", "SCOPE_JOB": "/j", "SERVICE": "svc",
                          "ROOT": "/srv"}, bad


def test_netif_words_are_split_as_252_splits_them() -> None:
    """extract_first_word(): space, tab, CR and LF separate, a backslash takes the next
    character (the file's own escapes come off first), a trailing one ends the list."""
    for line, netif in ((b"NETIF=3\\\\4", [34]), (b"NETIF=1\x0b2", []), (b"NETIF=1\x0c2", []),
                        (b"NETIF=7\\\\ 3 9", [9]), (b"NETIF='7 3\\'", [7]),
                        (b"NETIF=1\t2", [1, 2])):
        m = Machine(name="x")
        apply(m, parse_state(line + b"\n")[0])
        assert m.netif == netif, line


def test_an_infinite_clock_counts_as_unset() -> None:
    """dual_timestamp_is_set(): a clock counts when it is above 0 and not USEC_INFINITY; with
    neither, the start takes the time."""
    infinity = b"18446744073709551615"
    for text in (b"REALTIME=" + infinity + b"\nMONOTONIC=0\n", b"REALTIME=" + infinity + b"\n",
                 b"REALTIME=0\nMONOTONIC=" + infinity + b"\n"):
        m = Machine(name="x")
        apply(m, parse_state(text)[0])
        assert m.timestamp is None, text
    m = Machine(name="x")
    apply(m, parse_state(b"REALTIME=" + infinity + b"\nMONOTONIC=5\n")[0])
    assert m.timestamp == Timestamp(2**64 - 1, 5)


def test_save_is_atomic_and_links_unit(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "machines")
    m = sample()
    d.save(m)
    f = tmp_path / "machines" / "spec-ct"
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert os.readlink(tmp_path / "machines" / "unit:spec-test.scope") == "spec-ct"
    assert [p.name for p in (tmp_path / "machines").iterdir() if p.name.startswith(".#")] == []
    d.save(m)  # an existing link is left alone
    loaded = list(d.load())
    assert [x.name for x in loaded] == ["spec-ct"] and loaded[0].leader == 21914
    d.remove(m)
    assert list((tmp_path / "machines").iterdir()) == []


def test_save_recreates_a_removed_directory(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "run" / "machines")  # parents missing too
    d.save(sample())
    assert (tmp_path / "run" / "machines" / "spec-ct").read_text() == serialize(sample())
    d.remove(sample())
    (tmp_path / "run" / "machines").rmdir()
    d.save(sample())
    assert (tmp_path / "run" / "machines" / "spec-ct").exists()


def test_load_skips_hidden_backup_and_invalid(tmp_path: Path) -> None:
    for name in (".#tmp", "a~", "bad_name", "unit:x.scope", "good", "x.dpkg-old"):
        (tmp_path / name).write_text("CLASS=container\nLEADER=5\n")
    assert [m.name for m in StateDir(tmp_path).load()] == ["good"]
