"""The image model: argument rules, side files, metadata parsers, clean selection."""

from __future__ import annotations

import pytest

from machined.core.envfile import parse_env_file
from machined.core.errors import ErrnoError, InvalidArgs
from machined.core.images import (
    UINT64_MAX,
    CleanMode,
    Image,
    ImageType,
    SearchPath,
    check_image_name,
    check_limit,
    clean_mode,
    image_object_path,
    parse_hostname,
    parse_machine_id,
    refuse_vendor_or_host,
    to_clean,
)


def image(name: str, path: str, vendor: bool = False) -> Image:
    return Image(name, path, ImageType.DIRECTORY, False, vendor=vendor)


def test_search_path_order_and_root() -> None:
    assert SearchPath().dirs == ["/etc/machines", "/run/machines", "/var/lib/machines",
                                 "/var/lib/container", "/usr/local/lib/machines",
                                 "/usr/lib/machines"]
    s = SearchPath("/tmp/p")
    assert s.pool == "/tmp/p/var/lib/machines"
    assert s.is_vendor_dir("/tmp/p/usr/lib/machines") and not s.is_vendor_dir("/tmp/p/usrx")


def test_side_files_follow_the_name() -> None:
    s = SearchPath()
    img = image("foo", "/var/lib/machines/foo")
    assert s.side_files(img) == ["/etc/systemd/nspawn/foo.nspawn",
                                 "/run/systemd/nspawn/foo.nspawn",
                                 "/var/lib/machines/foo.nspawn", "/var/lib/machines/foo.roothash"]
    assert s.side_files(img, "bar")[2] == "/var/lib/machines/bar.nspawn"


@pytest.mark.parametrize("name", ["a/b", "", ".", "..", ".#tmp", "x" * 256, "a\x01b"])
def test_bad_names_are_invalid_args(name: str) -> None:
    with pytest.raises(InvalidArgs) as e:
        check_image_name(name)
    assert e.value.message == f"Image name '{name}' is invalid."


def test_limits_and_modes() -> None:
    assert check_limit(UINT64_MAX) == UINT64_MAX and check_limit(2**63 - 1) == 2**63 - 1
    with pytest.raises(InvalidArgs, match="New limit out of range"):
        check_limit(UINT64_MAX - 1)
    assert clean_mode("hidden") is CleanMode.HIDDEN
    with pytest.raises(InvalidArgs, match="Unknown mode 'foo'."):
        clean_mode("foo")


def test_clean_selection_and_refusals() -> None:
    hidden, plain = image(".h", "/p/.h"), image("p", "/p/p")
    vendor, host = image(".v", "/usr/lib/machines/.v", vendor=True), image(".host", "/")
    assert to_clean(hidden, CleanMode.HIDDEN) and not to_clean(plain, CleanMode.HIDDEN)
    assert to_clean(plain, CleanMode.ALL)
    assert not to_clean(vendor, CleanMode.ALL) and not to_clean(host, CleanMode.ALL)
    for refused in (vendor, host):
        with pytest.raises(ErrnoError) as e:
            refuse_vendor_or_host(refused)
        assert e.value.message == "Read-only file system"
    refuse_vendor_or_host(plain)


def test_object_paths() -> None:
    assert image_object_path(".host") == "/org/freedesktop/machine1/image/_2ehost"
    assert image_object_path("spec-ct") == "/org/freedesktop/machine1/image/spec_2dct"


def test_parse_env_file() -> None:
    text = ('# comment\nID=debian\nNAME="Debian GNU/Linux"\nPRETTY_NAME=\'It\'"s"\n'
            'VERSION_ID="12" # trailing\nbad line\n1X=no\nHOME_URL="a\\"b"\n')
    assert dict(parse_env_file(text)) == {"ID": "debian", "NAME": "Debian GNU/Linux",
                                          "PRETTY_NAME": "Its", "VERSION_ID": "12# trailing",
                                          "1X": "no", "HOME_URL": 'a"b'}


def test_hostname_and_machine_id() -> None:
    # the first line that is not empty and does not start with "#", cleaned up (252's)
    assert parse_hostname("# c\n\n tiny \n") == "tiny"
    for text, name in (("bad_name\n", "badname"), ("a..b.\n", "a.b"), ("-lead", "lead"),
                       ("a-.b", "a-b"), ("two words", "twowords"), ("münchen", "mnchen"),
                       ("x" * 70, "x" * 64), ("   \nnext\n", ""), ("a--\n", "")):
        assert parse_hostname(text) == name, text
    one = b"0123456789abcdef0123456789abcdef"
    for data, directory, raw in ((one + b"\n", True, True), (one, True, False),
                                 (one + b"\n\n", False, True), (b" " + one + b"\n", False, False),
                                 (one + b" \n", False, False), (b"0" * 32 + b"\n", False, False),
                                 (b"xyz", False, False)):
        assert parse_machine_id(data) == (bytes.fromhex(one.decode()) if directory else b"")
        assert parse_machine_id(data, first_line=True) == (
            bytes.fromhex(one.decode()) if raw else b""), data
