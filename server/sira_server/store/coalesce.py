"""Coalescing: the calls that arrive together share one Redis round trip.

Under load, many Assign/Track calls for the same experiment are in flight at once;
each used to pay its own round trip (and, with `appendfsync always`, its own fsync).
A `Coalescer` collects the items submitted during one turn of the event loop (nothing
waits on a timer: the batch leaves as soon as the loop has run the callers that were
ready), groups them by key (the experiment: one hash slot, so the batch is one
pipeline even on Redis Cluster) and sends each group with one batch call. Each caller
gets its own result or exception back. Every script in the pipeline stays atomic on
its own, so the semantics are those of the calls made one by one, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")

SendBatch = Callable[[K, list[T]], Awaitable[list[R | BaseException]]]
"""Sends one group; one result per item, in order (an exception instance fails only
that item). Raising fails the whole group."""


class Coalescer(Generic[K, T, R]):
    def __init__(self, send_batch: SendBatch[K, T, R]) -> None:
        self._send_batch = send_batch
        self._pending: dict[K, list[tuple[T, asyncio.Future[R]]]] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, key: K, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.setdefault(key, []).append((item, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        groups, self._pending = self._pending, {}
        for key, entries in groups.items():
            task = asyncio.create_task(self._send(key, entries))
            self._tasks.add(task)  # a strong reference until it is done
            task.add_done_callback(self._tasks.discard)

    async def _send(self, key: K, entries: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._send_batch(key, [item for item, _ in entries])
        except BaseException as exc:  # the callers get it; the flush task must not die
            for _, future in entries:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(entries, results, strict=True):
            if future.done():  # the caller was cancelled meanwhile
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
