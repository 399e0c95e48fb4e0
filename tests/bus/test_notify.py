"""sd_notify(3) as 252 sends it: READY=1 with its STATUS= once the name is taken, WATCHDOG=1
while $WATCHDOG_USEC asks for it, STOPPING=1 with its STATUS= on SIGTERM. The real 252 decides
the words, when it is installed."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, busctl
from tests.helpers.real252 import REAL_MACHINED, RealMachined, host_dirs

WATCHDOG = "WATCHDOG=1"


class Listener:
    """A datagram socket where the daemon's notifications arrive (abstract: `@name`)."""

    def __init__(self, where: Path | str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if isinstance(where, Path):
            self.address = str(where)
            self.sock.bind(self.address)
        else:
            self.address = where
            self.sock.bind("\0" + where[1:])

    def next(self, timeout: float = 15) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def until(self, last: str, timeout: float = 15) -> list[str]:
        """Every message up to and including `last`."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while not got or got[-1] != last:
            got.append(self.next(max(0.1, deadline - time.monotonic())))
        return got

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


READY = "READY=1\nSTATUS=Processing requests..."
STOPPING = "STOPPING=1\nSTATUS=Shutting down..."


def owned(bus: BusDaemon) -> bool:
    out = busctl(bus, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                 "org.freedesktop.DBus", "NameHasOwner", "s", "org.freedesktop.machine1")
    return out.stdout.strip() == "b true"


def life(listener: Listener, start: Callable[[dict[str, str]], Callable[[], int | None]]
         ) -> tuple[list[str], list[str], int | None]:
    """The notifications of a daemon's start (up to READY=1, then a watchdog ping) and of its
    stop (up to STOPPING=1), and its exit status."""
    stop = start({"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "2000000"})
    started = listener.until(READY)
    started.append(listener.next(5))  # the watchdog goes on pinging
    code = stop()
    return started, listener.until(STOPPING), code


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups)")
def test_notifications_as_252s(bus: BusDaemon, tmp_path: Path) -> None:
    def start_ours(env: dict[str, str]) -> Callable[[], int | None]:
        daemon = Machined(bus, "--scope-backend=cgroupfs", env=env)
        # ours takes the name before it says it is ready (252 asks for it asynchronously)
        assert owned(bus)
        return daemon.stop

    answers = {}
    with Listener(tmp_path / "ours") as listener:
        answers["ours"] = life(listener, start_ours)
    started, stopped, code = answers["ours"]
    assert code == 0
    assert [m for m in started if m != WATCHDOG] == [READY] and started[-1] == WATCHDOG
    assert stopped[-1] == STOPPING and set(stopped[:-1]) <= {WATCHDOG}
    if not Path(REAL_MACHINED).exists():
        return
    real_bus = BusDaemon("open")
    try:
        with host_dirs(), Listener(tmp_path / "real") as listener:
            def start_real(env: dict[str, str]) -> Callable[[], int | None]:
                real = RealMachined(real_bus, env=env)

                def stop() -> int | None:
                    real.stop()
                    return real.proc.returncode

                return stop

            answers["real"] = life(listener, start_real)
    finally:
        real_bus.stop()
    plain = {who: ([m for m in started if m != WATCHDOG], [m for m in stopped if m != WATCHDOG],
                   code)
             for who, (started, stopped, code) in answers.items()}
    assert plain["ours"] == plain["real"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups)")
def test_an_abstract_socket_and_a_watchdog_meant_for_another(bus: BusDaemon) -> None:
    with Listener(f"@machined-test-notify-{os.getpid()}") as sock:
        daemon = Machined(bus, "--scope-backend=cgroupfs",
                          env={"NOTIFY_SOCKET": sock.address, "WATCHDOG_USEC": "200000",
                               "WATCHDOG_PID": "1"})
        assert sock.next() == READY
        with pytest.raises(TimeoutError):  # WATCHDOG_PID names another process: no pings
            sock.next(0.5)
        assert daemon.stop() == 0
        assert sock.next() == STOPPING
