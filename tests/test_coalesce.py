"""Calls that arrive while a batch is on the wire leave together as the next batch."""

from __future__ import annotations

import asyncio

import pytest

from sira_server.store.coalesce import Coalescer


async def settle() -> None:
    """Let every ready task run (submitters, then the batch senders they started)."""
    for _ in range(5):
        await asyncio.sleep(0)


class Recorder:
    """A batch sender that records its batches and can hold the wire busy."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def send(self, key: str, items: list[int]) -> list[int | BaseException]:
        self.batches.append((key, list(items)))
        await self.gate.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_an_idle_call_leaves_at_once_alone() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send)
    assert await coalescer.submit("a", 2) == 20
    assert await coalescer.submit("a", 4) == 40
    assert recorder.batches == [("a", [2]), ("a", [4])]


async def test_calls_arriving_during_a_batch_form_the_next_one_per_key_in_order() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send, max_in_flight=1)
    first = asyncio.ensure_future(coalescer.submit("a", 0))
    await settle()  # batch [0] is on the wire
    rest = [
        asyncio.ensure_future(coalescer.submit(k, i)) for k, i in (("a", 2), ("b", 8), ("a", 4))
    ]
    await settle()
    recorder.gate.set()
    assert await first == 0
    assert [await r for r in rest] == [20, 80, 40]
    assert recorder.batches == [("a", [0]), ("b", [8]), ("a", [2, 4])]


async def test_at_most_max_in_flight_batches_per_key() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send, max_in_flight=2)
    calls = [asyncio.ensure_future(coalescer.submit("a", i)) for i in (0, 2, 4, 6)]
    await settle()
    assert recorder.batches == [("a", [0]), ("a", [2])]
    recorder.gate.set()
    assert [await c for c in calls] == [0, 20, 40, 60]
    assert recorder.batches[2:] == [("a", [4, 6])]


async def test_an_item_error_fails_only_that_caller() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send, max_in_flight=1)
    calls = [asyncio.ensure_future(coalescer.submit("a", i)) for i in (0, 2, 3)]
    await settle()
    recorder.gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[:2] == [0, 20]
    assert isinstance(results[2], ValueError)


async def test_a_failed_batch_fails_its_callers_and_the_next_batch_still_goes() -> None:
    sent: list[list[int]] = []

    async def send(key: str, items: list[int]) -> list[int | BaseException]:
        sent.append(items)
        await asyncio.sleep(0)
        if len(sent) == 1:
            raise ConnectionError("redis down")
        return list(items)

    coalescer: Coalescer[str, int, int] = Coalescer(send, max_in_flight=1)
    calls = [asyncio.ensure_future(coalescer.submit("a", i)) for i in (1, 2, 3)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[0], ConnectionError)
    assert results[1:] == [2, 3]
    assert sent == [[1], [2, 3]]


async def test_a_cancelled_caller_does_not_break_the_batch() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send, max_in_flight=1)
    doomed = asyncio.ensure_future(coalescer.submit("a", 2))
    kept = asyncio.ensure_future(coalescer.submit("a", 4))
    await asyncio.sleep(0)
    doomed.cancel()
    recorder.gate.set()
    assert await kept == 40
    with pytest.raises(asyncio.CancelledError):
        await doomed


async def test_a_group_shares_a_batch_with_single_calls_and_gets_its_results_in_order() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send, max_in_flight=1)
    first = asyncio.ensure_future(coalescer.submit("a", 0))
    await settle()  # batch [0] is on the wire
    before = asyncio.ensure_future(coalescer.submit("a", 2))
    await settle()  # queued behind it
    group = coalescer.enqueue("a", [4, 5, 6])
    after = asyncio.ensure_future(coalescer.submit("a", 8))
    await settle()
    recorder.gate.set()
    assert (await first, await before, await after) == (0, 20, 80)
    four, five, six = await group  # an item's error is its result, not the group's
    assert (four, six) == (40, 60)
    assert isinstance(five, ValueError)
    assert recorder.batches == [("a", [0]), ("a", [2, 4, 5, 6, 8])]


async def test_a_failed_batch_fails_a_group_as_a_whole() -> None:
    async def send(key: str, items: list[int]) -> list[int | BaseException]:
        raise ConnectionError("redis down")

    coalescer: Coalescer[str, int, int] = Coalescer(send)
    with pytest.raises(ConnectionError):
        await coalescer.enqueue("a", [1, 2])


async def test_a_sender_that_loses_results_fails_the_batch_instead_of_hanging_it() -> None:
    async def send(key: str, items: list[int]) -> list[int | BaseException]:
        return list(items[:-1])

    coalescer: Coalescer[str, int, int] = Coalescer(send)
    with pytest.raises(RuntimeError, match="2 results for a batch of 3"):
        await coalescer.enqueue("a", [1, 2, 3])
