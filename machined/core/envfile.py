"""Env files (os-release §8.2, machine-info, the state files of /run/systemd/machines) read as
systemd 252's parse_env_file_internal() and load_env_file_pairs() read them, character by
character; compared with the live 252 on a container's os-release.

What that means: a key is whatever stands before the first "=" of a line (trailing blanks cut;
no other check); "#" and ";" start a comment only where a key would start, and a comment goes on
past a newline escaped with a backslash; a value is made of unquoted parts (leading and trailing
blanks cut, a backslash escapes the next character, an escaped newline is dropped), 'single'
quoted parts (taken as they are, newlines too) and "double" quoted parts (a backslash escapes
" \\ ` $ and a newline and stays before anything else), run together; blanks between parts are
dropped, and an unquoted part takes quotes literally. Both "\\n" and "\\r" end lines. A key seen
again keeps its first place and takes the last value; a file that ends inside a value still
gives it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from .errors import ErrnoError
from .names import utf8_is_valid

_NEWLINE = "\n\r"
_WHITESPACE = " \t\n\r"
_COMMENTS = "#;"
_SHELL_NEED_ESCAPE = '"\\`$'

(_PRE_KEY, _KEY, _PRE_VALUE, _VALUE, _VALUE_ESCAPE, _SINGLE_QUOTE, _DOUBLE_QUOTE,
 _DOUBLE_QUOTE_ESCAPE, _COMMENT, _COMMENT_ESCAPE) = range(10)


def parse_env_file(text: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of `text`, each key once, in the order keys first appear."""
    return list(dict(_assignments(text)).items())


def parse_env_bytes(data: bytes) -> list[tuple[str, str]]:
    """parse_env_file() of a file's bytes, refused as 252 refuses them: a NUL byte is EBADMSG,
    a key or value that is not valid UTF-8 (utf8_is_valid: non-characters too) is EINVAL."""
    assignments, refusal = valid_assignments(data)
    if refusal is not None:
        raise refusal
    return list(dict(assignments).items())


def valid_assignments(data: bytes) -> tuple[list[tuple[str, str]], ErrnoError | None]:
    """The assignments of a file's bytes in file order, up to the first that 252 refuses, and
    that refusal (252's parser has assigned what came before when it stops)."""
    if b"\0" in data:  # read_full_stream() refuses the file before any parsing
        return [], ErrnoError(errno.EBADMSG)
    out: list[tuple[str, str]] = []
    for key, value in _assignments(data.decode("utf-8", "surrogateescape")):
        if not (utf8_is_valid(key) and utf8_is_valid(value)):
            return out, ErrnoError(errno.EINVAL)
        out.append((key, value))
    return out, None


def _blank_from(c: str, mark: int | None, length: int) -> int | None:
    """Where a run of trailing blanks starts once `c` is appended at `length`."""
    if c not in _WHITESPACE:
        return None
    return length if mark is None else mark


def _assignments(text: str) -> Iterator[tuple[str, str]]:
    """Every assignment in file order (repeated keys included)."""
    state = _PRE_KEY
    key: list[str] = []
    value: list[str] = []
    key_blank_from: int | None = None  # where the key's trailing blanks start
    value_blank_from: int | None = None  # the same for an unquoted value

    def assignment(chomp: bool) -> tuple[str, str]:
        k = "".join(key if key_blank_from is None else key[:key_blank_from])
        v = value if not chomp or value_blank_from is None else value[:value_blank_from]
        return k, "".join(v)

    for c in text:
        if state == _PRE_KEY:
            if c in _COMMENTS:
                state = _COMMENT
            elif c not in _WHITESPACE:
                state, key, key_blank_from = _KEY, [c], None
        elif state == _KEY:
            if c in _NEWLINE:
                state = _PRE_KEY  # a line without "=": nothing
            elif c == "=":
                state, value, value_blank_from = _PRE_VALUE, [], None
            else:
                key_blank_from = _blank_from(c, key_blank_from, len(key))
                key.append(c)
        elif state == _PRE_VALUE:
            if c in _NEWLINE:
                yield assignment(chomp=False)
                state = _PRE_KEY
            elif c == "'":
                state = _SINGLE_QUOTE
            elif c == '"':
                state = _DOUBLE_QUOTE
            elif c == "\\":
                state = _VALUE_ESCAPE
            elif c not in _WHITESPACE:
                state = _VALUE
                value.append(c)
        elif state == _VALUE:
            if c in _NEWLINE:
                yield assignment(chomp=True)
                state = _PRE_KEY
            elif c == "\\":
                state, value_blank_from = _VALUE_ESCAPE, None
            else:
                value_blank_from = _blank_from(c, value_blank_from, len(value))
                value.append(c)
        elif state == _VALUE_ESCAPE:
            state = _VALUE
            if c not in _NEWLINE:  # an escaped newline is dropped
                value.append(c)
        elif state == _SINGLE_QUOTE:
            if c == "'":
                state = _PRE_VALUE
            else:
                value.append(c)
        elif state == _DOUBLE_QUOTE:
            if c == '"':
                state = _PRE_VALUE
            elif c == "\\":
                state = _DOUBLE_QUOTE_ESCAPE
            else:
                value.append(c)
        elif state == _DOUBLE_QUOTE_ESCAPE:
            state = _DOUBLE_QUOTE
            if c in _SHELL_NEED_ESCAPE:
                value.append(c)
            elif c != "\n":  # the backslash stays, as in the shell
                value += ("\\", c)
        elif state == _COMMENT:
            if c == "\\":
                state = _COMMENT_ESCAPE
            elif c in _NEWLINE:
                state = _PRE_KEY
        else:  # _COMMENT_ESCAPE: whatever follows, newline too, is still the comment (252)
            state = _COMMENT
    if state in (_PRE_VALUE, _VALUE, _VALUE_ESCAPE, _SINGLE_QUOTE, _DOUBLE_QUOTE,
                 _DOUBLE_QUOTE_ESCAPE):
        yield assignment(chomp=state == _VALUE)
