"""Store faults as domain errors, and deadlines on store waits: one map for every path.

Every Redis reply error and connection failure, whichever path it took (a script
transport, `store.script_transport`, or a plain redis-py command), is classified here
with redis-py's own error classes (`parse_redis_error` is the parser redis-py itself
uses), by `domain_error` (one call's error reply) and `redis_call` (a block of waits):

- the store cannot serve now (connection lost or refused, a wait past its deadline,
  ``LOADING``, ``BUSY``, ``TRYAGAIN``, ``CLUSTERDOWN``, ``MASTERDOWN``, ``READONLY``,
  ``MISCONF``, ``OOM``, ``NOREPLICAS``, ``NOSCRIPT`` after a reload, WAIT refused by a
  master just demoted, a cluster slot without a master or a cluster with no reachable
  node): `Unavailable` with metadata ``store=redis``, the caller retries (Assign is
  sticky and Track idempotent, so a retry is safe); so is redis-py's leak of a closed
  connection as AttributeError (`is_closed_writer_race`);
- anything else (a script error, a wrong type) is a bug and stays a `RedisError`,
  reported as INTERNAL with the real cause logged.

`bounded` puts a deadline on a wait whose clean-up may itself hang on a stalled store
(asyncpg cancels a query with a request to the server, and returning the connection
to the pool waits for it): the caller gets its answer at the deadline, the clean-up
finishes in the background.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser  # redis-py's reply-error parser (stable since 4.x)

from sira_server.errors import Unavailable

T = TypeVar("T")

REDIS_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # also LOADING (BusyLoadingError), pool exhausted, auth
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # READONLY: a replica, failover in progress
    redis_errors.ClusterDownError,  # CLUSTERDOWN, MASTERDOWN
    redis_errors.TryAgainError,  # TRYAGAIN: slot migration
    redis_errors.AskError,  # MOVED/ASK left over once redis-py gave up following them
    redis_errors.OutOfMemoryError,  # OOM: maxmemory reached, writes refused
    redis_errors.SlotNotCoveredError,  # a cluster slot without a master (failover)
    redis_errors.ClusterError,  # "TTL exhausted": redirections kept failing (failover)
    # NOSCRIPT that outlived the transport's load-and-retry: a master promoted a moment
    # ago (replicas keep no script cache) that the client's view did not have yet.
    redis_errors.NoScriptError,
    OSError,  # refused, reset, unreachable; TimeoutError (a deadline here) is one too
)
"""Failures that mean "this store cannot answer now", whatever their path."""

REDIS_UNAVAILABLE_CODES = frozenset({"BUSY", "MISCONF", "NOREPLICAS"})
"""Reply codes redis-py's parser leaves as a plain ResponseError that still mean "not
now": a long script is running, persistence failing, too few replicas."""


def parse_redis_error(message: str) -> redis_errors.RedisError:
    """A Redis error reply as the exception redis-py itself raises for it."""
    error: redis_errors.RedisError = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return error


_CLUSTER_UNREACHABLE = (
    "Redis Cluster cannot be connected",
    "startup_nodes could not agree",
    "All slots are not covered",
)
"""How redis-py's cluster client words "no usable view of the cluster now" (its
RedisClusterException, not a RedisError, also reports misuse: that stays a bug)."""


def is_redis_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, REDIS_UNAVAILABLE_ERRORS) or is_closed_writer_race(exc):
        return True
    if isinstance(exc, redis_errors.RedisClusterException):
        return str(exc).startswith(_CLUSTER_UNREACHABLE)
    if not isinstance(exc, redis_errors.ResponseError):
        return False
    text = _reply_text(exc)
    return text.split(" ", 1)[0] in REDIS_UNAVAILABLE_CODES or text.startswith(_WAIT_ON_REPLICA)


_WAIT_ON_REPLICA = "WAIT cannot be used with replica instances"
"""The reply to `SIRA_REDIS_WAIT_REPLICAS`'s WAIT on a master demoted to a replica since
the connection chose it (a failover): the scripts before it were refused (READONLY) or
ran before the demotion, unconfirmed either way: not now, retry."""

_PIPELINE_PREFIX = "of pipeline caused error: "


def _reply_text(exc: redis_errors.ResponseError) -> str:
    """The reply, also once redis-py prefixed it with the failed command of a pipeline
    ("Command # 1 (...) of pipeline caused error: ('BUSY ...',)")."""
    text = str(exc)
    _, found, rest = text.partition(_PIPELINE_PREFIX)
    if found:
        text = rest.lstrip("('\"")
    return text


def is_closed_writer_race(exc: BaseException) -> bool:
    """redis-py 8.1 lets a write on a connection closed under it (a peer reset; the
    cluster client dropping a node's connections after a failover) escape as the
    transport's AttributeError/TypeError instead of ConnectionError (redis/redis-py
    #4287, #3546); on uvloop, as its RuntimeError "unable to perform operation on
    <TCPTransport closed=True ...>; the handler is closed". Only that: raised inside
    redis-py's asyncio connection module."""
    if isinstance(exc, RuntimeError):
        if not str(exc).endswith(_UVLOOP_CLOSED_HANDLE):
            return False
    elif not isinstance(exc, AttributeError | TypeError):
        return False
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename.endswith(_REDIS_CONNECTION_MODULE):
            return True
        frame = frame.tb_next
    return False


_REDIS_CONNECTION_MODULE = "/redis/asyncio/connection.py"
_UVLOOP_CLOSED_HANDLE = "the handler is closed"


def redis_unavailable(exc: BaseException) -> Unavailable:
    detail = str(exc) or type(exc).__name__
    return Unavailable(
        f"the hot state store (Redis) is unavailable: {detail[:200]}",
        metadata={"store": "redis"},
    )


def domain_error(exc: BaseException) -> BaseException:
    """What a Redis failure means: Unavailable (``store=redis``) when the store may
    recover, else `exc` itself (a bug, reported as INTERNAL)."""
    if is_closed_writer_race(exc):  # redis-py's own words would say nothing useful
        return redis_unavailable(redis_errors.ConnectionError("connection closed"))
    if is_redis_unavailable(exc):
        return redis_unavailable(exc)
    return exc


@asynccontextmanager
async def redis_call(seconds: float | None = None) -> AsyncIterator[None]:
    """The Redis waits inside take at most `seconds` (None: no deadline here); a
    failure the store may recover from becomes Unavailable (`is_redis_unavailable`)."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise redis_unavailable(
            redis_errors.TimeoutError(f"no answer within {seconds:g}s")
        ) from exc
    except (
        redis_errors.RedisError,
        redis_errors.RedisClusterException,
        OSError,
        AttributeError,  # these three: redis-py's closed-writer race, else a bug
        TypeError,
        RuntimeError,
    ) as exc:
        mapped = domain_error(exc)
        if mapped is exc:
            raise
        raise mapped from exc


_background: set[asyncio.Future[Any]] = set()


async def bounded(work: Awaitable[T], seconds: float | None, store: str) -> T:
    """`await work`, but the caller waits at most `seconds`: past that it gets
    Unavailable (metadata ``store``) while `work` is cancelled and cleans up on its own."""
    if seconds is None:
        return await work
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.wait_for(asyncio.shield(task), seconds)
    except TimeoutError as exc:
        if task.done() and not task.cancelled() and task.exception() is exc:
            raise  # the work itself timed out (its own deadline): not ours to rename
        raise Unavailable(
            f"{store} did not answer within {seconds:g}s; retry",
            metadata={"store": store.lower()},
        ) from exc
    finally:
        if not task.done():
            task.cancel()
            _background.add(task)  # a strong reference until its clean-up is over
            task.add_done_callback(_forget)


def _forget(task: asyncio.Future[Any]) -> None:
    _background.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: the caller was answered already
