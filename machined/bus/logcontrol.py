"""org.freedesktop.LogControl1 at /org/freedesktop/LogControl1 (LogLevel, LogTarget rw)."""

from __future__ import annotations

import logging
from typing import Any

from .. import logs
from ..core.errors import InvalidArgs
from ..logs import TARGETS
from .objects import Interface, Property

PATH = "/org/freedesktop/LogControl1"
LEVELS = {
    "emerg": logging.CRITICAL, "alert": logging.CRITICAL, "crit": logging.CRITICAL,
    "err": logging.ERROR, "warning": logging.WARNING, "notice": logging.INFO,
    "info": logging.INFO, "debug": logging.DEBUG,
}


# syslog's numbers, which 252 takes for a level too ("7" is debug)
_BY_NUMBER = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")


def level_name(value: str) -> str:
    """The level a LogLevel value names (252's log_level_from_string()), or InvalidArgs."""
    if value in LEVELS:
        return value
    if value.isdigit() and int(value) < len(_BY_NUMBER):
        return _BY_NUMBER[int(value)]
    raise InvalidArgs(f"Invalid log level '{value}'")


def check_target(value: str) -> None:
    if value not in TARGETS:
        raise InvalidArgs(f"Invalid log target '{value}'")


class LogControl:
    def __init__(self, level: str = "info", target: str | None = None) -> None:
        self.level = level
        # as 252: "auto" unless $SYSTEMD_LOG_TARGET names another
        self.target = target or logs.target_from_environment()

    def set_level(self, value: Any) -> None:
        self.level = level_name(value[0] if isinstance(value, tuple) else value)
        logging.getLogger().setLevel(LEVELS[self.level])

    def set_target(self, value: Any) -> None:
        value = value[0] if isinstance(value, tuple) else value
        check_target(value)
        self.target = value
        logs.set_target(value)

    def interface(self) -> Interface:
        return Interface(
            "org.freedesktop.LogControl1",
            properties=[
                Property("LogLevel", "s", lambda: self.level, setter=self.set_level,
                         check=level_name),
                Property("LogTarget", "s", lambda: self.target, setter=self.set_target,
                         check=check_target),
                Property("SyslogIdentifier", "s", lambda: logs.IDENTIFIER),
            ],
        )
