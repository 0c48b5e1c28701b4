"""The Lua scripts of ``store/lua/``, each run with EVALSHA (one atomic step per call)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sira_server.store.redis_conn import RedisClient

_LUA_DIR = Path(__file__).with_name("lua")


class LuaScript:
    """A script from ``store/lua/``, run with EVALSHA by a `store.script_transport`.

    Unlike redis-py's Script in a pipeline, that never adds a SCRIPT EXISTS round trip:
    the script is loaded only after a NOSCRIPT reply.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = (_LUA_DIR / name).read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def load(self, redis: RedisClient) -> None:
        await redis.script_load(self.source)


ASSIGN_SCRIPT = LuaScript("assign.lua")
TRACK_SCRIPT = LuaScript("track.lua")
LOCK_SCRIPT = LuaScript("lock.lua")
ACK_SCRIPT = LuaScript("ack.lua")
