"""Long work in child processes, counted and capped (spec §9). The daemon's side only: which
child works for which machine, the cap, and killing them when their machine goes away or the
daemon stops. Forking and reaping is done by the caller (machined/linux)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from .errors import LimitsExceeded
from .machine import Machine

T = TypeVar("T")
MAX_OPERATIONS = 64


class Operations:
    def __init__(self, kill: Callable[[int], None], limit: int = MAX_OPERATIONS) -> None:
        self._kill = kill
        self.limit = limit
        self._running: dict[int, Machine | None] = {}  # child pid -> the machine it works on

    def __len__(self) -> int:
        return len(self._running)

    def check_capacity(self, message: str = "Too many ongoing operations.") -> None:
        if len(self._running) >= self.limit:
            raise LimitsExceeded(message)

    async def run(self, machine: Machine | None, pid: int, result: Awaitable[T]) -> T:
        """Count child pid as an operation (on machine) until result is there."""
        self._running[pid] = machine
        try:
            return await result
        finally:
            self._running.pop(pid, None)

    def machine_gone(self, machine: Machine) -> None:
        for pid, m in list(self._running.items()):
            if m is machine:
                self._kill(pid)

    def kill_all(self) -> None:
        for pid in list(self._running):
            self._kill(pid)
