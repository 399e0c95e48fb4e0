"""Parsing of env files as systemd's parse_env_file reads them (os-release §8.2, machine-info,
the state files of /run/systemd/machines): KEY=VALUE lines, '#'/';' comments, single or double
quotes, backslash escapes, line continuations; lines without a valid key are skipped; pairs in
file order."""

from __future__ import annotations

import re

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env_file(text: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for line in _logical_lines(text):
        line = line.lstrip()
        if not line or line[0] in "#;":
            continue
        key, sep, raw = line.partition("=")
        key = key.strip()
        if not sep or not _ENV_NAME.fullmatch(key):
            continue
        pairs.append((key, _value(raw.strip())))
    return pairs


def _logical_lines(text: str) -> list[str]:
    """Join lines ending in an unquoted backslash with the next one."""
    out: list[str] = []
    current = ""
    for line in text.split("\n"):
        if line.endswith("\\") and not line.endswith("\\\\"):
            current += line[:-1]
            continue
        out.append(current + line)
        current = ""
    if current:
        out.append(current)
    return out


def _value(raw: str) -> str:
    out = []
    quote = ""
    i = 0
    while i < len(raw):
        c = raw[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"' and i + 1 < len(raw):
                i += 1
                out.append(raw[i])
            else:
                out.append(c)
        elif c in "'\"":
            quote = c
        elif c == "\\" and i + 1 < len(raw):
            i += 1
            out.append(raw[i])
        elif c == "#" and (not out or out[-1].isspace()):
            break  # a trailing comment after whitespace
        else:
            out.append(c)
        i += 1
    return "".join(out).rstrip() if not quote else "".join(out)
