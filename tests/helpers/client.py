"""A test's own sdbus connection to a private bus, and calls whose outcome is plain data;
the same from a child process that may run as another user (RawClient)."""

from __future__ import annotations

import ast
import ctypes
import os
import subprocess
import sys
from typing import Any

from sdbus import sd_bus_internals
from sdbus.sd_bus_internals import SdBus, SdBusBaseError, SdBusMessage, sd_bus_open_system

from machined.bus import libsdbus
from machined.bus.client import remote_error

from .busdaemon import REPO, BusDaemon

# The names on the bus, for every test.
DEST = "org.freedesktop.machine1"
MANAGER_PATH = "/org/freedesktop/machine1"
MANAGER = "org.freedesktop.machine1.Manager"
MACHINE = "org.freedesktop.machine1.Machine"
IMAGE = "org.freedesktop.machine1.Image"
PROPERTIES = "org.freedesktop.DBus.Properties"


def connect(bus: BusDaemon, timeout_usec: int = 20_000_000) -> SdBus:
    """A connection to `bus`; a hang shows as a Timeout error after `timeout_usec`."""
    old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
    try:
        conn: SdBus = sd_bus_open_system()
    finally:
        if old is None:
            del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old
    conn.method_call_timeout_usec = timeout_usec
    return conn


def outcome(conn: SdBus, path: str, iface: str, member: str, sig: str = "",
            *args: Any, dest: str = DEST) -> tuple[str, Any]:
    """("ok", the reply's contents) or ("error", (name, message))."""
    msg = conn.new_method_call_message(dest, path, iface, member)
    if sig:
        msg.append_data(sig, *args)
    try:
        reply = conn.call(msg)
    except SdBusBaseError as e:
        err = remote_error(e)
        return "error", (err.name, err.message)
    return "ok", reply.parse_to_tuple()


class RawClient:
    """tests/helpers/rawclient.py as a child process, optionally as another user."""

    def __init__(self, bus: BusDaemon, user: str | None = None) -> None:
        cmd = [sys.executable, "-m", "tests.helpers.rawclient"]
        if user:
            group = "nogroup" if user == "nobody" else user
            cmd = ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", *cmd]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=bus.env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def call(self, path: str, iface: str, member: str, sig: str = "", args: tuple[Any, ...] = (),
             dest: str = DEST) -> tuple[Any, ...]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(repr((dest, path, iface, member, sig, tuple(args))) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the raw client died")
        answer: tuple[Any, ...] = ast.literal_eval(line)
        return answer

    def manager(self, member: str, sig: str = "", *args: Any) -> tuple[Any, ...]:
        return self.call(MANAGER_PATH, MANAGER, member, sig, args)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def set_destination(msg: SdBusMessage, destination: str) -> None:
    """Address a signal to one connection: sdbus has no setter for it, sd-bus's own here."""
    setter = ctypes.CDLL(sd_bus_internals.__file__).sd_bus_message_set_destination
    setter.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    assert setter(libsdbus.message_pointer(msg), destination.encode()) >= 0
