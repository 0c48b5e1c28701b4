"""The Lua scripts of ``store/lua/``, each run with EVALSHA (one atomic step per call)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors

from sira_server.store.redis_conn import RedisClient
from sira_server.store.replica_wait import ReplicaWait, add_wait, check_wait

_LUA_DIR = Path(__file__).with_name("lua")


class LuaScript:
    """A script from ``store/lua/`` run with EVALSHA, reloaded on NOSCRIPT.

    Unlike redis-py's Script in a pipeline, this never adds a SCRIPT EXISTS
    round trip: the script is loaded only after a NOSCRIPT reply.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = (_LUA_DIR / name).read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def load(self, redis: RedisClient) -> None:
        await redis.script_load(self.source)

    async def call(self, redis: RedisClient, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            await self.load(redis)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)

    async def call_many(
        self,
        redis: RedisClient,
        calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
        wait: ReplicaWait | None = None,
    ) -> list[Any]:
        """Run every call in one pipelined round trip; replies in call order.

        A NOSCRIPT reply means that call did not run, so only those are re-run.
        `wait`: WAIT for replicas after the scripts, on their connection (the calls
        must share one slot, `store.replica_wait`); too few raise NOREPLICAS.
        """
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = redis.pipeline(transaction=False)
            for index in todo:
                keys, args = calls[index]
                # Not pipe.evalsha(): redis-py's cluster pipeline blocks that method
                # (an old list), while it routes the raw command by its keys' slot.
                pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
            if wait is not None:
                key = calls[todo[0]][0][0]
                node = add_wait(pipe, redis, key, wait)
            results = await pipe.execute(raise_on_error=False)
            if wait is not None:
                check_wait(results.pop(), redis, key, node, wait)
            missing = []
            for index, result in zip(todo, results, strict=True):
                if isinstance(result, redis_errors.NoScriptError) and attempt == 0:
                    missing.append(index)
                elif isinstance(result, Exception):
                    raise result
                else:
                    replies[index] = result
            if not missing:
                break
            await self.load(redis)
            todo = missing
        return replies


ASSIGN_SCRIPT = LuaScript("assign.lua")
TRACK_SCRIPT = LuaScript("track.lua")
LOCK_SCRIPT = LuaScript("lock.lua")
ACK_SCRIPT = LuaScript("ack.lua")
