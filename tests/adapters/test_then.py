"""``_speedups.Then`` and its Python twin: the handler's coroutine, then its ending.

Both implementations run every case: the adapter uses whichever was imported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ws_monitoring import core
from ws_monitoring.adapters import asyncio as adapter

IMPLEMENTATIONS = [pytest.param(adapter._then_python, id="python")]
if core.SPEEDUPS:
    IMPLEMENTATIONS.append(pytest.param(core._speedups.Then, id="c"))

Then = Callable[..., Awaitable[Any]]


class Tail:
    """A tail that records what it was given and then returns or re-raises."""

    def __init__(self, *, suspend: bool = True) -> None:
        self.calls: list[tuple[Any, BaseException | None]] = []
        self.finished = False
        self.suspend = suspend

    async def __call__(self, arg: Any, exc: BaseException | None) -> str:
        self.calls.append((arg, exc))
        try:
            if self.suspend:
                await asyncio.sleep(0)
            if exc is not None:
                raise exc
            return "ended"
        finally:
            self.finished = True


async def _returns() -> int:
    await asyncio.sleep(0)
    return 5


async def _raises() -> None:
    await asyncio.sleep(0)
    raise ValueError("boom")


@pytest.mark.parametrize("then", IMPLEMENTATIONS)
async def test_a_return_ends_with_the_tail_and_its_result(then: Then) -> None:
    tail = Tail()
    result = await then(_returns(), tail, "arg")
    assert tail.calls == [("arg", None)]
    assert result == "ended"


@pytest.mark.parametrize("then", IMPLEMENTATIONS)
async def test_an_exception_reaches_the_tail_with_its_traceback(then: Then) -> None:
    tail = Tail()
    with pytest.raises(ValueError, match="boom") as raised:
        await then(_raises(), tail, "arg")
    ((arg, exc),) = tail.calls
    assert arg == "arg"
    assert exc is raised.value
    frames = []
    tb = raised.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "_raises" in frames


@pytest.mark.parametrize("then", IMPLEMENTATIONS)
async def test_cancellation_reaches_the_tail(then: Then) -> None:
    tail = Tail()
    task = asyncio.ensure_future(then(asyncio.sleep(10), tail, 1))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert isinstance(tail.calls[0][1], asyncio.CancelledError)
    assert tail.finished


@pytest.mark.parametrize("then", IMPLEMENTATIONS)
async def test_a_handler_that_swallows_the_cancellation_ends_normally(then: Then) -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return

    tail = Tail()
    task = asyncio.ensure_future(then(stubborn(), tail, 1))
    await asyncio.sleep(0)
    task.cancel()
    await task
    assert tail.calls == [(1, None)]


@pytest.mark.parametrize("then", IMPLEMENTATIONS)
async def test_a_value_thrown_and_caught_keeps_awaiting(then: Then) -> None:
    async def catches() -> int:
        try:
            await asyncio.sleep(10)
        except KeyError:
            await asyncio.sleep(0)
        return 1

    tail = Tail(suspend=False)
    awaitable = then(catches(), tail, 1)
    iterator = awaitable.__await__()
    iterator.send(None)
    iterator.throw(KeyError("x"))  # caught: the handler awaits again
    assert tail.calls == []
    with pytest.raises(StopIteration):
        iterator.send(None)
    assert tail.calls == [(1, None)]


@pytest.mark.parametrize("then", IMPLEMENTATIONS)
async def test_closing_it_runs_the_tail_s_finally(then: Then) -> None:
    tail = Tail()
    awaitable = then(asyncio.sleep(10), tail, 1)
    iterator = awaitable.__await__()
    next(iterator)
    iterator.close()  # type: ignore[attr-defined]
    assert isinstance(tail.calls[0][1], GeneratorExit)
    assert tail.finished
    iterator.close()  # type: ignore[attr-defined]  # again: nothing to do


@pytest.mark.skipif(not core.SPEEDUPS, reason="the C type is not built here")
def test_the_c_type_rejects_misuse() -> None:
    then = core._speedups.Then
    with pytest.raises(TypeError, match="can't be used in 'await' expression"):
        then(42, Tail(), 1)
    with pytest.raises(TypeError, match="keyword"):
        then(_Ready(), Tail(), arg=1)
    with pytest.raises(TypeError):
        then(_Ready(), Tail())
    done = then(_returns(), Tail(suspend=False), 1)
    iterator = done.__await__()
    with pytest.raises(StopIteration):
        _drive(iterator)
    with pytest.raises(RuntimeError, match="cannot reuse"):
        iterator.send(None)
    with pytest.raises(ValueError):
        iterator.throw(ValueError("after the end"))
    # A tail that is not callable, or that returns no awaitable, is an error of the await.
    for tail in (None, lambda arg, exc: 42):
        with pytest.raises(TypeError):
            asyncio.run(_await(then(_returns(), tail, 1)))
    # Awaitables that are not coroutines are driven through __await__.
    assert asyncio.run(_await(then(_Ready(), Tail(suspend=False), 1))) == "ended"


class _Ready:
    def __await__(self) -> Any:
        return iter(())


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _drive(iterator: Any) -> None:
    while True:
        iterator.send(None)


def test_the_instrumented_handler_still_passes_for_a_coroutine_function() -> None:
    import inspect
    import sys

    import ws_monitoring
    from tests.helpers.servers import echo

    wrapped = ws_monitoring.instrument(echo)
    assert asyncio.iscoroutinefunction(wrapped)
    if sys.version_info >= (3, 12):  # inspect.markcoroutinefunction
        assert inspect.iscoroutinefunction(wrapped)
    assert wrapped.__wrapped__ is echo  # type: ignore[attr-defined]
