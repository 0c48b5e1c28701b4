"""`AsyncClient`: `sira.Client` over grpc.aio, with the same methods as coroutines.

Behaviour (deadlines, token, typed errors, retries) is described in
`sira.client`; requests come from `sira._requests`, like the sync client's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import grpc

from sira import _requests as rq
from sira._requests import Call, Pages
from sira._transport import (
    ClientBase,
    as_method,
)

__all__ = ["AsyncClient"]

P = ParamSpec("P")
T = TypeVar("T")


def _unary(
    build: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """An `AsyncClient` coroutine that builds the Call with `build` and sends it."""

    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._send(build(*args, **kwargs))

    return as_method(method, build, "AsyncClient")


def _paged(
    build: Callable[P, Pages[T]],
) -> Callable[Concatenate[AsyncClient, P], AsyncIterator[T]]:
    """An `AsyncClient` method that yields every item of the listing `build` describes."""

    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        page_at = build(*args, **kwargs)
        token: str | None = ""
        while token is not None:
            items, next_token = await self._send(page_at(token))
            for item in items:
                yield item
            token = next_token or None

    return as_method(method, build, "AsyncClient")


class AsyncClient(ClientBase):
    """grpc.aio client with the same methods as `Client`, as coroutines.

    >>> async with AsyncClient("localhost:50051", token=token) as sira:
    ...     decision = await sira.assign("checkout-button-color", "user-123")
    """

    _grpc = grpc.aio

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _send(self, call: Call[T]) -> T:
        rpc = call.rpc(self._stubs)
        attempts = self._settings.attempts(call)
        while True:
            try:
                return call.result(await rpc(call.request, **self._settings.options(call)))
            except grpc.RpcError as exc:
                pause = attempts.failed(exc)
            await asyncio.sleep(pause)

    # LifecycleService
    create_experiment = _unary(rq.create_experiment)
    get_experiment = _unary(rq.get_experiment)
    list_experiments = _unary(rq.list_experiments)
    iter_experiments = _paged(rq.iter_experiments)
    update_experiment = _unary(rq.update_experiment)
    start_experiment = _unary(rq.start_experiment)
    stop_experiment = _unary(rq.stop_experiment)
    archive_experiment = _unary(rq.archive_experiment)
    archive_stale_experiments = _unary(rq.archive_stale_experiments)
    delete_experiment = _unary(rq.delete_experiment)
    list_audit_events = _unary(rq.list_audit_events)
    iter_audit_events = _paged(rq.iter_audit_events)

    # AssignmentService
    assign = _unary(rq.assign)
    assign_all = _unary(rq.assign_all)

    # TrackingService
    track = _unary(rq.track)
    track_batch = _unary(rq.track_batch)

    # InsightsService
    get_results = _unary(rq.get_results)
    get_insights = _unary(rq.get_insights)
