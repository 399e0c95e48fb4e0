"""Coroutines run at once up to their first wait, the rest in a Task (core.eager): the rest
must behave as if the Task had run it from the start."""

import asyncio
from typing import Any

import pytest

from machined.core import eager


def started(coro: Any) -> Any:
    finished, rest = eager.run_until_wait(coro)
    assert not finished
    return rest


async def test_result_after_waiting_for_a_future() -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps = []

    async def handler() -> int:
        steps.append("eager")
        value = await fut
        steps.append("resumed")
        return value + 1

    rest = started(handler())
    assert steps == ["eager"]
    task = asyncio.ensure_future(_await(rest))
    await asyncio.sleep(0)
    fut.set_result(41)
    assert await task == 42
    assert steps == ["eager", "resumed"]


async def test_several_waits_and_bare_yields() -> None:
    async def handler() -> str:
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        await asyncio.sleep(0)
        return "done"

    assert await _await(started(handler())) == "done"


async def test_exception_after_resuming() -> None:
    async def handler() -> None:
        await asyncio.sleep(0)
        raise ValueError("late")

    with pytest.raises(ValueError, match="late"):
        await _await(started(handler()))


async def test_exception_of_the_awaited_future_reaches_the_handler() -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handler() -> str:
        try:
            await fut
        except KeyError:
            return "caught"
        return "not caught"

    task = asyncio.ensure_future(_await(started(handler())))
    await asyncio.sleep(0)
    fut.set_exception(KeyError("x"))
    assert await task == "caught"


async def test_cancellation_reaches_the_handler() -> None:
    cleaned = []

    async def handler() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.append(True)

    task = asyncio.ensure_future(_await(started(handler())))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


def test_closing_closes_the_handler() -> None:
    cleaned = []
    loop = asyncio.new_event_loop()
    fut = loop.create_future()

    async def handler() -> None:
        try:
            await fut
        finally:
            cleaned.append(True)

    try:
        waiter = started(handler()).__await__()
        assert next(waiter) is fut
        waiter.close()
    finally:
        loop.close()
    assert cleaned == [True]


async def _await(awaitable: Any) -> Any:
    return await awaitable


async def test_run_until_wait_of_a_coroutine_that_never_waits() -> None:
    async def handler() -> int:
        return 7

    assert eager.run_until_wait(handler()) == (True, 7)


async def test_spawn_runs_at_once_or_in_a_task(caplog: pytest.LogCaptureFixture) -> None:
    tasks: set[asyncio.Task[Any]] = set()
    log = []

    async def quick() -> None:
        log.append("quick")

    async def slow() -> None:
        await asyncio.sleep(0)
        log.append("slow")

    async def failing() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    eager.spawn(quick(), tasks, "quick")
    assert log == ["quick"] and not tasks
    eager.spawn(slow(), tasks, "slow")
    eager.spawn(failing(), tasks, "failing thing")
    assert len(tasks) == 2
    await asyncio.gather(*tasks)
    assert log == ["quick", "slow"] and not tasks
    assert "failing thing failed" in caplog.text
