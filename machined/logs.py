"""The daemon's log lines: one line per record on stderr, "machined[PID]: LEVEL text", or
"<N>text" under journald (which turns N into the priority); and the INFO lines that registering
and unregistering write after their reply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

_SYSLOG = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
           logging.CRITICAL: 2}


class LineHandler(logging.Handler):
    """Each record as one line, written with one write(). The logging module's StreamHandler
    and Formatter add a lock, a text layer, a flush and a few calls per line; the daemon logs a
    line per registration, and they cost it a noticeable share of its time."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal
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

    def write(self, levelno: int, levelname: str, texts: list[str]) -> None:
        head = f"<{_SYSLOG.get(levelno, 6)}>" if self.journal else f"{self.prefix}{levelname} "
        data = "".join([f"{head}{text}\n" for text in texts]).encode("utf-8", "backslashreplace")
        while data:
            data = data[os.write(2, data):]


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
    _direct = LineHandler(journal=bool(os.environ.get("JOURNAL_STREAM")))
    root.handlers[:] = [_direct]
    root.setLevel(LEVELS[level])


_pending: list[tuple[logging.Logger, str]] = []


def info_after_reply(logger: logging.Logger, msg: str, *args: object) -> None:
    """Log at INFO at the next turn of the event loop, after the reply of the call being handled
    has gone out: the caller need not wait for the line. With the daemon's own handler, the
    lines of one turn go out in one write() without LogRecords, which cost a registration more
    than the rest of its logging."""
    if not logger.isEnabledFor(logging.INFO):
        return
    if not _pending:
        asyncio.get_running_loop().call_soon(_flush)
    _pending.append((logger, msg % args if args else msg))


def _flush() -> None:
    lines = _pending[:]
    _pending.clear()
    handler = _direct
    if handler is None or logging.getLogger().handlers != [handler]:
        for logger, text in lines:
            logger.info("%s", text)
        return
    with contextlib.suppress(OSError):  # stderr gone: nothing to tell it to
        handler.write(logging.INFO, "INFO", [text for _, text in lines])
