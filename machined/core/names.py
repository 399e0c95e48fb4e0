"""Names and escapes exactly as systemd 252 defines them (hostname_is_valid, utf8_is_valid,
bus_label_escape, unit_name_escape, cescape, hidden/backup file names)."""

from __future__ import annotations

import re
import string

HOST_NAME_MAX = 64
NAME_MAX = 255

_NOT_IN_IMAGE_NAME = re.compile("[/\x00-\x1f\x7f]")


def machine_name_is_valid(name: str) -> bool:
    """hostname_is_valid(name, 0): dot-separated labels of [A-Za-z0-9-], no label starts or ends
    with '-', at most 64 bytes. '.host' is not a valid machine name."""
    return len(name) <= HOST_NAME_MAX and _HOSTNAME.match(name) is not None


_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z")


def hostname_is_valid_trailing_dot(name: str) -> bool:
    """hostname_is_valid(name, VALID_HOSTNAME_TRAILING_DOT): also one trailing dot after two
    labels or more."""
    if name.endswith(".") and name.count(".") >= 2:
        return len(name) <= HOST_NAME_MAX and machine_name_is_valid(name[:-1])
    return machine_name_is_valid(name)


_LDH = frozenset(string.ascii_letters + string.digits)


def hostname_cleanup(s: str) -> str:
    """Letters, digits, single dots and hyphens kept, no label starting with a hyphen or dot,
    at most HOST_NAME_MAX characters, one trailing dot or hyphen cut (systemd's)."""
    out: list[str] = []
    dot = hyphen = True
    for c in s:
        if len(out) >= HOST_NAME_MAX:
            break
        if c == ".":
            if not (dot or hyphen):
                out.append(c)
                dot, hyphen = True, False
        elif c == "-":
            if not dot:
                out.append(c)
                dot, hyphen = False, True
        elif c in _LDH:
            out.append(c)
            dot = hyphen = False
    if out and out[-1] in ".-":
        out.pop()
    return "".join(out)


# The code points systemd's unichar_is_valid() refuses besides surrogates: U+FDD0-U+FDEF and
# the last two of every plane (U+FFFE, U+FFFF, U+1FFFE, ...). sd-bus refuses them in strings.
_NONCHARACTER = re.compile("[\ufdd0-\ufdef" + "".join(
    chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17)) + "]")


def utf8_is_valid(s: str) -> bool:
    """utf8_is_valid() of a string decoded with surrogateescape: every byte was UTF-8 (no lone
    surrogates) and no code point is a non-character."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return _NONCHARACTER.search(s) is None


def image_name_is_valid(name: str) -> bool:
    """image_name_is_valid(): a file name that is not a temporary '.#' file."""
    if not name or name in (".", "..") or not utf8_is_valid(name):
        return False
    if len(name.encode("utf-8")) > NAME_MAX or _NOT_IN_IMAGE_NAME.search(name):
        return False
    return not name.startswith(".#")


def bus_label_escape(s: str) -> str:
    """bus_label_escape(): '' -> '_'; bytes other than ASCII letters (and digits not in first
    position) become '_' + two lowercase hex digits."""
    if not s:
        return "_"
    raw = s.encode("utf-8")
    if raw.isalnum() and not raw[:1].isdigit():  # the usual name needs no escape
        return s
    head = raw[:1] if raw[:1].isalpha() else b"_%02x" % raw[0]
    return (head + _NOT_LABEL.sub(lambda c: b"_%02x" % c[0][0], raw[1:])).decode("ascii")


_NOT_LABEL = re.compile(rb"[^A-Za-z0-9]")


def bus_label_unescape(label: str) -> str:
    """bus_label_unescape(): '_' + two hex digits (either case) is that byte, any other '_' is
    itself, and a lone '_' is ''. Any byte may be escaped, so one name has many labels. 252 uses
    the result as a C string, so it ends at the first NUL ('_00')."""
    if label == "_":
        return ""
    if "_" not in label:
        return label
    out = bytearray()
    i = 0
    raw = label.encode("utf-8")
    hexdigits = b"0123456789abcdefABCDEF"
    while i < len(raw):
        if (
            raw[i : i + 1] == b"_"
            and i + 2 < len(raw)
            and raw[i + 1] in hexdigits
            and raw[i + 2] in hexdigits
        ):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.split(b"\0", 1)[0].decode("utf-8", errors="surrogateescape")


_UNIT_OK = frozenset(string.ascii_letters + string.digits + ":_.")
_UNIT_PREFIX_CHARS = _UNIT_OK | {"-", "\\", "@"}


def unit_name_escape(s: str) -> str:
    """unit_name_escape(): '/' -> '-'; a leading '.', '-', '\\' and bytes outside [A-Za-z0-9:_.]
    -> '\\xNN'."""
    out = []
    for i, b in enumerate(s.encode("utf-8")):
        c = chr(b)
        if c == "/":
            out.append("-")
        elif (c == "." and i == 0) or c not in _UNIT_OK or b >= 0x80:
            out.append(f"\\x{b:02x}")
        else:
            out.append(c)
    return "".join(out)


def machine_scope_name(machine_name: str) -> str:
    return f"machine-{unit_name_escape(machine_name)}.scope"


def unit_name_is_valid(name: str) -> bool:
    """A plain or instance unit name with a known suffix (enough for cgroup->unit parsing)."""
    if not name or len(name) > 256 or "/" in name:
        return False
    prefix, dot, suffix = name.rpartition(".")
    if not dot or not prefix or suffix not in _UNIT_SUFFIXES:
        return False
    if not _UNIT_PREFIX_CHARS.issuperset(prefix):
        return False
    if "@" in prefix:
        template, _, _instance = prefix.partition("@")
        return bool(template)
    return True


_UNIT_SUFFIXES = frozenset(
    {"service", "socket", "target", "device", "mount", "automount", "swap", "timer", "path",
     "slice", "scope"}
)


_NEEDS_CESCAPE = re.compile("[^\x20-\x7e]|[\\\\\"']")
_CESCAPE = {
    "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
    "\\": "\\\\", '"': '\\"', "'": "\\'",
}


def cescape(s: str) -> str:
    """cescape(): C escapes for the usual characters, octal for other bytes < 0x20 or >= 0x7f."""
    if not _NEEDS_CESCAPE.search(s):  # the usual case, for every state file written
        return s
    out = []
    for b in s.encode("utf-8", errors="surrogateescape"):
        c = chr(b)
        if c in _CESCAPE:
            out.append(_CESCAPE[c])
        elif b < 0x20 or b >= 0x7F:
            out.append(f"\\{b:03o}")
        else:
            out.append(c)
    return "".join(out)


_BACKUP_SUFFIXES = (
    "~", ".rpmnew", ".rpmsave", ".rpmorig", ".dpkg-old", ".dpkg-new", ".dpkg-tmp", ".dpkg-dist",
    ".dpkg-bak", ".dpkg-backup", ".dpkg-remove", ".ucf-new", ".ucf-old", ".ucf-dist", ".swp",
    ".bak", ".old", ".new",
)


def hidden_or_backup_file(name: str) -> bool:
    """hidden_or_backup_file(): names every sd-login reader skips in /run/systemd/machines."""
    if name.startswith(".") or name in ("lost+found", "aquota.user", "aquota.group"):
        return True
    return name.endswith(_BACKUP_SUFFIXES)
