"""Embedded Postgres and Redis: real servers, data kept across restarts and crashes."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil  # type: ignore[import-untyped]
import pytest
import redis.asyncio as aioredis

from sira_server.embedded import EmbeddedPostgres, EmbeddedServerError, EmbeddedServers
from sira_server.store.migrate import apply_migrations, default_migrations_dir, discover_migrations
from sira_server.store.postgres import create_pool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    """One data directory for the module: initdb runs once, every test restarts on it."""
    base = Path(tempfile.mkdtemp(prefix="sira-embedded-"))  # see conftest.embedded_dir
    yield base / "data"
    shutil.rmtree(base, ignore_errors=True)


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _pids(data_dir: Path) -> list[int]:
    """The postmaster and redis-server pids the data directory records."""
    postmaster = (data_dir / "postgres" / "postmaster.pid").read_text().split("\n", 1)[0]
    redis_pid = (data_dir / "redis" / "redis.pid").read_text().strip()
    return [int(postmaster), int(redis_pid)]


def _wait_exited(pids: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(psutil.pid_exists(pid) and _alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.05)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def _write(database_url: str, redis_url: str, marker: str) -> None:
    pool = await create_pool(database_url)
    try:
        await pool.execute(
            "INSERT INTO experiment_audit_logs (actor, action, details) VALUES ('t', $1, $2)",
            marker,
            {"marker": marker},
        )
    finally:
        await pool.close()
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(f"marker:{marker}", "1")
        await client.xadd("sira:test-stream", {"marker": marker})
    finally:
        await client.aclose()


async def _assert_present(database_url: str, redis_url: str, marker: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        details = await conn.fetchval(
            "SELECT details::text FROM experiment_audit_logs WHERE action = $1", marker
        )
    finally:
        await conn.close()
    assert details == f'{{"marker": "{marker}"}}'
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.get(f"marker:{marker}") == b"1"
        entries = await client.xrange("sira:test-stream") or []
        assert {b"marker": marker.encode()} in [fields for _, fields in entries]
    finally:
        await client.aclose()


async def test_data_survives_stop_and_start(data_dir: Path) -> None:
    marker = uuid.uuid4().hex
    with EmbeddedServers(data_dir) as servers:
        assert servers.redis_url == f"unix://{data_dir / 'redis' / 'redis.sock'}"
        every = [m.version for m in discover_migrations(default_migrations_dir())]
        assert await apply_migrations(servers.database_url) in (every, [])
        await _write(servers.database_url, servers.redis_url, marker)
        pids = _pids(data_dir)

        # As root, pgserver runs Postgres as its own system user, which must traverse.
        assert _mode(data_dir) == (0o711 if os.geteuid() == 0 else 0o700)
        assert _mode(data_dir / "redis") == 0o700
        assert _mode(data_dir / "postgres") == 0o700
        with pytest.raises(EmbeddedServerError, match="already run by another process"):
            EmbeddedPostgres(data_dir).start()
    _wait_exited(pids)

    with EmbeddedServers(data_dir) as servers:
        assert await apply_migrations(servers.database_url) == []
        await _assert_present(servers.database_url, servers.redis_url, marker)


async def test_stale_pid_files_do_not_block_startup(data_dir: Path) -> None:
    servers = EmbeddedServers(data_dir)
    servers.start()  # initialise the directory if this test runs alone
    servers.stop()
    # Pids that are alive but belong to another program (pid reuse after a crash).
    with _sleeper() as other:
        try:
            for pidfile in (
                data_dir / "postgres" / "postmaster.pid",
                data_dir / "redis" / "redis.pid",
            ):
                pidfile.write_text(f"{other.pid}\n")
            with EmbeddedServers(data_dir) as restarted:
                assert await apply_migrations(restarted.database_url) == []
            assert other.poll() is None  # an unrelated process is never signalled
        finally:
            other.kill()


CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from sira_server.embedded import EmbeddedServers
    from sira_server.store.migrate import apply_migrations
    sys.path.insert(0, sys.argv[3])
    from test_embedded import _write

    servers = EmbeddedServers(sys.argv[1])
    database_url, redis_url = servers.start()
    asyncio.run(apply_migrations(database_url))
    asyncio.run(_write(database_url, redis_url, sys.argv[2]))
    print("ready", flush=True)
    time.sleep(600)
    """
)


def _start_child(data_dir: Path, marker: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir), marker, str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if line.strip() != "ready":
        child.kill()
        _, stderr = child.communicate()
        pytest.fail(f"child did not start the servers: {line!r}\n{stderr}")
    return child


async def test_sigterm_stops_both_servers(data_dir: Path) -> None:
    child = _start_child(data_dir, uuid.uuid4().hex)
    pids = _pids(data_dir)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    _wait_exited(pids)


@pytest.mark.parametrize("servers_killed_too", [False, True], ids=["orphans", "crash"])
async def test_restart_after_owner_was_killed(data_dir: Path, servers_killed_too: bool) -> None:
    marker = uuid.uuid4().hex
    child = _start_child(data_dir, marker)
    leftovers = _pids(data_dir)
    child.kill()  # SIGKILL: no cleanup at all; both servers keep running, orphaned
    child.communicate(timeout=60)
    assert all(_alive(pid) for pid in leftovers)
    if servers_killed_too:
        # A hard crash of everything: stale pid files, unflushed state. What
        # was acknowledged is on disk (WAL; AOF with fsync always).
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        _wait_exited(leftovers)

    with EmbeddedServers(data_dir) as servers:
        _wait_exited(leftovers)  # the orphans were stopped, fresh servers started
        assert set(_pids(data_dir)).isdisjoint(leftovers)
        await _assert_present(servers.database_url, servers.redis_url, marker)
