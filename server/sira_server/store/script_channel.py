"""One pipelined Redis connection for the hot path's script calls.

Every Assign and Track is one EVALSHA. Through redis-py each call also pays a pool
acquire and release, a retry wrapper and its own read coroutine: measured here, about
half of a Track's server time went to the Redis client, not to Redis. This channel
writes each command as soon as it is made (RESP over one socket) and a single reader
task hands the replies, which Redis sends in order, to the callers in order (hiredis
parses them). Many calls in flight share every socket read and write.

Failure model: error replies are raised as the exceptions redis-py raises for them
(`store.faults.parse_redis_error`). If the connection breaks, every call waiting on it
fails with `ChannelBroken` (the caller may retry: Assign is sticky and Track
idempotent) and the next call reconnects. A connection that sends nothing back for
`stall_seconds` while a call waits is dropped the same way (a frozen Redis), so a
wedged socket is never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from sira_server.config import StoreTimeouts
from sira_server.store.faults import parse_redis_error
from sira_server.store.lua_scripts import LuaScript

CONNECT_TIMEOUT_SECONDS = 2.0
READ_CHUNK = 1 << 16


class ChannelBroken(redis_errors.ConnectionError):
    """The connection broke (or stalled) under this call: its command may or may not
    have run."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str | None = None
    port: int = 6379
    path: str | None = None
    """Unix socket path (the embedded Redis)."""
    db: int = 0
    username: str | None = None
    password: str | None = None


def endpoint_of(client: aioredis.Redis) -> Endpoint | None:
    """Where `client` connects, or None when this channel cannot speak to it (TLS)."""
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    name = pool.connection_class.__name__
    if name == "UnixDomainSocketConnection":
        return Endpoint(
            path=kwargs["path"],
            db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
        )
    if name == "Connection":
        return Endpoint(
            host=kwargs.get("host", "localhost"),
            port=int(kwargs.get("port", 6379)),
            db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
        )
    return None


def encode(args: Sequence[Any]) -> bytes:
    """A RESP array of bulk strings, packed by hiredis in C (a tracked batch is one call
    of hundreds of arguments: a third of the time of packing them in Python)."""
    packed: bytes = hiredis.pack_command(tuple(args))
    return packed


class ScriptChannel:
    def __init__(
        self,
        endpoint: Endpoint,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        stall_seconds: float | None = None,
    ) -> None:
        """`stall_seconds`: a call that leaves (deadline, cancellation) after waiting
        this long with nothing read from the connection meanwhile drops it."""
        self._endpoint = endpoint
        self._connect_timeout = connect_timeout
        self._stall_seconds = stall_seconds
        self._writer: asyncio.StreamWriter | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._connecting = asyncio.Lock()
        self._last_read = 0.0

    async def call(self, *args: Any) -> Any:
        """Send one command; its reply. An error reply is raised as redis-py's exception
        for it (NoScriptError, BusyLoadingError, ResponseError...)."""
        (reply,) = await self.call_many((args,))
        if isinstance(reply, redis_errors.RedisError):
            raise reply
        return reply

    async def call_many(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send the commands in one write; their replies in order, an error reply as the
        exception redis-py raises for it (returned, not raised)."""
        started = time.monotonic()
        writer = self._writer
        if writer is None or writer.is_closing():
            writer = await self._connect()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in commands]
        self._waiting.extend(futures)
        writer.write(b"".join(encode(command) for command in commands))
        try:
            return [await future for future in futures]
        except asyncio.CancelledError:
            self._drop_if_stalled(writer, started)
            raise
        finally:
            for future in futures:  # all failed together: the others' errors are seen
                if future.done() and not future.cancelled():
                    future.exception()

    def _drop_if_stalled(self, writer: asyncio.StreamWriter, started: float) -> None:
        stall = self._stall_seconds
        if stall is None or writer is not self._writer or self._last_read >= started:
            return
        if time.monotonic() - started >= stall:
            self._fail_waiting(writer, ChannelBroken(f"redis sent nothing for {stall:g}s"))

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            e = self._endpoint
            try:
                async with asyncio.timeout(self._connect_timeout):
                    if e.path is not None:
                        reader, writer = await asyncio.open_unix_connection(e.path)
                    else:
                        reader, writer = await asyncio.open_connection(e.host, e.port)
                    parser = hiredis.Reader(replyError=parse_redis_error)
                    setup: list[tuple[Any, ...]] = []
                    if e.password:
                        setup.append(
                            ("AUTH", e.username, e.password) if e.username else ("AUTH", e.password)
                        )
                    if e.db:
                        setup.append(("SELECT", e.db))
                    for command in setup:
                        writer.write(encode(command))
                        reply = await _read_one(reader, parser)
                        if isinstance(reply, redis_errors.RedisError):
                            writer.close()
                            raise redis_errors.ConnectionError(
                                f"redis {command[0]} failed: {reply}"
                            )
            except TimeoutError as exc:
                raise redis_errors.ConnectionError("redis connect timed out") from exc
            except OSError as exc:
                raise redis_errors.ConnectionError(f"cannot connect to redis: {exc}") from exc
            self._writer = writer
            self._waiting = deque()  # replies of this connection only
            self._last_read = time.monotonic()
            task = asyncio.create_task(
                self._read(reader, writer, parser, self._waiting), name="redis-scripts"
            )
            self._readers.add(task)
            task.add_done_callback(self._readers.discard)
            return writer

    async def _read(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        parser: hiredis.Reader,
        waiting: deque[asyncio.Future[Any]],
    ) -> None:
        error: BaseException = ChannelBroken("redis closed the connection")
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                self._last_read = time.monotonic()
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    if not waiting:  # dropped (stalled) meanwhile: nobody to answer
                        raise hiredis.ProtocolError("a reply that no call waits for")
                    future = waiting.popleft()
                    if not future.done():
                        future.set_result(reply)
        except (OSError, hiredis.ProtocolError) as exc:
            error = ChannelBroken(f"redis connection lost: {exc}")
        finally:
            self._fail_waiting(writer, error)

    def _fail_waiting(self, writer: asyncio.StreamWriter, error: BaseException) -> None:
        """Close `writer`'s connection and fail the calls waiting on it (not those of a
        newer connection)."""
        writer.close()
        if self._writer is not writer:
            return
        self._writer = None
        waiting, self._waiting = self._waiting, deque()
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        tasks = list(self._readers)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _read_one(reader: asyncio.StreamReader, parser: hiredis.Reader) -> Any:
    while (reply := parser.gets()) is False:
        data = await reader.read(READ_CHUNK)
        if not data:
            raise redis_errors.ConnectionError("redis closed the connection")
        parser.feed(data)
    return reply


class ChannelTransport:
    """A `store.script_transport.ScriptTransport` over one `ScriptChannel` (single node,
    no TLS): every call of a run leaves in one write. A connection that broke under a
    run is replaced and the run retried once (Assign is sticky, Track idempotent)."""

    def __init__(self, redis: aioredis.Redis, channel: ScriptChannel) -> None:
        self.redis = redis
        """For SCRIPT LOAD after a NOSCRIPT reply."""
        self._channel = channel

    async def run(
        self, script: LuaScript, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        reloaded = retried = False
        while True:
            commands = [
                ("EVALSHA", script.sha, len(calls[i][0]), *calls[i][0], *calls[i][1]) for i in todo
            ]
            try:
                results = await self._channel.call_many(commands)
            except ChannelBroken:
                if retried:
                    raise
                retried = True  # a connection gone stale (Redis restarted): once more
                continue
            missing = []
            for index, result in zip(todo, results, strict=True):
                if isinstance(result, redis_errors.NoScriptError) and not reloaded:
                    missing.append(index)
                else:
                    replies[index] = result
            if not missing:
                return replies
            reloaded = True
            await script.load(self.redis)
            todo = missing

    async def aclose(self) -> None:
        await self._channel.close()


def channel_transport(redis: aioredis.Redis, timeouts: StoreTimeouts) -> ChannelTransport | None:
    """A channel to where `redis` connects; None when it cannot speak to it (TLS, a
    cluster client): the channel speaks plain TCP or a unix socket to one node."""
    endpoint = endpoint_of(redis)
    if endpoint is None:
        return None
    channel = ScriptChannel(
        endpoint,
        connect_timeout=timeouts.redis_seconds,
        # Half the deadline: a call leaving at its deadline with nothing read meanwhile
        # drops a frozen connection instead of queueing behind it.
        stall_seconds=timeouts.redis_seconds / 2,
    )
    return ChannelTransport(redis, channel)
