"""Redis connection for the hot state (redis.asyncio with the hiredis parser)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def create_redis(
    url: str,
    *,
    max_connections: int = 64,
    socket_timeout: float | None = 10.0,
    connect_timeout: float = 2.0,
) -> aioredis.Redis:
    """A client whose pool is shared by every coroutine of this process.

    Blocking pool: a burst of more calls than connections waits for a free connection
    (up to `timeout`) instead of failing with MaxConnectionsError.

    A pooled connection gone stale (Redis restarted; its close not seen yet) costs no
    caller a failure: a connection error is retried once, at once, on a new connection.
    Every command SIRA sends is safe to repeat (idempotent scripts, reads, SET NX,
    HSET of a rebuilt image); a timeout is never retried. `socket_timeout` bounds every
    read, so no wait on a frozen Redis is unbounded (requests have shorter deadlines).
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=5,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        health_check_interval=15,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)),
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool
