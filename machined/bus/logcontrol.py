"""org.freedesktop.LogControl1 at /org/freedesktop/LogControl1 (LogLevel, LogTarget rw)."""

from __future__ import annotations

import logging
from typing import Any

from ..core.errors import InvalidArgs
from .objects import Interface, Property

PATH = "/org/freedesktop/LogControl1"
LEVELS = {
    "emerg": logging.CRITICAL, "alert": logging.CRITICAL, "crit": logging.CRITICAL,
    "err": logging.ERROR, "warning": logging.WARNING, "notice": logging.INFO,
    "info": logging.INFO, "debug": logging.DEBUG,
}
TARGETS = ("console", "kmsg", "journal", "syslog", "auto", "null")


class LogControl:
    def __init__(self, level: str = "info", target: str = "console") -> None:
        self.level = level
        self.target = target

    def set_level(self, value: Any) -> None:
        value = value[0] if isinstance(value, tuple) else value
        if value not in LEVELS:
            raise InvalidArgs(f"Invalid log level '{value}'")
        self.level = value
        logging.getLogger().setLevel(LEVELS[value])

    def set_target(self, value: Any) -> None:
        value = value[0] if isinstance(value, tuple) else value
        if value not in TARGETS:
            raise InvalidArgs(f"Invalid log target '{value}'")
        self.target = value

    def interface(self) -> Interface:
        return Interface(
            "org.freedesktop.LogControl1",
            properties=[
                Property("LogLevel", "s", lambda: self.level, setter=self.set_level),
                Property("LogTarget", "s", lambda: self.target, setter=self.set_target),
                Property("SyslogIdentifier", "s", lambda: "systemd-machined"),
            ],
        )
