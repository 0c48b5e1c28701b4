"""Hand-written clients over the generated stubs: `Client` (sync) and `AsyncClient`.

Both have the same methods, one per RPC of the four services, and the same
behaviour:

- every call gets a deadline (`timeout`, 5 s by default, per attempt);
- the bearer token goes in the `authorization: Bearer <token>` metadata;
- failures raise the typed errors of `sira.errors` (never a bare RpcError);
- UNAVAILABLE is retried with exponential backoff and full jitter
  (`RetryPolicy`, 3 attempts by default), but only where a second attempt
  cannot do something twice:

  * always: reads (get/list/audit/results/insights), `assign`/`assign_all`
    (the first decision is sticky, so a replay returns it), `track` and
    `track_batch` (the client fills an empty `client_event_id` with a uuid4
    before the first attempt, so the server dedupes a replay), and
    `archive_stale_experiments` (archiving what is already archived is a no-op);
  * only when the server itself answered UNAVAILABLE with reason
    ERROR_REASON_STORE_UNAVAILABLE (its transaction was not committed):
    create, update, start, stop, archive and delete. A connection lost after
    the request was sent may have applied it, and a replay would then fail
    with ALREADY_EXISTS / FAILED_PRECONDITION / NOT_FOUND, so those surface
    to the caller instead.
- any call the server shed under load (RESOURCE_EXHAUSTED, ERROR_REASON_RATE_LIMITED,
  with a RetryInfo no longer than `RetryPolicy.max_backoff`) is retried after the
  delay it names: the server refused it before doing anything. Longer delays (a
  caller over its rate, a subject over its cap) raise `ResourceExhaustedError`
  with `retry_after` set.

Each request is built once, in `sira._requests`; this module and `sira.aio`
only send it (blocking or awaited) and sleep between attempts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Concatenate, ParamSpec, Self, TypeVar

import grpc

from sira import _requests as rq
from sira._requests import (
    Call,
    Pages,
    event_type_value,
    experiment_status_value,
    subject_context,
    tracked_event,
)
from sira._transport import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    ClientBase,
    RetryPolicy,
    as_method,
)
from sira.aio import AsyncClient

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "Client",
    "RetryPolicy",
    "event_type_value",
    "experiment_status_value",
    "subject_context",
    "tracked_event",
]

P = ParamSpec("P")
T = TypeVar("T")


def _unary(build: Callable[P, Call[T]]) -> Callable[Concatenate[Client, P], T]:
    """A `Client` method that builds the Call with `build` and sends it."""

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._send(build(*args, **kwargs))

    return as_method(method, build, "Client")


def _paged(build: Callable[P, Pages[T]]) -> Callable[Concatenate[Client, P], Iterator[T]]:
    """A `Client` method that yields every item of the listing `build` describes."""

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        page_at = build(*args, **kwargs)
        token: str | None = ""
        while token is not None:
            items, next_token = self._send(page_at(token))
            yield from items
            token = next_token or None

    return as_method(method, build, "Client")


class Client(ClientBase):
    """Blocking client. Use as a context manager or call `close()`.

    >>> with Client("localhost:50051", token=token) as sira:
    ...     decision = sira.assign("checkout-button-color", "user-123")
    """

    _grpc = grpc

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _send(self, call: Call[T]) -> T:
        rpc = call.rpc(self._stubs)
        attempts = self._settings.attempts(call)
        while True:
            try:
                return call.result(rpc(call.request, **self._settings.options(call)))
            except grpc.RpcError as exc:
                pause = attempts.failed(exc)
            time.sleep(pause)

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
