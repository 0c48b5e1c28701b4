"""Postgres connections: pools whose json/jsonb columns are Python objects."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from sira_server.errors import Unavailable

CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes TimeoutError
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
"""What a failed connect raises: refused/unreachable, timeout, auth, no such database."""


class PostgresUnreachable(Unavailable):
    """Postgres could not be reached; the message names the server, never the password."""


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database (URL-style DSNs only)."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


async def connect(dsn: str, *, connect_timeout: float = 10.0) -> asyncpg.Connection:
    """One connection (codecs registered), or PostgresUnreachable with the reason."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=connect_timeout)
    except CONNECT_ERRORS as exc:
        raise PostgresUnreachable(
            f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {exc or type(exc).__name__}"
        ) from exc
    await _init_connection(conn)
    return conn


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    server_settings: dict[str, str] | None = None,
    command_timeout: float | None = None,
    statement_cache_size: int = 100,
) -> asyncpg.Pool:
    """A pool whose connections decode json/jsonb to Python objects and back.

    `server_settings` are session settings (e.g. statement_timeout). `command_timeout`:
    the default deadline of every query (asyncpg raises TimeoutError, an OSError, which
    callers map to Unavailable); it also bounds the cancellation of a query on a stalled
    server. `statement_cache_size`: asyncpg's named prepared statements per connection
    (0 behind PgBouncer in transaction mode: `postgres_budget`)."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=min(min_size, max_size),
        max_size=max_size,
        init=_init_connection,
        server_settings=server_settings,
        command_timeout=command_timeout,
        statement_cache_size=statement_cache_size,
    )
    return pool


async def wait_for_postgres(dsn: str, max_wait: float = 30.0, interval: float = 0.25) -> None:
    """Return once Postgres accepts a connection; PostgresUnreachable after `max_wait` seconds."""
    deadline = time.monotonic() + max_wait
    while True:
        remaining = deadline - time.monotonic()
        try:
            conn = await connect(dsn, connect_timeout=max(0.5, min(5.0, remaining)))
        except PostgresUnreachable:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(interval)
        else:
            await conn.close()
            return


def _encode_jsonb(value: Any) -> bytes:
    # Binary jsonb is a version byte (1) then the JSON text; binary also serves COPY.
    return b"\x01" + json.dumps(value, separators=(",", ":")).encode()


def _decode_jsonb(data: bytes) -> Any:
    return json.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        format="binary",
    )
    await conn.set_type_codec(
        "json",
        schema="pg_catalog",
        encoder=lambda value: json.dumps(value, separators=(",", ":")).encode(),
        decoder=json.loads,
        format="binary",
    )
