"""/run/systemd/machines: one file per started machine plus `unit:<unit>` symlinks (spec §7).

Files appear through rename() and disappear through unlink(), because sd-login's monitor
watches IN_MOVED_TO | IN_DELETE.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

from .envfile import valid_assignments
from .errors import ErrnoError
from .machine import USEC_INFINITY, Machine, MachineClass, Timestamp, timestamp_is_set
from .names import cescape, hidden_or_backup_file, machine_name_is_valid

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/systemd/machines")
HEADER = "# This is private data. Do not parse.\n"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_ASSIGNED_WHILE_READING = ("SCOPE", "SCOPE_JOB", "SERVICE", "ROOT")


def serialize(m: Machine) -> str:
    lines = [HEADER, f"NAME={m.name}\n"]
    if m.unit:
        lines.append(f"SCOPE={cescape(m.unit)}\n")
    if m.scope_job:
        lines.append(f"SCOPE_JOB={m.scope_job}\n")
    if m.service:
        lines.append(f"SERVICE={cescape(m.service)}\n")
    if m.root_directory:
        lines.append(f"ROOT={cescape(m.root_directory)}\n")
    if m.id_bytes:
        lines.append(f"ID={m.id_bytes.hex()}\n")
    if m.leader:
        lines.append(f"LEADER={m.leader}\n")
    if m.cls is not MachineClass.UNKNOWN:
        lines.append(f"CLASS={m.cls.value}\n")
    if m.timestamp is not None:
        lines.append(f"REALTIME={m.timestamp.realtime}\nMONOTONIC={m.timestamp.monotonic}\n")
    if m.netif:
        lines.append("NETIF=" + " ".join(str(i) for i in m.netif) + "\n")
    return "".join(lines)


def parse_state(data: bytes) -> tuple[dict[str, str], ErrnoError | None]:
    """The keys of a state file as 252's machine_load() takes them, and the refusal of a line,
    if any. After a refusal only SCOPE, SCOPE_JOB, SERVICE and ROOT from the lines before it
    are kept: 252's parser assigns those as it reads, and machine_load() returns before it
    parses the others."""
    assignments, refusal = valid_assignments(data)
    values = dict(assignments)
    if refusal is not None:
        values = {k: v for k, v in values.items() if k in _ASSIGNED_WHILE_READING}
    return values, refusal


def apply(m: Machine, data: dict[str, str]) -> None:
    """Load the keys machined reads back (§7.3), each parsed as 252's machine_load() parses it
    (C integer syntax, ranges); one that does not parse is left unset. NAME is ignored: the
    file name wins."""
    m.unit = data.get("SCOPE", m.unit)
    m.scope_job = data.get("SCOPE_JOB", m.scope_job)
    m.service = data.get("SERVICE", m.service)
    m.root_directory = data.get("ROOT", m.root_directory)
    parsed_id = _id128(data.get("ID", ""))
    if parsed_id is not None:
        m.id = parsed_id
    leader = _c_integer(data.get("LEADER", ""), 1, 2**31 - 1)  # parse_pid()
    if leader is not None:
        m.leader = leader
    with contextlib.suppress(ValueError):
        m.cls = MachineClass(data.get("CLASS", ""))
    realtime, monotonic = (_c_integer(data.get(key, ""), 0, USEC_INFINITY) or 0
                           for key in ("REALTIME", "MONOTONIC"))
    if timestamp_is_set(realtime) or timestamp_is_set(monotonic):  # dual_timestamp_is_set()
        m.timestamp = Timestamp(realtime, monotonic)  # else the start takes the time, as in 252
    netif = [i for word in _words(data.get("NETIF", ""))
             if (i := _c_integer(word, 1, 2**31 - 1)) is not None]  # parse_ifindex()
    if netif:
        m.netif = netif


def _words(text: str) -> Iterator[str]:
    """extract_first_word(&p, &word, NULL, 0) word after word, as machine_load() splits NETIF:
    separated by space, tab, CR and LF; a backslash takes the next character as it is; a
    backslash at the very end is an error, and 252 stops there."""
    word: list[str] = []
    in_word = escaped = False
    for c in text:
        if escaped:
            escaped = False
            word.append(c)
        elif c == "\\":
            in_word = escaped = True
        elif c in " \t\n\r":
            if in_word:
                yield "".join(word)
            word, in_word = [], False
        else:
            in_word = True
            word.append(c)
    if in_word and not escaped:
        yield "".join(word)


def _c_integer(text: str, lo: int, hi: int) -> int | None:
    """systemd's safe_ato*(): leading blanks, a sign, "0x" hex, "0o"/"0b" and C's leading-zero
    octal, every character used; None outside [lo, hi] (a "-" never gives an unsigned one)."""
    s = text.lstrip(" \t\n\r")
    base = 0
    if s[:2] in ("0b", "0B", "0o", "0O"):
        base, s = (2 if s[1] in "bB" else 8), s[2:]
    m = re.fullmatch(r"\s*([+-]?)(\w*)", s, re.ASCII)
    if m is None:
        return None
    sign, digits = m.groups()
    if base == 0:
        if digits[:2] in ("0x", "0X"):
            base, digits = 16, digits[2:]
        elif digits.startswith("0") and len(digits) > 1:
            base, digits = 8, digits[1:]
        else:
            base = 10
    if not digits or any(c not in "0123456789abcdef"[:base] for c in digits.lower()):
        return None
    value = -int(digits, base) if sign == "-" else int(digits, base)
    if sign == "-" and value and lo >= 0:
        return None
    return value if lo <= value <= hi else None


def _id128(text: str) -> bytes | None:
    """sd_id128_from_string(): 32 hex digits, or a UUID with its four dashes."""
    if len(text) == 36 and all(text[i] == "-" for i in (8, 13, 18, 23)):
        text = text.replace("-", "")
    if not re.fullmatch(r"[0-9a-fA-F]{32}", text):
        return None
    return bytes.fromhex(text)


class StateDir:
    """Reads and writes the state files of one directory."""

    def __init__(self, path: Path = DEFAULT_STATE_DIR) -> None:
        self.path = path
        # The daemon runs with umask 022, which gives 0644 at creation: no fchmod() needed then.
        umask = os.umask(0o022)
        os.umask(umask)
        self._chmod = bool(umask & 0o644)

    def ensure(self) -> None:
        try:
            self.path.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as e:
            log.warning("Failed to create %s: %s", self.path, e)

    def save(self, m: Machine) -> None:
        """Write atomically (temp file + rename), then the unit symlink. On failure remove both
        the temp file and the state file, as machined does."""
        # Plain strings and os calls, not pathlib: this runs for every registration.
        directory = str(self.path)
        final = f"{directory}/{m.name}"
        tmp = f"{directory}/.#{m.name}{random.getrandbits(24):06x}"  # O_EXCL makes it unique
        try:
            try:
                fd = os.open(tmp, _CREATE, 0o644)
            except FileNotFoundError:  # somebody removed the directory
                self.ensure()
                fd = os.open(tmp, _CREATE, 0o644)
            try:
                os.write(fd, serialize(m).encode("utf-8", errors="surrogateescape"))
                if self._chmod:
                    os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError as e:
            log.error("Failed to save machine data %s: %s", final, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with contextlib.suppress(OSError):
                os.unlink(final)
            return
        if m.unit:
            with contextlib.suppress(OSError):
                os.symlink(m.name, f"{directory}/unit:{m.unit}")

    def remove(self, m: Machine) -> None:
        if m.unit:
            self.remove_unit_link(m.unit)
        with contextlib.suppress(OSError):
            os.unlink(f"{self.path}/{m.name}")

    def remove_unit_link(self, unit: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(f"{self.path}/unit:{unit}")

    def load(self) -> Iterator[Machine]:
        """Every machine file the readers would list (§7.4), parsed; not started."""
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            if hidden_or_backup_file(name) or name.startswith("unit:"):
                continue
            if not machine_name_is_valid(name):
                continue
            if not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                continue
            m = Machine(name=name)
            try:
                data = Path(entry.path).read_bytes()
            except OSError as e:
                log.warning("Failed to load %s: %s", entry.path, e)
                data = b""
            values, refusal = parse_state(data)
            if refusal is not None:
                log.warning("Failed to read %s: %s", entry.path, refusal)
            apply(m, values)
            yield m
