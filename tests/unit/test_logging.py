"""The daemon's log lines: "machined[PID]: LEVEL text", or "<N>text" under journald."""

import logging
import os
from collections.abc import Iterator

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
