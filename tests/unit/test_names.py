import pytest
from hypothesis import given
from hypothesis import strategies as st

from machined.core.names import (
    bus_label_escape,
    bus_label_unescape,
    cescape,
    hidden_or_backup_file,
    image_name_is_valid,
    machine_name_is_valid,
    machine_scope_name,
    unit_name_escape,
)


@pytest.mark.parametrize("name", ["a", "spec-ct", "foo.bar", "a1", "x" * 64, "1abc", "A-b.C-d"])
def test_valid_machine_names(name: str) -> None:
    assert machine_name_is_valid(name)


@pytest.mark.parametrize("name", ["", ".host", "bad_name", "-bad", "a-", "a..b", "a-.b", "a.-b",
                                  ".a", "a.", "x" * 65, "a/b", "ä", "a b"])
def test_invalid_machine_names(name: str) -> None:
    assert not machine_name_is_valid(name)


@pytest.mark.parametrize("plain,label", [
    ("", "_"), (".host", "_2ehost"), ("spec-ct", "spec_2dct"), ("foo.bar", "foo_2ebar"),
    ("1abc", "_31abc"), ("a1", "a1"), ("my_img", "my_5fimg"), ("é", "_c3_a9"),
])
def test_bus_label_escape_roundtrip(plain: str, label: str) -> None:
    assert bus_label_escape(plain) == label
    assert bus_label_unescape(label) == plain


def test_bus_label_unescape_keeps_lone_underscore() -> None:
    assert bus_label_unescape("a_zz") == "a_zz"
    assert bus_label_unescape("a_4") == "a_4"
    assert bus_label_unescape("_2E") == "."


def test_bus_label_unescape_takes_any_spelling_and_ends_at_a_nul() -> None:
    assert bus_label_unescape("rf_2Da") == bus_label_unescape("_72f_2d_61") == "rf-a"
    assert bus_label_unescape("rf_2da_00x") == "rf-a"
    assert bus_label_unescape("_00") == ""


def test_unit_name_escape() -> None:
    assert unit_name_escape("my-ct") == "my\\x2dct"
    assert unit_name_escape(".x") == "\\x2ex"
    assert unit_name_escape("a/b") == "a-b"
    assert machine_scope_name("my-ct") == "machine-my\\x2dct.scope"
    assert machine_scope_name("foo.bar") == "machine-foo.bar.scope"


def test_cescape() -> None:
    assert cescape('a\tb"\\') == 'a\\tb\\"\\\\'
    assert cescape("\x01\x7f") == "\\001\\177"
    assert cescape("/tmp/plain") == "/tmp/plain"


@pytest.mark.parametrize("name", ["a", ".host", ".hidden", "x" * 255, "a b", "ä"])
def test_valid_image_names(name: str) -> None:
    assert image_name_is_valid(name)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x" * 256, "a\nb", "a\x7f", ".#tmp"])
def test_invalid_image_names(name: str) -> None:
    assert not image_name_is_valid(name)


def test_hidden_or_backup() -> None:
    for name in (".#foo", ".x", "foo~", "a.dpkg-new", "b.swp", "lost+found", "aquota.user"):
        assert hidden_or_backup_file(name)
    for name in ("foo", "unit:machine-foo.scope", "a.b"):
        assert not hidden_or_backup_file(name)


# The fast paths of the functions above against the rules written out byte by byte.
def _label_rule(s: str) -> str:
    if not s:
        return "_"
    return "".join(chr(b) if chr(b).isascii() and (chr(b).isalpha() or (i and chr(b).isdigit()))
                   else f"_{b:02x}" for i, b in enumerate(s.encode()))


def _hostname_rule(name: str) -> bool:
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
    return 0 < len(name.encode()) <= 64 and all(
        label and label[0] != "-" and label[-1] != "-" and set(label) <= ok
        for label in name.split("."))


def _cescape_rule(s: str) -> str:
    table = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v",
             92: "\\\\", 34: '\\"', 39: "\\'"}
    return "".join(table.get(b) or (f"\\{b:03o}" if b < 0x20 or b >= 0x7F else chr(b))
                   for b in s.encode("utf-8", "surrogateescape"))


_NAMEISH = st.text(alphabet=st.sampled_from("aZ09-._/é \t\\\"'\x7f"), max_size=70)


@given(st.one_of(_NAMEISH, st.text(max_size=20)))
def test_fast_paths_follow_the_rules(s: str) -> None:
    assert bus_label_escape(s) == _label_rule(s)
    assert bus_label_unescape(bus_label_escape(s)) == s.split("\0", 1)[0]  # a C string
    assert machine_name_is_valid(s) == _hostname_rule(s)
    assert cescape(s) == _cescape_rule(s)
