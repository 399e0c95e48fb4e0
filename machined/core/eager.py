"""Coroutines run at once up to their first real wait, as Python 3.12's eager tasks do.

Most of our coroutines never wait (a root caller, no systemd, nothing to ask polkit); run this
way they need no Task and no extra turn of the event loop, which is a good part of what a
registration costs in Python.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Generator
from typing import Any

log = logging.getLogger(__name__)


class Resumed:
    """The rest of a coroutine that has already run up to its first wait, which yielded
    `first`: awaiting this hands `first` to the Task and then drives the coroutine on."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self._coro, self._first
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:  # noqa: BLE001 - the coroutine decides (cancellation)
                try:
                    yielded = coro.throw(e)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as done:
                    return done.value


def run_until_wait(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """(True, result) if coro finished without waiting, else (False, the Resumed rest).
    An exception raised before the first wait propagates."""
    try:
        first = coro.send(None)
    except StopIteration as done:
        return True, done.value
    return False, Resumed(coro, first)


def spawn(coro: Coroutine[Any, Any, Any], tasks: set[asyncio.Task[Any]], what: str) -> None:
    """Fire and forget: run coro now, and in a Task (kept in `tasks`) if it has to wait.
    Failures are logged with `what`."""
    try:
        finished, rest = run_until_wait(coro)
    except Exception:
        log.exception("%s failed", what)
        return
    if not finished:
        keep_task(_logged(rest, what), tasks)


def keep_task(coro: Coroutine[Any, Any, Any], tasks: set[asyncio.Task[Any]]) -> None:
    """Run coro in a Task held in `tasks` until it ends: the event loop keeps only weak
    references to its tasks."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _logged(rest: Resumed, what: str) -> None:
    try:
        await rest
    except Exception:
        log.exception("%s failed", what)
