"""The daemon's log lines: one line per record on stderr, "machined[PID]: LEVEL text"; under
systemd, whose journal stream stderr then is, one datagram per record to the journal's native
socket (as 252 logs, so that "New machine"/"terminated" carry their MESSAGE_ID, NAME and
LEADER fields), or "<N>text" lines on the stream when the socket cannot be had; and the INFO
lines that registering and unregistering write after their reply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Mapping

_SYSLOG = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
           logging.CRITICAL: 2}
TARGETS = ("console", "console-prefixed", "kmsg", "journal", "journal-or-kmsg", "syslog",
           "syslog-or-kmsg", "auto", "null")  # 252's log targets (LogTarget, $SYSTEMD_LOG_TARGET)
JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "systemd-machined"
# sd-messages.h: what 252 logs when a machine starts and when it goes
MACHINE_START = "24d8d4452573402496068381a6312df2"
MACHINE_STOP = "58432bd3bace477cb514b56381b8a758"


def journal_socket(stream: str, fd: int = 2, path: str = JOURNAL_SOCKET) -> socket.socket | None:
    """The journal's native socket, if fd is the journal stream JOURNAL_STREAM ("DEV:INODE")
    names (systemd's own test for logging to the journal), and the socket is there."""
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return None
    if (st.st_dev, st.st_ino) != (dev, ino):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def journal_entry(fields: Mapping[str, str]) -> bytes:
    """The journal's native format: KEY=value lines, or KEY, a 64-bit length and the value for
    values with a newline in them."""
    out = []
    for key, value in fields.items():
        data = value.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            out.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            out.append(key.encode() + b"=" + data + b"\n")
    return b"".join(out)


class LineHandler(logging.Handler):
    """Each record as one line, written with one write(). The logging module's StreamHandler
    and Formatter add a lock, a text layer, a flush and a few calls per line; the daemon logs a
    line per registration, and they cost it a noticeable share of its time."""

    def __init__(self, journal: bool, native: socket.socket | None = None) -> None:
        super().__init__()
        self.journal = journal
        self.native = native
        self.target = "auto"  # LogTarget: "null" drops, console targets keep to the stream
        self._set_prefix()
        os.register_at_fork(after_in_child=self._set_prefix)

    def _set_prefix(self) -> None:
        self.prefix = f"machined[{os.getpid()}]: "

    def handle(self, record: logging.LogRecord) -> bool:  # no filters; a line is one write()
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + _EXCEPTIONS.formatException(record.exc_info)
            if record.stack_info:
                text += "\n" + record.stack_info
            self.write(record.levelno, record.levelname, [text])
        except Exception:
            self.handleError(record)

    def write(self, levelno: int, levelname: str, texts: list[str],
              fields: list[Mapping[str, str] | None] | None = None) -> None:
        """texts as lines; fields, one per text, are the extra journal fields of each."""
        if self.target == "null":
            return
        if self.native is not None and not self.target.startswith("console"):
            texts = self._send(levelno, texts, fields or [None] * len(texts))
            if not texts:
                return
        head = f"<{_SYSLOG.get(levelno, 6)}>" if self.journal else f"{self.prefix}{levelname} "
        data = "".join([f"{head}{text}\n" for text in texts]).encode("utf-8", "backslashreplace")
        while data:
            data = data[os.write(2, data):]

    def _send(self, levelno: int, texts: list[str],
              fields: list[Mapping[str, str] | None]) -> list[str]:
        """Each text as a journal entry; what the socket refused (too large, journald away) is
        returned, to be written to the stream instead."""
        assert self.native is not None
        priority = str(_SYSLOG.get(levelno, 6))
        left = []
        for text, extra in zip(texts, fields, strict=True):
            entry = {"PRIORITY": priority, "SYSLOG_IDENTIFIER": IDENTIFIER, "MESSAGE": text,
                     **(extra or {})}
            try:
                self.native.send(journal_entry(entry))
            except OSError:
                left.append(text)
        return left


_EXCEPTIONS = logging.Formatter()
_direct: LineHandler | None = None  # the daemon's handler, when setup_logging() installed it


def setup_logging(level: str) -> None:
    global _direct
    from .bus.logcontrol import LEVELS

    # Per record, logging would also look up the caller's frame, thread and process pool: none
    # of it is printed (logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    stream = os.environ.get("JOURNAL_STREAM", "")
    _direct = LineHandler(journal=bool(stream), native=journal_socket(stream))
    _direct.target = target_from_environment()
    root.handlers[:] = [_direct]
    root.setLevel(LEVELS[level])


def target_from_environment() -> str:
    """$SYSTEMD_LOG_TARGET if it names one of 252's targets, else "auto" (252's default)."""
    target = os.environ.get("SYSTEMD_LOG_TARGET", "")
    return target if target in TARGETS else "auto"


def set_target(target: str) -> None:
    """LogTarget set on the bus: the daemon's handler follows it."""
    if _direct is not None:
        _direct.target = target


_pending: list[tuple[logging.Logger, str, Mapping[str, str] | None]] = []


def info_after_reply(logger: logging.Logger, msg: str, *args: object,
                     fields: Mapping[str, str] | None = None) -> None:
    """Log at INFO at the next turn of the event loop, after the reply of the call being handled
    has gone out: the caller need not wait for the line. With the daemon's own handler, the
    lines of one turn go out in one write() without LogRecords, which cost a registration more
    than the rest of its logging; `fields` go with the line into the journal."""
    if not logger.isEnabledFor(logging.INFO):
        return
    if not _pending:
        asyncio.get_running_loop().call_soon(_flush)
    _pending.append((logger, msg % args if args else msg, fields))


def _flush() -> None:
    lines = _pending[:]
    _pending.clear()
    handler = _direct
    if handler is None or logging.getLogger().handlers != [handler]:
        for logger, text, _fields in lines:
            logger.info("%s", text)
        return
    with contextlib.suppress(OSError):  # stderr gone: nothing to tell it to
        handler.write(logging.INFO, "INFO", [text for _, text, _ in lines],
                      [fields for _, _, fields in lines])
