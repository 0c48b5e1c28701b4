"""The hot path's pipelined script channel against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from sira_server.store.script_channel import ScriptChannel, encode, endpoint_of
from sira_server.store.script_transport import PipelineTransport, default_transport

ECHO_SCRIPT = "return {ARGV[1], redis.call('INCR', KEYS[1])}"


@pytest.fixture
async def channel(redis: aioredis.Redis) -> AsyncIterator[ScriptChannel]:
    endpoint = endpoint_of(redis)
    assert endpoint is not None
    chan = ScriptChannel(endpoint)
    try:
        yield chan
    finally:
        await chan.close()


def test_encode_is_resp() -> None:
    assert encode(["SET", "k", b"v\r\n", 5]) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$1\r\n5\r\n"
    )


async def test_many_concurrent_calls_each_get_their_own_reply(
    redis: aioredis.Redis, channel: ScriptChannel
) -> None:
    sha = await redis.script_load(ECHO_SCRIPT)
    replies = await asyncio.gather(
        *(channel.call("EVALSHA", sha, 1, "{t}:n", f"caller-{i}") for i in range(500))
    )
    assert [r[0] for r in replies] == [f"caller-{i}".encode() for i in range(500)]
    assert sorted(r[1] for r in replies) == list(range(1, 501))


async def test_an_error_reply_is_raised_to_its_caller_only(channel: ScriptChannel) -> None:
    results = await asyncio.gather(
        channel.call("EVALSHA", "0" * 40, 0),
        channel.call("PING"),
        return_exceptions=True,
    )
    assert isinstance(results[0], redis_errors.NoScriptError)  # redis-py's own class
    assert results[1] == b"PONG"


async def test_a_killed_connection_fails_the_calls_in_flight_and_the_next_call_reconnects(
    redis: aioredis.Redis, channel: ScriptChannel
) -> None:
    client_id = await channel.call("CLIENT", "ID")
    in_flight = asyncio.ensure_future(channel.call("BLPOP", "{t}:never", 5))
    for _ in range(100):  # until Redis shows the call blocked (bounded: 1 s)
        clients = await redis.client_list()
        if any(c.get("id") == str(client_id) and c.get("cmd") == "blpop" for c in clients):
            break
        await asyncio.sleep(0.01)
    # Only this connection: other tests' servers share the Redis server.
    assert await redis.client_kill_filter(_id=client_id) == 1
    with pytest.raises(redis_errors.ConnectionError):
        await in_flight
    assert await channel.call("PING") == b"PONG"


async def test_it_selects_the_clients_database(
    redis: aioredis.Redis, channel: ScriptChannel
) -> None:
    await redis.set("{t}:db-probe", "here")
    assert await channel.call("GET", "{t}:db-probe") == b"here"


def test_a_cluster_client_gets_redis_py_pipelines() -> None:
    """The channel speaks to one node; a RedisCluster client (never connected here) gets
    the pipeline transport, whose pipelines route each call by its slot."""
    cluster = RedisCluster(host="127.0.0.1", port=7000)
    transport = default_transport(cluster)
    assert isinstance(transport, PipelineTransport)
    assert transport.redis is cluster
