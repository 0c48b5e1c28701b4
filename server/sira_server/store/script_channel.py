"""One pipelined Redis connection for the hot path's script calls.

Every Assign and Track is one EVALSHA. Through redis-py each call also pays a pool
acquire and release, a retry wrapper and its own read coroutine: measured here, about
half of a Track's server time went to the Redis client, not to Redis. This channel
writes each command as soon as it is made (RESP over one socket) and a single reader
task hands the replies, which Redis sends in order, to the callers in order (hiredis
parses them). Many calls in flight share every socket read and write.

Failure model: if the connection breaks, every call waiting on it fails with
ConnectionError (the caller maps it to UNAVAILABLE; Assign is sticky and Track is
idempotent, so a retry is safe) and the next call reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import redis.asyncio as aioredis

CONNECT_TIMEOUT_SECONDS = 2.0
READ_CHUNK = 1 << 16


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
    """A RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class ScriptChannel:
    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._connecting = asyncio.Lock()

    async def call(self, *args: Any) -> Any:
        """Send one command; its reply (a hiredis.ReplyError is raised)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            writer = await self._connect()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        writer.write(encode(args))
        reply = await future
        if isinstance(reply, hiredis.ReplyError):
            raise reply
        return reply

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            e = self._endpoint
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                    if e.path is not None:
                        reader, writer = await asyncio.open_unix_connection(e.path)
                    else:
                        reader, writer = await asyncio.open_connection(e.host, e.port)
                    parser = hiredis.Reader()
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
                        if isinstance(reply, hiredis.ReplyError):
                            writer.close()
                            raise ConnectionError(f"redis {command[0]} failed: {reply}")
            except TimeoutError as exc:
                raise ConnectionError("redis connect timed out") from exc
            self._writer = writer
            self._reader_task = asyncio.create_task(
                self._read(reader, parser), name="redis-scripts"
            )
            return writer

    async def _read(self, reader: asyncio.StreamReader, parser: hiredis.Reader) -> None:
        error: BaseException = ConnectionError("redis closed the connection")
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future = self._waiting.popleft()
                    if not future.done():
                        future.set_result(reply)
        except (OSError, hiredis.ProtocolError) as exc:
            error = ConnectionError(f"redis connection lost: {exc}")
        finally:
            self._fail_waiting(error)

    def _fail_waiting(self, error: BaseException) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        task, self._reader_task = self._reader_task, None
        if self._writer is not None:
            self._writer.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _read_one(reader: asyncio.StreamReader, parser: hiredis.Reader) -> Any:
    while (reply := parser.gets()) is False:
        data = await reader.read(READ_CHUNK)
        if not data:
            raise ConnectionError("redis closed the connection")
        parser.feed(data)
    return reply
