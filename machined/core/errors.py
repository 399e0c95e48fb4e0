"""Failures a client can see. Each maps to one D-Bus error name in machined/bus/errors.py."""

from __future__ import annotations

import errno as _errno
import os


class MachinedError(Exception):
    """Base class: `message` is what the client reads."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgs(MachinedError):
    pass


class NotSupported(MachinedError):
    pass


class AccessDenied(MachinedError):
    pass


class InteractiveAuthorizationRequired(MachinedError):
    def __init__(self) -> None:
        super().__init__("Interactive authentication required.")


class LimitsExceeded(MachinedError):
    pass


class NoSuchMachine(MachinedError):
    def __init__(self, name: str) -> None:
        super().__init__(f"No machine '{name}' known")


class NoSuchImage(MachinedError):
    def __init__(self, name: str) -> None:
        super().__init__(f"No image '{name}' known")


class NoMachineForPID(MachinedError):
    def __init__(self, pid: int) -> None:
        super().__init__(f"PID {pid} does not belong to any known machine")


class MachineExists(MachinedError):
    def __init__(self, name: str) -> None:
        super().__init__(f"Machine '{name}' already exists")


class UnknownObject(MachinedError):
    """An object that went away between sd-bus finding it and its handler running."""

    def __init__(self, path: str) -> None:
        super().__init__(f"Unknown object '{path}'.")


class JobFailed(MachinedError):
    def __init__(self, unit: str, result: str) -> None:
        super().__init__(f"Start job for unit {unit} failed with '{result}'")


class ErrnoError(MachinedError):
    """A bare errno, as sd-bus turns a negative return value into an error.

    The message defaults to strerror(); callers may give their own text (machined's "...: %m").
    """

    def __init__(self, err: int, message: str | None = None) -> None:
        super().__init__(message if message is not None else os.strerror(err))
        self.errno = err

    @classmethod
    def from_oserror(cls, exc: OSError, prefix: str | None = None) -> ErrnoError:
        err = exc.errno if exc.errno is not None else _errno.EIO
        text = os.strerror(err)
        return cls(err, f"{prefix}: {text}" if prefix else text)


class RemoteError(MachinedError):
    """An error another service (systemd1, polkit) replied with; passed on unchanged."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class Failed(MachinedError):
    """org.freedesktop.DBus.Error.Failed with a message of machined's own."""


class NoPrivateNetworking(MachinedError):
    def __init__(self, name: str) -> None:
        super().__init__(f"Machine {name} does not use private networking")


class NoSuchUserMapping(MachinedError):
    pass


class NoSuchGroupMapping(MachinedError):
    pass


CHILD_DIED = "Child died abnormally."
