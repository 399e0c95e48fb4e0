"""The daemon's log lines: "machined[PID]: LEVEL text", or "<N>text" under journald."""

import logging
import os
from collections.abc import Iterator

import pytest

from machined.__main__ import _LineHandler


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
