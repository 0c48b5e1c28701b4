"""How the Lua scripts reach Redis: one small injectable interface, as httpx's transports.

A `ScriptTransport` runs one or many EVALSHA calls of one script in one round trip and
answers per call: the script's reply, or the exception redis-py raises for that call's
error reply (redis-py's classes, parsed by redis-py's parser). A NOSCRIPT reply means the
call did not run: the transport loads the script and re-runs only those calls, once. A
failure of the round trip itself (connection lost, refused) is raised and fails every
call of it.

Transports only move bytes: what a Redis failure *means* is decided in one place,
`run_scripts` with `store.faults` (Unavailable with ``store=redis``, or a bug), whatever
the transport. Production's transport is chosen once, in `default_transport`:

- `ChannelTransport` (`store.script_channel`): the calls written on one pipelined
  connection; the cheapest per call (measured: docs/design.md, "Scripts"), one node only;
- `PipelineTransport`: redis-py's pipeline and nothing else, so it works unchanged with
  `redis.asyncio.cluster.RedisCluster` (its pipeline routes each EVALSHA by the slot of
  its keys, and every key of one call carries the experiment's hash tag ``{exp:<id>}``),
  and can end a round trip with ``WAIT`` for replicas (`store.replica_wait`): TLS, Redis
  Cluster, SIRA_REDIS_WAIT_REPLICAS, and the background scripts (rebuild lock, flusher
  ack).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from sira_server.config import StoreTimeouts
from sira_server.store.faults import domain_error, redis_call
from sira_server.store.lua_scripts import LuaScript
from sira_server.store.redis_conn import RedisClient
from sira_server.store.replica_wait import ReplicaWait, add_wait, check_wait

ScriptCall = tuple[Sequence[str], Sequence[Any]]
"""The keys and arguments of one EVALSHA."""


class ScriptTransport(Protocol):
    async def run(self, script: LuaScript, calls: Sequence[ScriptCall]) -> list[Any]:
        """One reply per call, in order: the script's reply, or the `RedisError` its
        error reply stands for. Raises when the round trip itself failed."""
        ...

    async def aclose(self) -> None:
        """Release what the transport holds (not the redis client it was given)."""
        ...


class PipelineTransport:
    """redis-py: a single call is one EVALSHA, several are one non-transactional
    pipeline (also a `RedisCluster` pipeline, split per node by redis-py).

    `replica_wait`: every round trip is a pipeline ending with ``WAIT`` on the node that
    ran the scripts (`store.replica_wait`; the calls of one run share a slot: HotState
    runs one experiment's calls together). Too few replicas confirming in time: each call
    that ran answers NOREPLICAS (`store.faults`: UNAVAILABLE; Assign is sticky and Track
    idempotent, so the caller's retry is safe)."""

    def __init__(self, redis: RedisClient, replica_wait: ReplicaWait | None = None) -> None:
        self.redis = redis
        self.replica_wait = replica_wait

    async def run(self, script: LuaScript, calls: Sequence[ScriptCall]) -> list[Any]:
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            results = await self._send(script, [calls[index] for index in todo])
            missing = []
            for index, result in zip(todo, results, strict=True):
                if isinstance(result, redis_errors.NoScriptError) and attempt == 0:
                    missing.append(index)
                else:
                    replies[index] = result
            if not missing:
                break
            await script.load(self.redis)
            todo = missing
        return replies

    async def _send(self, script: LuaScript, calls: Sequence[ScriptCall]) -> list[Any]:
        wait = self.replica_wait
        if len(calls) == 1 and wait is None:  # no pipeline object for the common idle case
            keys, args = calls[0]
            try:
                return [await self.redis.evalsha(script.sha, len(keys), *keys, *args)]
            except redis_errors.ResponseError as exc:  # an error reply: this call's answer
                return [exc]
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in calls:
            # Not pipe.evalsha(): redis-py's cluster pipeline blocks that method (an old
            # list), while it routes the raw command by its keys' slot.
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        if wait is None:
            return list(await pipe.execute(raise_on_error=False))
        key = calls[0][0][0]
        node = add_wait(pipe, self.redis, key, wait)
        results = list(await pipe.execute(raise_on_error=False))
        try:
            check_wait(results.pop(), self.redis, key, node, wait)
        except redis_errors.RedisError as refused:  # ran, but not acknowledged
            return [result if isinstance(result, Exception) else refused for result in results]
        return results

    async def aclose(self) -> None:
        return None


TRANSPORTS = ("channel", "pipeline")
"""`SIRA_SCRIPT_TRANSPORT` values, production's default first."""


def default_transport(
    redis: RedisClient,
    kind: str = "channel",
    timeouts: StoreTimeouts | None = None,
    replica_wait: ReplicaWait | None = None,
) -> ScriptTransport:
    """Production's transport, chosen here only: the script channel wherever it can speak
    to Redis (one node, plain TCP or a unix socket) and no WAIT is asked, redis-py's
    pipelines otherwise (TLS, Redis Cluster, `replica_wait`) or when `kind` is
    ``pipeline``. Why the channel: docs/design.md, "Scripts"."""
    if kind not in TRANSPORTS:
        raise ValueError(f"unknown script transport {kind!r}; one of {', '.join(TRANSPORTS)}")
    if kind == "channel" and replica_wait is None and isinstance(redis, aioredis.Redis):
        from sira_server.store.script_channel import channel_transport

        channel = channel_transport(redis, timeouts or StoreTimeouts())
        if channel is not None:
            return channel
    return PipelineTransport(redis, replica_wait)


async def run_scripts(
    transport: ScriptTransport,
    script: LuaScript,
    calls: Sequence[ScriptCall],
    seconds: float | None = None,
) -> list[Any]:
    """`transport.run` with every Redis failure mapped by `store.faults`: a failed round
    trip (or one past `seconds`) raises Unavailable; a call's error reply becomes that
    call's domain error (Unavailable, or the RedisError of a bug) in its place."""
    async with redis_call(seconds):
        replies = await transport.run(script, calls)
    return [domain_error(reply) if isinstance(reply, BaseException) else reply for reply in replies]


async def run_script(
    transport: ScriptTransport,
    script: LuaScript,
    keys: Sequence[str],
    args: Sequence[Any],
    seconds: float | None = None,
) -> Any:
    """One call through `run_scripts`; its domain error raised."""
    (reply,) = await run_scripts(transport, script, [(keys, args)], seconds)
    if isinstance(reply, BaseException):
        raise reply
    return reply
