"""Redis connection for the hot state (redis.asyncio with the hiredis parser)."""

from __future__ import annotations

import redis.asyncio as aioredis


def create_redis(url: str, *, max_connections: int = 64) -> aioredis.Redis:
    """A client whose pool is shared by every coroutine of this process."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        max_connections=max_connections,
        socket_connect_timeout=2.0,
        health_check_interval=15,
    )
