"""The daemon's log lines: "machined[PID]: LEVEL text", "<N>text" on the journal stream, or native
journal entries (with 252's fields) when the journal socket is there."""

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined.logs import LineHandler as _LineHandler


@pytest.fixture
def log() -> Iterator[logging.Logger]:
    logger = logging.getLogger("machined.test-logging")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger
    logger.handlers.clear()


def test_console_lines(log: logging.Logger, capfd: pytest.CaptureFixture[str]) -> None:
    log.addHandler(_LineHandler(journal=False))
    log.info("New machine %s.", "ct")
    log.warning("100%% sure: %d", 1)
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.exception("Handler failed")
    err = capfd.readouterr().err.splitlines()
    prefix = f"machined[{os.getpid()}]: "
    assert err[0] == prefix + "INFO New machine ct."
    assert err[1] == prefix + "WARNING 100% sure: 1"
    assert err[2] == prefix + "ERROR Handler failed"
    assert err[3] == "Traceback (most recent call last):"
    assert err[-1] == "ZeroDivisionError: boom"


def test_journal_lines(log: logging.Logger, capfd: pytest.CaptureFixture[str]) -> None:
    log.addHandler(_LineHandler(journal=True))
    log.info("New machine %s.", "ct")
    log.error("Failed: %s", "ü")
    log.debug("detail")
    assert capfd.readouterr().err == "<6>New machine ct.\n<3>Failed: ü\n<7>detail\n"


def test_child_after_fork_uses_its_own_pid(log: logging.Logger,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    log.addHandler(_LineHandler(journal=False))
    pid = os.fork()
    if pid == 0:
        log.info("from the child")
        os._exit(0)
    os.waitpid(pid, 0)
    assert capfd.readouterr().err == f"machined[{pid}]: INFO from the child\n"


def test_lines_after_the_reply_go_out_together(capfd: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """info_after_reply: nothing before the next turn of the loop, then one write() for all the
    lines of the turn through the daemon's handler."""
    import asyncio

    from machined import logs

    handler = _LineHandler(journal=False)
    monkeypatch.setattr(logs, "_direct", handler)
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    logger = logging.getLogger("machined.test-after-reply")
    logger.setLevel(logging.INFO)
    writes: list[bytes] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        if fd == 2:
            writes.append(bytes(data))
        return real_write(fd, data)

    quiet = logging.getLogger("machined.test-quiet")
    quiet.setLevel(logging.WARNING)

    async def turn() -> str:
        logs.info_after_reply(logger, "New machine %s.", "a")
        logs.info_after_reply(quiet, "not %s", "shown")
        logs.info_after_reply(logger, "Machine %s terminated.", "b")
        before = capfd.readouterr().err
        await asyncio.sleep(0)
        return before

    monkeypatch.setattr(os, "write", counting_write)
    before = asyncio.run(turn())
    monkeypatch.setattr(os, "write", real_write)
    prefix = f"machined[{os.getpid()}]: INFO "
    assert before == ""
    assert capfd.readouterr().err == f"{prefix}New machine a.\n{prefix}Machine b terminated.\n"
    assert len(writes) == 1


def test_lines_after_the_reply_without_the_daemons_handler(caplog: pytest.LogCaptureFixture) -> None:
    """Elsewhere (tests, other handlers) they are ordinary log records."""
    import asyncio

    from machined import logs

    async def turn() -> None:
        logs.info_after_reply(logging.getLogger("machined.test-plain"), "New machine %s.", "c")
        await asyncio.sleep(0)

    with caplog.at_level(logging.INFO):
        asyncio.run(turn())
    assert [r.getMessage() for r in caplog.records] == ["New machine c."]


def parse_entry(data: bytes) -> dict[str, str]:
    """The journal's native format, read back."""
    import struct

    fields = {}
    while data:
        line, sep, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            data = rest
        else:  # KEY\n, a 64-bit length, the value, \n
            (size,) = struct.unpack("<Q", rest[:8])
            fields[line.decode()] = rest[8:8 + size].decode()
            assert rest[8 + size:9 + size] == b"\n"
            data = rest[9 + size:]
    return fields


def test_native_journal_entries(log: logging.Logger, capfd: pytest.CaptureFixture[str]) -> None:
    """Under systemd: a datagram per record, with 252's identifier, the priority, and a value
    with newlines (a traceback) in the binary form; nothing on the stream."""
    import socket

    ours, journald = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, journald:
        log.addHandler(_LineHandler(journal=True, native=ours))
        log.warning("Failed: %s", "ü")
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            log.exception("Handler failed")
        first, second = parse_entry(journald.recv(65536)), parse_entry(journald.recv(65536))
    assert first == {"PRIORITY": "4", "SYSLOG_IDENTIFIER": "systemd-machined",
                     "MESSAGE": "Failed: ü"}
    assert second["PRIORITY"] == "3"
    assert second["MESSAGE"].startswith("Handler failed\nTraceback (most recent call last):")
    assert second["MESSAGE"].endswith("ZeroDivisionError: boom")
    assert capfd.readouterr().err == ""


def test_machine_lines_carry_252s_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """info_after_reply's fields go into the entry (MESSAGE_ID, NAME, LEADER, as 252 logs)."""
    import asyncio
    import socket

    from machined import logs

    ours, journald = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, journald:
        handler = _LineHandler(journal=True, native=ours)
        monkeypatch.setattr(logs, "_direct", handler)
        monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
        logger = logging.getLogger("machined.test-fields")
        logger.setLevel(logging.INFO)

        async def turn() -> None:
            logs.info_after_reply(logger, "New machine %s.", "a", fields={
                "MESSAGE_ID": logs.MACHINE_START, "NAME": "a", "LEADER": "42"})
            logs.info_after_reply(logger, "plain")
            await asyncio.sleep(0)

        asyncio.run(turn())
        first, second = parse_entry(journald.recv(65536)), parse_entry(journald.recv(65536))
    assert first == {"PRIORITY": "6", "SYSLOG_IDENTIFIER": "systemd-machined",
                     "MESSAGE": "New machine a.", "MESSAGE_ID": "24d8d4452573402496068381a6312df2",
                     "NAME": "a", "LEADER": "42"}
    assert second["MESSAGE"] == "plain" and "MESSAGE_ID" not in second


def test_refused_entries_go_to_the_stream(log: logging.Logger,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    import socket

    ours, journald = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    journald.close()  # journald went away
    with ours:
        log.addHandler(_LineHandler(journal=True, native=ours))
        log.info("still %s", "here")
    assert capfd.readouterr().err == "<6>still here\n"


def test_journal_socket_only_for_the_journal_stream(tmp_path: Path) -> None:
    """JOURNAL_STREAM must name the fd's own device and inode, and the socket must be there."""
    import socket

    from machined.logs import journal_socket

    path = str(tmp_path / "socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journald, \
            open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        name = f"{st.st_dev}:{st.st_ino}"
        assert journal_socket(name, stream.fileno(), path) is None  # no socket yet
        journald.bind(path)
        sock = journal_socket(name, stream.fileno(), path)
        assert sock is not None
        sock.close()
        assert journal_socket(f"{st.st_dev}:{st.st_ino + 1}", stream.fileno(), path) is None
        assert journal_socket("", stream.fileno(), path) is None
        assert journal_socket("junk", stream.fileno(), path) is None


def test_log_control_levels_and_targets_as_252(monkeypatch: pytest.MonkeyPatch) -> None:
    """Levels by name or syslog number; the target "auto" unless $SYSTEMD_LOG_TARGET names one."""
    from machined.bus.logcontrol import LogControl, level_name
    from machined.core.errors import InvalidArgs

    assert [level_name(v) for v in ("debug", "7", "0", "3")] == ["debug", "debug", "emerg", "err"]
    for bad in ("8", "-1", "", "DEBUG"):
        with pytest.raises(InvalidArgs, match=f"Invalid log level '{bad}'"):
            level_name(bad)
    monkeypatch.delenv("SYSTEMD_LOG_TARGET", raising=False)
    assert LogControl().target == "auto"
    monkeypatch.setenv("SYSTEMD_LOG_TARGET", "journal-or-kmsg")
    assert LogControl().target == "journal-or-kmsg"
    monkeypatch.setenv("SYSTEMD_LOG_TARGET", "bogus")
    assert LogControl().target == "auto"


def test_the_log_target_decides_where_lines_go(log: logging.Logger,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    """console: the stream even with the journal's socket; null: nowhere; auto: the journal."""
    import socket

    ours, journald = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, journald:
        handler = _LineHandler(journal=True, native=ours)
        log.addHandler(handler)
        handler.target = "console"
        log.info("to the stream")
        handler.target = "null"
        log.info("to nowhere")
        handler.target = "auto"
        log.info("to the journal")
        assert parse_entry(journald.recv(65536))["MESSAGE"] == "to the journal"
        journald.setblocking(False)
        with pytest.raises(BlockingIOError):
            journald.recv(65536)
    assert capfd.readouterr().err == "<6>to the stream\n"
