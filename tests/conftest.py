"""Fixtures shared by the whole suite: real PostgreSQL and Redis, never mocks.

Servers (session scope), first match wins:
  1. SIRA_TEST_DATABASE_URL / SIRA_TEST_REDIS_URL;
  2. the local servers on 127.0.0.1 (Postgres db `test`; Redis db 13, flushed,
     so a developer's db 0 is never touched);
  3. embedded servers (sira_server.embedded) in a temporary directory.

Databases: migrations are applied once per session to a template database;
each test that asks for `database_url` gets its own copy (CREATE DATABASE ...
TEMPLATE), dropped afterwards. Redis: `redis_url` flushes the test db first.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis_cluster import LocalRedisCluster, cluster_binaries_missing

from sira_server.embedded import EmbeddedPostgres, EmbeddedRedis
from sira_server.store.hot_state import HotState
from sira_server.store.migrate import apply_migrations
from sira_server.store.postgres import create_pool, with_database
from sira_server.store.script_transport import TRANSPORTS, default_transport

LOCAL_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/13"
PROBE_TIMEOUT_SECONDS = 2.0


# --- servers ------------------------------------------------------------------------


async def _postgres_answers(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=PROBE_TIMEOUT_SECONDS)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await conn.close()
    return True


async def _redis_answers(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT_SECONDS)
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS * 2):
            await client.ping()
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()
    return True


@pytest.fixture(scope="session")
def embedded_dir() -> Iterator[Path]:
    """Data directory for embedded servers, made only when no real ones are reachable.

    Not under pytest's basetemp: every pytest session resets `pytest-of-<user>`
    to mode 0700, which (as root) locks out the `pgserver` system user that
    Postgres runs as, and concurrent sessions would break each other.
    """
    base = Path(tempfile.mkdtemp(prefix="sira-test-"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
async def postgres_server_dsn(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """DSN of a Postgres server where tests may create and drop databases."""
    configured = os.environ.get("SIRA_TEST_DATABASE_URL")
    if configured:
        yield configured
    elif await _postgres_answers(LOCAL_POSTGRES_DSN):
        yield LOCAL_POSTGRES_DSN
    else:
        server = EmbeddedPostgres(request.getfixturevalue("embedded_dir"), database="postgres")
        try:
            yield server.start()
        finally:
            server.stop()


@pytest.fixture(scope="session")
async def redis_server_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """URL of the Redis database reserved for tests (flushed at session start)."""
    configured = os.environ.get("SIRA_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    if await _redis_answers(LOCAL_REDIS_URL):
        await _flush_redis(LOCAL_REDIS_URL)
        yield LOCAL_REDIS_URL
        return
    server = EmbeddedRedis(request.getfixturevalue("embedded_dir"))
    try:
        yield server.start()
    finally:
        server.stop()


# --- databases ----------------------------------------------------------------------


def _database_name(dsn: str) -> str:
    name = urlsplit(dsn).path.lstrip("/")
    assert name, f"DSN without a database name: {dsn}"
    return name


async def _create_database(server_dsn: str, prefix: str, template: str | None = None) -> str:
    """Create a uniquely named database; return its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_dsn)
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await conn.close()
    return with_database(server_dsn, name)


async def _drop_database(server_dsn: str, dsn: str) -> None:
    """Drop it, first ending any session a test left open on it."""
    name = _database_name(dsn)
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def template_database(postgres_server_dsn: str) -> AsyncIterator[str]:
    """Name of a database holding every migration, copied for each test."""
    dsn = await _create_database(postgres_server_dsn, "sira_tmpl")
    try:
        await apply_migrations(dsn)
        yield _database_name(dsn)
    finally:
        await _drop_database(postgres_server_dsn, dsn)


@pytest.fixture
async def database_url(postgres_server_dsn: str, template_database: str) -> AsyncIterator[str]:
    """DSN of a fresh, fully migrated database of this test's own."""
    dsn = await _create_database(postgres_server_dsn, "sira_test", template=template_database)
    try:
        yield dsn
    finally:
        await _drop_database(postgres_server_dsn, dsn)


@pytest.fixture
async def migrated_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """sira_server.store.postgres pool (jsonb as Python objects) on `database_url`."""
    pool = await create_pool(database_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        try:
            await asyncio.wait_for(pool.close(), timeout=10.0)
        except TimeoutError:
            pool.terminate()


@pytest.fixture
async def fresh_database_dsn(postgres_server_dsn: str) -> AsyncIterator[str]:
    """DSN of an empty database (no migrations applied), dropped after the test."""
    dsn = await _create_database(postgres_server_dsn, "sira_empty")
    try:
        yield dsn
    finally:
        await _drop_database(postgres_server_dsn, dsn)


# --- redis --------------------------------------------------------------------------


async def _flush_redis(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


@pytest.fixture
async def redis_url(redis_server_url: str) -> str:
    """URL of the test Redis database, emptied before this test."""
    await _flush_redis(redis_server_url)
    return redis_server_url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A redis.asyncio client (bytes in, bytes out) on the emptied test database. Its pool
    waits for a free connection instead of failing when many calls are in flight."""
    pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=64, timeout=30)
    client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=TRANSPORTS)
async def hot(
    request: pytest.FixtureRequest, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> AsyncIterator[HotState]:
    """The hot state over the test Redis and a fresh migrated database, once per script
    transport (`store.script_transport`; the first is production's default)."""
    hot = HotState(redis, migrated_pool, transport=default_transport(redis, request.param))
    try:
        yield hot
    finally:
        await hot.close()


# The lead's gRPC-server fixtures, once that module exists.
if os.path.exists(os.path.join(os.path.dirname(__file__), "server_fixtures.py")):
    pytest_plugins = ["server_fixtures"]


# --- redis cluster ------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A real local Redis Cluster (3 masters + 3 replicas, free ports), for the session.

    Skipped, with the reason, where `redis-server` / `redis-cli` are not installed.
    Tests that kill a master restart it (it rejoins as a replica), so the cluster
    stays 3 + 3, in whatever layout the failovers left.
    """
    missing = cluster_binaries_missing()
    if missing is not None:
        pytest.skip(missing)
    directory = Path(tempfile.mkdtemp(prefix="sira-cluster-"))
    cluster = LocalRedisCluster(directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
