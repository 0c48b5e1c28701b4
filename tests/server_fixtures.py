"""Fixtures that run the real `sira-server` as a subprocess on loopback.

The server gets its own database (migrated) and its own Redis database index,
so function-scoped fixtures that flush the test Redis never touch it. Tokens
are real HS256 JWTs signed with the secret the server is started with.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import jwt
import pytest
from fault_stores import RedisServer

from sira_server.store.migrate import apply_migrations
from sira_server.store.roles import as_role

TEST_JWT_SECRET = "sira-test-secret-" + "x" * 32
READY_LINE = re.compile(r"SIRA listening on (\S+)")
DASHBOARD_LINE = re.compile(r"dashboard:\s+(\S+)")
SERVER_REDIS_DB = int(os.environ.get("SIRA_TEST_SERVER_REDIS_DB", "14"))
"""Redis database of the session's server; test runs sharing one Redis at the same time
must each set their own (the fixture flushes it at start)."""


@dataclass
class RunningServer:
    address: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    http_url: str | None = None
    """The dashboard's base URL from the banner (`http://127.0.0.1:PORT`), None when off."""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def redis_url_with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return urlunsplit(parts._replace(query=f"db={db}"))
    return urlunsplit(parts._replace(path=f"/{db}"))


def database_url_named(server_dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(server_dsn)._replace(path=f"/{name}"))


@contextmanager
def run_sira_server(
    database_url: str,
    redis_url: str,
    data_dir: Path,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 90.0,
) -> Iterator[RunningServer]:
    """Start `python -m sira_server` and wait for its ready line."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"server-{uuid.uuid4().hex[:8]}.log"
    env = {
        **os.environ,
        "SIRA_DATABASE_URL": database_url,
        "SIRA_REDIS_URL": redis_url,
        "SIRA_GRPC_HOST": "127.0.0.1",
        "SIRA_GRPC_PORT": "0",
        "SIRA_METRICS_PORT": "0",
        # Any free port: test servers (and other test runs on the machine) never collide.
        "SIRA_HTTP_PORT": "0",
        "SIRA_JWT_SECRET": TEST_JWT_SECRET,
        "SIRA_DATA_DIR": str(data_dir),
        "SIRA_SHUTDOWN_GRACE_SECONDS": "2",
        # The suite's servers serve every test at full speed; test_abuse.py sets limits.
        "SIRA_RATE_LIMITS": ",".join(
            f"{role}=1000000/1000000/10000"
            for role in ("ops_admin", "marketing", "data_science", "anonymous")
        ),
        "SIRA_ADMIN_MAX_IN_FLIGHT": "0",
        **(extra_env or {}),
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "sira_server"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = RunningServer("", process, data_dir, log_path, env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            match = READY_LINE.search(server.log())
            if match:
                server.address = match.group(1)
                http = DASHBOARD_LINE.search(server.log())
                server.http_url = http.group(1).rstrip("/") if http else None
                break
            if process.poll() is not None:
                raise RuntimeError(f"sira-server exited early:\n{server.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sira-server not ready in {timeout}s:\n{server.log()}")
            time.sleep(0.05)
        yield server
    finally:
        server.stop()


async def create_migrated_database(server_dsn: str, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = database_url_named(server_dsn, name)
    await apply_migrations(url)
    return url


async def drop_database(server_dsn: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def sira_server_database_url(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_srv")
    yield url
    await drop_database(postgres_server_dsn, url)


@pytest.fixture(scope="session")
def server_redis_url() -> Iterator[str]:
    """A redis-server of this session's own for the `sira-server` subprocesses: the
    databases they use by number (the session server's, durability's...) are then
    never flushed by another test session sharing the machine's Redis."""
    data_dir = Path(tempfile.mkdtemp(prefix="sira-srv-redis-"))
    server = RedisServer(data_dir)
    server.start("--appendonly", "no")
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def sira_server(
    sira_server_database_url: str,
    server_redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningServer]:
    """One real server for the whole session (tests use unique experiment keys)."""
    redis_url = redis_url_with_db(server_redis_url, SERVER_REDIS_DB)
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    with run_sira_server(
        # As production runs it: the least-privileged role of migration 0003.
        as_role(sira_server_database_url),
        redis_url,
        tmp_path_factory.mktemp("sira-server"),
    ) as server:
        yield server


def mint_test_token(
    role: str | list[str],
    subject: str = "alice",
    *,
    ttl: float = 3600,
    secret: str = TEST_JWT_SECRET,
    **claims: object,
) -> str:
    now = int(time.time())
    roles = [role] if isinstance(role, str) else role
    payload = {"sub": subject, "roles": roles, "iat": now, "exp": now + int(ttl), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


@pytest.fixture(scope="session")
def token_for() -> Callable[..., str]:
    """`token_for("ops_admin", "alice")` -> a JWT the test server accepts."""
    return mint_test_token


@pytest.fixture
def unique_key() -> str:
    """A fresh experiment key, so tests sharing the session server never collide."""
    return f"t-{uuid.uuid4().hex[:12]}"
