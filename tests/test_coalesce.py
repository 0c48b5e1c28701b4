"""Calls submitted in the same event-loop turn share one batch per key."""

from __future__ import annotations

import asyncio

import pytest

from sira_server.store.coalesce import Coalescer


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[str, list[int]]] = []

    async def send(self, key: str, items: list[int]) -> list[int | BaseException]:
        self.batches.append((key, list(items)))
        await asyncio.sleep(0)
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_concurrent_calls_share_one_batch_per_key_in_order() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send)
    results = await asyncio.gather(
        coalescer.submit("a", 0),
        coalescer.submit("b", 2),
        coalescer.submit("a", 4),
        coalescer.submit("a", 6),
    )
    assert results == [0, 20, 40, 60]
    assert sorted(recorder.batches) == [("a", [0, 4, 6]), ("b", [2])]


async def test_an_item_error_fails_only_that_caller() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send)
    results = await asyncio.gather(
        coalescer.submit("a", 2), coalescer.submit("a", 3), return_exceptions=True
    )
    assert results[0] == 20
    assert isinstance(results[1], ValueError)
    assert len(recorder.batches) == 1


async def test_a_failed_batch_fails_every_caller_of_it_and_later_batches_work() -> None:
    calls = 0

    async def send(key: str, items: list[int]) -> list[int | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("redis down")
        return list(items)

    coalescer: Coalescer[str, int, int] = Coalescer(send)
    first = await asyncio.gather(
        coalescer.submit("a", 1), coalescer.submit("a", 2), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionError) for r in first)
    assert await coalescer.submit("a", 3) == 3


async def test_sequential_calls_each_get_their_own_batch() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send)
    assert await coalescer.submit("a", 2) == 20
    assert await coalescer.submit("a", 4) == 40
    assert recorder.batches == [("a", [2]), ("a", [4])]


async def test_a_cancelled_caller_does_not_break_the_batch() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send)
    doomed = asyncio.ensure_future(coalescer.submit("a", 2))
    kept = asyncio.ensure_future(coalescer.submit("a", 4))
    await asyncio.sleep(0)
    doomed.cancel()
    assert await kept == 40
    with pytest.raises(asyncio.CancelledError):
        await doomed
