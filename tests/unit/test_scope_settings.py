"""What the cgroupfs backend keeps of a scope's stop settings for its next start."""

from __future__ import annotations

import signal

from machined.scopes.cgroupfs import (
    DEFAULT_STOP,
    read_stop_deadline,
    read_stop_note,
    scope_settings,
    stop_note,
)


def test_defaults_keep_nothing() -> None:
    assert stop_note(DEFAULT_STOP) == b""
    assert stop_note(scope_settings([("Slice", ("s", "foo.slice"))])) == b""


def test_settings_read_back() -> None:
    settings = scope_settings([("KillSignal", ("i", int(signal.SIGINT))),
                               ("KillMode", ("s", "mixed")),
                               ("TimeoutStopUSec", ("t", 2_500_000)),
                               ("Slice", ("s", "foo.slice"))])
    note = stop_note(settings)
    assert note == b"KillSignal=2\nKillMode=mixed\nTimeoutStopUSec=2500000\n"
    back = read_stop_note(note)
    assert (back.kill_signal, back.kill_mode, back.stop_timeout) == (2, "mixed", 2.5)


def test_bad_notes_keep_the_defaults() -> None:
    assert read_stop_note(None) == DEFAULT_STOP
    assert read_stop_note(b"\xff\xfe garbage\nKillSignal=99\nKillMode=bogus\n"
                          b"TimeoutStopUSec=-1\nKillSignal=\n") == DEFAULT_STOP
    assert read_stop_note(b"KillSignal=9").kill_signal == 9


def test_a_stop_under_way_keeps_its_deadline() -> None:
    note = stop_note(DEFAULT_STOP, stopping_until=12.5)
    assert note.endswith(b"StopDeadlineUSec=12500000\n")
    assert read_stop_deadline(note) == 12.5
    assert read_stop_note(note) == DEFAULT_STOP
    assert read_stop_deadline(stop_note(scope_settings([("KillMode", ("s", "mixed"))]))) is None
    assert read_stop_deadline(None) is None
    assert read_stop_deadline(b"StopDeadlineUSec=soon\n") is None
