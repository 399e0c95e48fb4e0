"""The sd-login contract (§7.5), checked with libsystemd itself through ctypes: what the daemon
writes to /run/systemd/machines must read back through sd_get_machine_names,
sd_machine_get_class, sd_machine_get_ifindices and sd_pid_get_machine_name."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
from collections.abc import Iterator

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, wait_for

from .support import Processes, mcall, register_machine, unique_name

c_char_pp = ctypes.POINTER(ctypes.c_char_p)


class SdLogin:
    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libsystemd.so.0", use_errno=True)
        except OSError:
            pytest.skip("libsystemd.so.0 is not available")
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self.libc.free.argtypes = [ctypes.c_void_p]
        self.libc.free.restype = None
        lib = self.lib
        lib.sd_get_machine_names.argtypes = [ctypes.POINTER(ctypes.POINTER(ctypes.c_void_p))]
        lib.sd_machine_get_class.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.sd_machine_get_ifindices.argtypes = [ctypes.c_char_p,
                                                 ctypes.POINTER(ctypes.POINTER(ctypes.c_int))]
        lib.sd_pid_get_machine_name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
        lib.sd_login_monitor_new.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.sd_login_monitor_get_fd.argtypes = [ctypes.c_void_p]
        lib.sd_login_monitor_unref.argtypes = [ctypes.c_void_p]
        lib.sd_login_monitor_unref.restype = ctypes.c_void_p
        for f in ("sd_get_machine_names", "sd_machine_get_class", "sd_machine_get_ifindices",
                  "sd_pid_get_machine_name", "sd_login_monitor_new", "sd_login_monitor_get_fd"):
            getattr(lib, f).restype = ctypes.c_int

    def _string(self, ptr: ctypes.c_void_p) -> str:
        try:
            return ctypes.string_at(ptr.value).decode()
        finally:
            self.libc.free(ptr)

    def machine_names(self) -> list[str]:
        arr = ctypes.POINTER(ctypes.c_void_p)()
        n = self.lib.sd_get_machine_names(ctypes.byref(arr))
        assert n >= 0, os.strerror(-n)
        names = []
        if arr:
            for i in range(n):
                names.append(ctypes.string_at(arr[i]).decode())
                self.libc.free(arr[i])
            self.libc.free(ctypes.cast(arr, ctypes.c_void_p))
        return names

    def machine_class(self, name: str) -> str | int:
        out = ctypes.c_void_p()
        r = self.lib.sd_machine_get_class(name.encode(), ctypes.byref(out))
        return r if r < 0 else self._string(out)

    def machine_ifindices(self, name: str) -> list[int] | int:
        arr = ctypes.POINTER(ctypes.c_int)()
        r = self.lib.sd_machine_get_ifindices(name.encode(), ctypes.byref(arr))
        if r < 0:
            return r
        try:
            return [arr[i] for i in range(r)]
        finally:
            if arr:
                self.libc.free(ctypes.cast(arr, ctypes.c_void_p))

    def pid_machine_name(self, pid: int) -> str | int:
        out = ctypes.c_void_p()
        r = self.lib.sd_pid_get_machine_name(pid, ctypes.byref(out))
        return r if r < 0 else self._string(out)

    @contextlib.contextmanager
    def login_monitor(self) -> Iterator[int]:
        """An sd_login_monitor for "machine"; gives its fd."""
        mon = ctypes.c_void_p()
        r = self.lib.sd_login_monitor_new(b"machine", ctypes.byref(mon))
        assert r >= 0, os.strerror(-r)
        try:
            yield self.lib.sd_login_monitor_get_fd(mon)
        finally:
            self.lib.sd_login_monitor_unref(mon)


@pytest.fixture(scope="module")
def sd() -> SdLogin:
    return SdLogin()


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_sd_login_sees_registered_machine(bus: BusDaemon, machined: Machined,
                                          procs: Processes, sd: SdLogin) -> None:
    name = unique_name("sdl")
    leader = procs.sleeper()
    assert name not in sd.machine_names()
    assert sd.machine_class(name) == -errno.ENXIO

    # inotify users (sd_login_monitor) see the state file appear
    with sd.login_monitor() as fd:
        assert not readable(fd, 0)
        register_machine(bus, name, leader.pid, netif=[1, 7])
        assert readable(fd, 2), "sd_login_monitor did not wake up for the new machine"

    names = sd.machine_names()
    assert name in names
    assert ".host" not in names
    assert sd.machine_class(name) == "container"
    assert sd.machine_class(".host") == "host"
    assert sd.machine_ifindices(name) == [1, 7]
    assert sd.pid_machine_name(leader.pid) == name
    assert sd.pid_machine_name(os.getpid()) == -errno.ENODATA

    # and see it go
    with sd.login_monitor() as fd:
        mcall(bus, "TerminateMachine", "s", name)
        assert readable(fd, 3), "sd_login_monitor did not wake up for the removal"
    wait_for(lambda: name not in sd.machine_names(), 3, what="sd-login to forget the machine")
    assert sd.machine_class(name) == -errno.ENXIO
    assert sd.machine_ifindices(name) == -errno.ENXIO


def test_sd_login_machine_without_netif(bus: BusDaemon, machined: Machined, procs: Processes,
                                        sd: SdLogin) -> None:
    name = unique_name("sdn")
    leader = procs.sleeper()
    register_machine(bus, name, leader.pid, cls="vm")
    assert sd.machine_class(name) == "vm"
    assert sd.machine_ifindices(name) == []
    assert sd.pid_machine_name(leader.pid) == name
