"""Redis connection for the hot state (redis.asyncio with the hiredis parser)."""

from __future__ import annotations

import redis.asyncio as aioredis


def create_redis(url: str, *, max_connections: int = 64) -> aioredis.Redis:
    """A client whose pool is shared by every coroutine of this process.

    Blocking pool: a burst of more calls than connections waits for a free connection
    (up to `timeout`) instead of failing with MaxConnectionsError.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=5,
        socket_connect_timeout=2.0,
        health_check_interval=15,
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool
