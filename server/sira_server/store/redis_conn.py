"""Redis connection for the hot state (redis.asyncio with the hiredis parser): one
server, or a Redis Cluster through redis-py's cluster client."""

from __future__ import annotations

from typing import TypeAlias

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

RedisClient: TypeAlias = aioredis.Redis | RedisCluster
"""What every Redis user of the server takes: the same commands, pipelines and
scripts work on both (each script's keys share one slot, `store.hot_keys`)."""


def create_redis(
    url: str,
    *,
    cluster: bool = False,
    max_connections: int = 64,
    socket_timeout: float | None = 10.0,
    connect_timeout: float = 2.0,
) -> RedisClient:
    """A client whose pool is shared by every coroutine of this process.

    Blocking pool: a burst of more calls than connections waits for a free connection
    (up to `timeout`) instead of failing with MaxConnectionsError.

    A pooled connection gone stale (Redis restarted; its close not seen yet) costs no
    caller a failure: a connection error is retried once, at once, on a new connection.
    Every command SIRA sends is safe to repeat (idempotent scripts, reads, SET NX,
    HSET of a rebuilt image); a timeout is never retried. `socket_timeout` bounds every
    read, so no wait on a frozen Redis is unbounded (requests have shorter deadlines).

    `cluster`: `url` names any node of a Redis Cluster; redis-py discovers the others,
    routes each command by slot, follows MOVED/ASK and rediscovers the topology after a
    failover; a pipeline is split into one per node. `max_connections` is per node.
    """
    if cluster:
        return RedisCluster.from_url(
            url,
            max_connections=max_connections,
            socket_connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            health_check_interval=15,
            # One immediate retry, as on one server; after a failover redis-py
            # reloads the slot map before it.
            retry=Retry(NoBackoff(), 1),
        )
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
