"""Write-behind flusher against real Redis + Postgres: exactly once, crashes, outages."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from store_helpers import create_experiment, event

from sira_server.store.flusher import (
    _CREATE_TEMP_TABLES,
    _INSERT_METRICS,
    _METRIC_COLUMNS,
    FlushStats,
    SimulatedCrashError,
    WriteBehindFlusher,
)
from sira_server.store.hot_state import FLUSHER_GROUP, HotState, experiment_keys
from sira_server.store.postgres import create_pool

# --- helpers -----------------------------------------------------------------------------


async def traffic(hot: HotState, pool: asyncpg.Pool, subjects: int = 20) -> tuple[str, list[str]]:
    """An experiment with assignments and a mix of events (every subject assigned first)."""
    experiment_id, variants = await create_experiment(pool)
    await hot.init_experiment(experiment_id, variants, "conversion")
    for i in range(subjects):
        variant = variants[i % 2]
        await hot.assign(experiment_id, f"s{i}", variant, 0.5, f'{{"i": {i}}}')
        if i % 3 == 0:
            await hot.track(experiment_id, event(f"s{i}", variant, value=9.5, currency="XOF"))
        if i % 4 == 0:
            await hot.track(experiment_id, event(f"s{i}", variant, "churn"))
    return experiment_id, variants


async def table_counts(pool: asyncpg.Pool) -> tuple[int, int, int]:
    """(assignment rows, metric rows, metric rows with a duplicated event id)."""
    async with pool.acquire() as conn:
        assignments = await conn.fetchval("SELECT count(*) FROM experiment_assignments")
        metrics = await conn.fetchval("SELECT count(*) FROM experiment_metrics")
        duplicated = await conn.fetchval(
            "SELECT count(*) FROM (SELECT event_id FROM experiment_metrics"
            " GROUP BY experiment_id, event_id HAVING count(*) > 1) d"
        )
    return int(assignments), int(metrics), int(duplicated)


async def pending(redis: aioredis.Redis, experiment_id: str) -> int:
    summary = await redis.xpending(experiment_keys(experiment_id).wb, FLUSHER_GROUP)
    return int(summary["pending"])


async def entries_of(
    redis: aioredis.Redis, key: str, count: int | None = None
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(key, count=count))


async def eventually(check: Callable[[], Awaitable[bool]], cap_seconds: float = 30.0) -> bool:
    """Poll `check` until it holds (no timing assertions: only a generous cap)."""
    deadline = time.monotonic() + cap_seconds
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.02)
    return False


def flusher(
    redis: aioredis.Redis, pool: asyncpg.Pool, name: str = "f1", **options: Any
) -> WriteBehindFlusher:
    return WriteBehindFlusher(redis, pool, name, **options)


# --- end to end ----------------------------------------------------------------------------


async def test_flush_writes_every_record_exactly_once(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, b) = await create_experiment(migrated_pool)
    await hot.init_experiment(experiment_id, [a, b], "conversion")
    first = await hot.assign(experiment_id, "alice", a, 0.375, '{"country": "SN"}')
    await hot.assign(experiment_id, "bob", b, 0.625)
    await hot.track(experiment_id, event("alice", a, value=49.99, currency="XOF", event_id="e1"))
    await hot.track(experiment_id, event("alice", a, "refund", value=49.99, currency="XOF"))
    await hot.track(experiment_id, event("bob", b, "add_to_cart", event_id="e3"))
    seen: list[FlushStats] = []
    worker = flusher(redis, migrated_pool, on_flush=seen.append)

    stats = await worker.flush_once()

    assert (stats.entries_read, stats.assignments_inserted, stats.metrics_inserted) == (5, 2, 3)
    assert (stats.acked, stats.orphans, stats.dead_lettered, stats.discarded) == (5, 0, 0, 0)
    assert seen == [stats]
    assert await table_counts(migrated_pool) == (2, 3, 0)
    async with migrated_pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT variant_id::text, propensity, context,"
            " (extract(epoch FROM assigned_at) * 1000)::bigint AS ms"
            " FROM experiment_assignments WHERE molam_id = 'alice'"
        )
        metric = await conn.fetchrow(
            "SELECT variant_id::text, molam_id, event_type, value, currency,"
            " (extract(epoch FROM occurred_at) * 1000)::bigint AS ms"
            " FROM experiment_metrics WHERE event_id = 'e1'"
        )
        custom = await conn.fetchrow("SELECT currency FROM experiment_metrics WHERE event_id='e3'")
    assert tuple(row) == (a, 0.375, {"country": "SN"}, first.assigned_ms)
    assert tuple(metric) == (a, "alice", "conversion", 49.99, "XOF", 1_700_000_000_123)
    assert custom["currency"] is None
    # Acknowledged entries are deleted: the stream holds only what is not in Postgres.
    assert await redis.xlen(experiment_keys(experiment_id).wb) == 0
    assert await pending(redis, experiment_id) == 0
    assert await worker.backlog() == {experiment_id: 0}
    assert (await worker.flush_once()).entries_read == 0


async def test_replaying_flushed_entries_changes_nothing(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, _ = await traffic(hot, migrated_pool)
    stream = experiment_keys(experiment_id).wb
    records = [fields for _, fields in await entries_of(redis, stream)]
    worker = flusher(redis, migrated_pool)
    await worker.flush_once()
    counts = await table_counts(migrated_pool)
    for fields in records:  # the same records delivered again
        await redis.xadd(stream, cast(Any, fields))

    stats = await worker.flush_once()

    assert stats.entries_read == len(records)
    assert (stats.assignments_inserted, stats.metrics_inserted, stats.acked) == (
        0,
        0,
        len(records),
    )
    assert await table_counts(migrated_pool) == counts
    assert await redis.xlen(stream) == 0


async def test_several_experiments_in_one_pass(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    first, _ = await traffic(hot, migrated_pool, subjects=10)
    second, _ = await traffic(hot, migrated_pool, subjects=7)
    stats = await flusher(redis, migrated_pool).flush_once()
    assert stats.assignments_inserted == 17
    async with migrated_pool.acquire() as conn:
        per_experiment = dict(
            await conn.fetch(
                "SELECT experiment_id::text, count(*) FROM experiment_assignments GROUP BY 1"
            )
        )
    assert per_experiment == {first: 10, second: 7}


# --- crashes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("crash", ["fail_before_commit", "fail_after_commit_before_ack"])
async def test_crashed_consumer_entries_are_reclaimed_exactly_once(
    crash: str, hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, _ = await traffic(hot, migrated_pool, subjects=30)
    entries = await redis.xlen(experiment_keys(experiment_id).wb)
    doomed = flusher(redis, migrated_pool, "doomed")
    setattr(doomed, crash, True)

    with pytest.raises(SimulatedCrashError):
        await doomed.flush_once()

    committed = crash == "fail_after_commit_before_ack"
    assert (await table_counts(migrated_pool))[0] == (30 if committed else 0)
    assert await pending(redis, experiment_id) == entries
    # Another process's consumer; min-idle 0 so it reclaims at once.
    rescuer = flusher(redis, migrated_pool, "rescuer", claim_idle_ms=0)
    stats = await rescuer.flush_once()
    assert stats.acked == entries
    assert stats.assignments_inserted == (0 if committed else 30)
    assert await table_counts(migrated_pool) == (30, 10 + 8, 0)
    assert await pending(redis, experiment_id) == 0
    assert await redis.xlen(experiment_keys(experiment_id).wb) == 0


async def test_metric_reclaimed_before_its_assignment_waits_then_lands(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, _) = await create_experiment(migrated_pool)
    await hot.init_experiment(experiment_id, [a], "conversion")
    await hot.assign(experiment_id, "u1", a, 0.5)
    await hot.track(experiment_id, event("u1", a, event_id="late"))
    # A takes the assignment record (batch of 1) and dies before its commit.
    doomed = flusher(redis, migrated_pool, "doomed", batch_size=1)
    doomed.fail_before_commit = True
    with pytest.raises(SimulatedCrashError):
        await doomed.flush_once()
    # B gets the metric first: its assignment is not in Postgres yet.
    other = flusher(redis, migrated_pool, "other", claim_idle_ms=60_000)
    stats = await other.flush_once()
    assert (stats.orphans, stats.metrics_inserted, stats.acked, stats.dead_lettered) == (
        1,
        0,
        0,
        0,
    )
    assert await pending(redis, experiment_id) == 2
    # Once A's entries are reclaimed, both land, the metric after its assignment.
    other.claim_idle_ms = 0
    stats = await other.flush_once()
    assert (stats.assignments_inserted, stats.metrics_inserted, stats.orphans) == (1, 1, 0)
    assert await table_counts(migrated_pool) == (1, 1, 0)
    assert await pending(redis, experiment_id) == 0


async def test_metric_whose_assignment_never_arrives_is_dead_lettered(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, _) = await create_experiment(migrated_pool)
    await hot.init_experiment(experiment_id, [a], "conversion")
    keys = experiment_keys(experiment_id)
    await hot.assign(experiment_id, "u1", a, 0.5)
    await hot.track(experiment_id, event("u1", a))
    # The assignment record was lost (e.g. Redis lost it before it was flushed).
    first_id = (await entries_of(redis, keys.wb, count=1))[0][0]
    await redis.xdel(keys.wb, first_id)
    worker = flusher(redis, migrated_pool, orphan_grace_seconds=0.0)

    stats = await worker.flush_once()

    assert (stats.dead_lettered, stats.acked, stats.orphans) == (1, 1, 0)
    dead = await entries_of(redis, keys.dead)
    assert len(dead) == 1
    assert dead[0][1][b"t"] == b"m"
    assert dead[0][1][b"reason"] == b"assignment never reached Postgres"
    assert await redis.xlen(keys.wb) == 0
    assert await table_counts(migrated_pool) == (0, 0, 0)


async def test_records_of_a_deleted_experiment_are_discarded(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, _ = await traffic(hot, migrated_pool, subjects=6)
    entries = await redis.xlen(experiment_keys(experiment_id).wb)
    async with migrated_pool.acquire() as conn:
        await conn.execute("DELETE FROM experiments WHERE id = $1", experiment_id)
    stats = await flusher(redis, migrated_pool).flush_once()
    assert (stats.discarded, stats.acked, stats.dead_lettered) == (entries, entries, 0)
    assert await table_counts(migrated_pool) == (0, 0, 0)


async def test_record_postgres_rejects_is_isolated(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, _) = await create_experiment(migrated_pool)
    await hot.init_experiment(experiment_id, [a], "conversion")
    await hot.assign(experiment_id, "u1", a, 0.5)
    await hot.track(experiment_id, event("u1", a, event_id="good-1"))
    # Formats are the servicer's job; a record that slipped through must not block the rest.
    await hot.track(experiment_id, event("u1", a, "Not A Slug!", event_id="bad"))
    await hot.track(experiment_id, event("u1", a, "churn", event_id="good-2"))

    stats = await flusher(redis, migrated_pool).flush_once()

    assert (stats.acked, stats.dead_lettered, stats.metrics_inserted) == (4, 1, 2)
    async with migrated_pool.acquire() as conn:
        ids = {r[0] for r in await conn.fetch("SELECT event_id FROM experiment_metrics")}
    assert ids == {"good-1", "good-2"}
    dead = await entries_of(redis, experiment_keys(experiment_id).dead)
    assert dead[0][1][b"id"] == b"bad"


# --- Postgres outage ---------------------------------------------------------------------------


class TcpProxy:
    """Loopback proxy to Postgres that can be taken down (connections cut) and up again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self._writers.update((writer, upstream_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, upstream_writer)),
            asyncio.create_task(self._pump(upstream_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for w in (writer, upstream_writer):
                w.close()
                self._writers.discard(w)
                with contextlib.suppress(Exception):
                    await w.wait_closed()
            self._tasks.difference_update(pumps)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def proxied_pool(database_url: str) -> AsyncIterator[tuple[TcpProxy, asyncpg.Pool]]:
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.up()
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}"
    pool = await create_pool(urlunsplit(parts._replace(netloc=netloc)), min_size=0, max_size=2)
    try:
        yield proxy, pool
    finally:
        pool.terminate()
        await proxy.down()


async def test_postgres_outage_keeps_entries_pending_until_it_is_back(
    hot: HotState,
    redis: aioredis.Redis,
    migrated_pool: asyncpg.Pool,
    proxied_pool: tuple[TcpProxy, asyncpg.Pool],
) -> None:
    proxy, pool = proxied_pool
    experiment_id, _ = await traffic(hot, migrated_pool, subjects=12)
    entries = await redis.xlen(experiment_keys(experiment_id).wb)
    await proxy.down()
    worker = flusher(
        redis, pool, backoff_initial_seconds=0.05, backoff_max_seconds=0.2, idle_sleep_seconds=0.01
    )
    with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
        await worker.flush_once()
    assert await pending(redis, experiment_id) == entries
    assert await table_counts(migrated_pool) == (0, 0, 0)

    # The loop keeps retrying with backoff while Postgres is away...
    errors: list[BaseException] = []
    worker.on_error = errors.append
    task = asyncio.create_task(worker.run())

    async def failed_twice() -> bool:
        return len(errors) >= 2

    assert await eventually(failed_twice)
    assert await table_counts(migrated_pool) == (0, 0, 0)
    # ... and everything lands, once, when it is back.
    await proxy.up()

    async def flushed() -> bool:
        return (await worker.backlog())[experiment_id] == 0

    assert await eventually(flushed)
    worker.stop()
    await asyncio.wait_for(task, 30)
    assert await table_counts(migrated_pool) == (12, 4 + 3, 0)
    assert await pending(redis, experiment_id) == 0


class RacedOnce(WriteBehindFlusher):
    """A flusher whose first pass meets redis-py's closed-writer race (redis/redis-py#4287):
    a write through a connection with no writer, what a reset under a write leaves."""

    raced = False

    async def flush_once(self) -> FlushStats:
        if not self.raced:
            self.raced = True
            await aioredis.Connection()._send_packed_command([b"PING"])
        return await super().flush_once()


async def test_redis_pys_closed_writer_race_is_retried_like_an_outage(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    """It escapes redis-py as AttributeError, not ConnectionError: the loop backs off and
    retries, as for any outage, instead of ending in a crash and a restart."""
    experiment_id, _ = await traffic(hot, migrated_pool, subjects=12)
    worker = RacedOnce(redis, migrated_pool, "f1", backoff_initial_seconds=0.01)
    errors: list[BaseException] = []
    worker.on_error = errors.append
    task = asyncio.create_task(worker.run())

    async def flushed() -> bool:
        return (await worker.backlog())[experiment_id] == 0

    assert await eventually(flushed)
    worker.stop()
    await asyncio.wait_for(task, 30)  # ended by stop(), not by the error
    assert [type(e) for e in errors] == [AttributeError]
    assert await table_counts(migrated_pool) == (12, 4 + 3, 0)


# --- drain and bandit snapshot ---------------------------------------------------------------


async def test_drain_flushes_everything_in_batches(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, _ = await traffic(hot, migrated_pool, subjects=25)
    entries = await redis.xlen(experiment_keys(experiment_id).wb)
    stats = await flusher(redis, migrated_pool, batch_size=4).drain(timeout=60)
    assert stats.acked == entries
    assert await table_counts(migrated_pool) == (25, 9 + 7, 0)


async def test_bandit_state_snapshot_from_hot_counters(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, b) = await create_experiment(migrated_pool)
    await hot.init_experiment(experiment_id, [a, b], "conversion")
    for i in range(5):
        await hot.assign(experiment_id, f"a{i}", a, 0.5)
    await hot.assign(experiment_id, "b0", b, 0.5)
    for i in range(3):
        await hot.track(experiment_id, event(f"a{i}", a))
    worker = flusher(redis, migrated_pool)
    assert await worker.refresh_bandit_state(force=True) == 2
    await hot.track(experiment_id, event("b0", b))
    assert await worker.refresh_bandit_state() == 2
    assert await worker.refresh_bandit_state() == 0  # another refresh holds the interval
    async with migrated_pool.acquire() as conn:
        rows = {
            r["variant_id"]: tuple(r)[1:]
            for r in await conn.fetch(
                "SELECT variant_id::text, alpha, beta, total_samples, successes"
                " FROM experiment_bandit_state WHERE experiment_id = $1",
                experiment_id,
            )
        }
    assert rows == {a: (4.0, 3.0, 5, 3), b: (2.0, 1.0, 1, 1)}


async def test_metric_write_probes_assignments_by_index_whatever_their_number(
    migrated_pool: asyncpg.Pool,
) -> None:
    """A pass costs per record, not per assignment in the table: the orphan check and the
    insert look each subject up in an index. As a join, with no statistics on the temp
    table, the planner hashed all of experiment_assignments on every pass."""
    experiment_id, (a, _) = await create_experiment(migrated_pool)
    subjects = [f"s{i}" for i in range(20_000)]
    async with migrated_pool.acquire() as conn:
        await conn.copy_records_to_table(
            "experiment_assignments",
            records=[(experiment_id, s, a, 0.5) for s in subjects],
            columns=("experiment_id", "molam_id", "variant_id", "propensity"),
        )
        await conn.execute("ANALYZE experiment_assignments")
        async with conn.transaction():
            await conn.execute(_CREATE_TEMP_TABLES)
            await conn.copy_records_to_table(
                "sira_wb_metrics",
                records=[
                    (i, experiment_id, f"e{i}", a, s, "conversion", 1.0, "XOF", 0, 0)
                    for i, s in enumerate(subjects[:500])
                ],
                columns=_METRIC_COLUMNS,
            )
            plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + _INSERT_METRICS)
    scans = list(_plan_nodes(plan[0]["Plan"]))  # the pool decodes json
    on_assignments = [n for n in scans if n.get("Relation Name") == "experiment_assignments"]
    assert on_assignments, scans
    assert all(n["Node Type"] in {"Index Scan", "Index Only Scan"} for n in on_assignments), [
        n["Node Type"] for n in on_assignments
    ]


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)
