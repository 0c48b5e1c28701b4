"""One experiment's hot state split into S shards behaves as one: the same traffic on
S = 1 and S = 8 gives the same answers, counters, posteriors, Postgres rows, and the
same state again after a rebuild from Postgres (real Redis, real Postgres)."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from server_fixtures import TEST_JWT_SECRET
from store_helpers import create_experiment

from sira_server.config import ConfigError, Settings
from sira_server.store.flusher import WriteBehindFlusher
from sira_server.store.hot_keys import (
    LAYOUT_KEY,
    SHARD_SQL,
    STREAM_REGISTRY,
    HotLayout,
    experiment_id_of_stream,
    experiment_keys,
    shard_of,
)
from sira_server.store.hot_state import (
    HotState,
    TrackEvent,
    TrackOutcome,
    VariantCounters,
    claim_layout,
)

SUBJECTS = 240
EVENT_TYPES = ("conversion", "refund", "churn", "add_to_cart")


async def test_postgres_computes_the_same_shard_as_python(migrated_pool: asyncpg.Pool) -> None:
    """The rebuild filters rows by shard in SQL: it must agree with `shard_of`."""
    subjects = ["", "a", "user-1", "Ωmega-é", "🎲" * 30, *(f"s{i}" for i in range(200))]
    sql = "SELECT " + SHARD_SQL.format(column="x", shards=8) + " FROM unnest($1::text[]) AS x"
    async with migrated_pool.acquire() as conn:
        in_postgres = [row[0] for row in await conn.fetch(sql, subjects)]
    in_python = [shard_of(s, 8) for s in subjects]
    assert in_postgres == in_python
    assert set(in_python) == set(range(8))  # the hash does spread them
    assert {shard_of(s, 1) for s in subjects} == {0}


@dataclass
class Run:
    """What one layout answered and holds, with variants named by position."""

    assigned: list[tuple[bool, int]]
    tracked: list[tuple[str, bool, int | None]]
    counters: dict[int, VariantCounters]
    posteriors: dict[int, tuple[int, int]]
    rows: dict[str, Counter[tuple[int, str]]]


def _traffic(seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int, str, float, str]]]:
    """(subject, variant position) assigns, and (subject, variant position, event type,
    value, event id) events: with re-assigns, duplicates, unassigned subjects and wrong
    variants, in one fixed order."""
    rng = random.Random(seed)
    assigns = [(f"subject-{i}", rng.randrange(3)) for i in range(SUBJECTS)]
    assigns += [(f"subject-{rng.randrange(SUBJECTS)}", rng.randrange(3)) for _ in range(60)]
    chosen = dict(assigns[:SUBJECTS])
    events = []
    for n in range(600):
        subject = f"subject-{rng.randrange(SUBJECTS + 20)}"  # some never assigned
        variant = chosen.get(subject, 0)
        if rng.random() < 0.05:
            variant = (variant + 1) % 3  # mismatch
        kind = rng.choice(EVENT_TYPES)
        value = float(rng.randrange(1, 500)) if kind in ("conversion", "refund") else 0.0
        # Some ids come again for another subject: ids are per subject, so not a retry.
        event_id = f"e{n}" if rng.random() > 0.05 or n == 0 else f"e{n - 1}"
        events.append((subject, variant, kind, value, event_id))
        if rng.random() < 0.1:  # a client's retry of an earlier event
            events.append(events[rng.randrange(len(events))])
    return assigns, events


async def _run(
    redis: aioredis.Redis, pool: asyncpg.Pool, layout: HotLayout, seed: int
) -> tuple[Run, HotState, str]:
    experiment_id, variant_ids = await create_experiment(
        pool, variants=3, reward="conversion_not_refunded"
    )
    position = {v: i for i, v in enumerate(variant_ids)}
    hot = HotState(redis, pool, layout=layout)
    await hot.init_experiment(experiment_id, variant_ids, "conversion_not_refunded")
    assigns, events = _traffic(seed)
    assigned = []
    for subject, variant in assigns:
        outcome = await hot.assign(experiment_id, subject, variant_ids[variant], 1 / 3)
        assigned.append((outcome.created, position[outcome.variant_id]))
    batch = [
        (
            experiment_id,
            TrackEvent(
                subject_id=subject,
                variant_id=variant_ids[variant],
                event_type=kind,
                event_id=event_id,
                occurred_ms=1_700_000_000_000 + index,
                value=value,
                currency="XOF" if value else None,
            ),
        )
        for index, (subject, variant, kind, value, event_id) in enumerate(events)
    ]
    tracked = []
    for start in range(0, len(batch), 100):  # TrackBatch's path: many shards per call
        for answer in await hot.track_each(batch[start : start + 100]):
            assert isinstance(answer, TrackOutcome), answer
            mismatch = answer.assigned_variant_id
            tracked.append(
                (
                    answer.status.value,
                    answer.first_conversion,
                    None if mismatch is None else position[mismatch],
                )
            )
    return (
        Run(
            assigned=assigned,
            tracked=tracked,
            counters=await _counters(hot, experiment_id, position),
            posteriors=await _posteriors(hot, experiment_id, position),
            rows={},
        ),
        hot,
        experiment_id,
    )


async def _counters(
    hot: HotState, experiment_id: str, position: dict[str, int]
) -> dict[int, VariantCounters]:
    return {position[v]: c for v, c in (await hot.counters(experiment_id)).items()}


async def _posteriors(
    hot: HotState, experiment_id: str, position: dict[str, int]
) -> dict[int, tuple[int, int]]:
    counts = (await hot.posteriors([experiment_id]))[experiment_id]
    return {position[v]: pair for v, pair in counts.items()}


async def _positions(pool: asyncpg.Pool, experiment_id: str) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT id::text, position FROM experiment_variants WHERE experiment_id = $1",
        experiment_id,
    )
    return {row[0]: row[1] for row in rows}


async def _rows(pool: asyncpg.Pool, experiment_id: str) -> dict[str, Counter[tuple[int, str]]]:
    """Postgres rows per (variant position, subject or event type)."""
    position = await _positions(pool, experiment_id)
    assignments = await pool.fetch(
        "SELECT variant_id::text, molam_id FROM experiment_assignments WHERE experiment_id = $1",
        experiment_id,
    )
    metrics = await pool.fetch(
        "SELECT variant_id::text, event_type, value FROM experiment_metrics"
        " WHERE experiment_id = $1",
        experiment_id,
    )
    return {
        "assignments": Counter((position[v], s) for v, s in assignments),
        "metrics": Counter((position[v], f"{kind}:{value:g}") for v, kind, value in metrics),
    }


async def _drop_hot_state(redis: aioredis.Redis, experiment_id: str) -> None:
    """What Redis losing its data does to this experiment (streams drained already)."""
    async for key in redis.scan_iter(match=f"sira:{{exp:{experiment_id}*"):
        await redis.delete(key)


async def test_one_shard_and_eight_shards_agree_on_everything(
    redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    runs: dict[int, Run] = {}
    for shards in (1, 8):
        run, hot, experiment_id = await _run(redis, migrated_pool, HotLayout(shards), seed=11)
        try:
            streams = {
                s.decode()
                for s in await redis.smembers(STREAM_REGISTRY)
                if experiment_id_of_stream(s) == experiment_id
            }
            assert len(streams) == shards  # one write-behind stream per shard
            flusher = WriteBehindFlusher(
                redis, migrated_pool, f"shards-{shards}", layout=HotLayout(shards)
            )
            await flusher.drain(timeout=60)
            assert (await flusher.backlog()).get(experiment_id, 0) == 0
            run.rows = await _rows(migrated_pool, experiment_id)
            position = await _positions(migrated_pool, experiment_id)
            # Redis loses the state; each shard is rebuilt from its own Postgres rows.
            await _drop_hot_state(redis, experiment_id)
            assert await _counters(hot, experiment_id, position) == run.counters
            assert await _posteriors(hot, experiment_id, position) == run.posteriors
        finally:
            await hot.close()
        runs[shards] = run
    one, eight = runs[1], runs[8]
    assert eight.assigned == one.assigned
    assert eight.tracked == one.tracked
    assert eight.counters == one.counters
    assert eight.posteriors == one.posteriors
    assert eight.rows == one.rows
    statuses = Counter(status for status, _, _ in one.tracked)
    assert set(statuses) == {"accepted", "duplicate", "not_assigned", "mismatch"}
    assert sum(c.assigned_subjects for c in one.counters.values()) == SUBJECTS


async def test_assignments_of_eight_shards_land_in_every_shard(
    redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    layout = HotLayout(8)
    experiment_id, variant_ids = await create_experiment(migrated_pool, variants=2)
    hot = HotState(redis, migrated_pool, layout=layout)
    try:
        await hot.init_experiment(experiment_id, variant_ids, "conversion")
        for i in range(64):
            await hot.assign(experiment_id, f"user-{i}", variant_ids[i % 2], 0.5)
        sizes = [await redis.hlen(keys.asg) for keys in layout.all_keys(experiment_id)]
        assert sum(sizes) == 64
        assert all(size > 0 for size in sizes), sizes
        for i in range(64):  # each subject's assignment is found in its own shard
            held = await hot.get_assignment(experiment_id, f"user-{i}")
            assert held is not None
            assert held.variant_id == variant_ids[i % 2]
        await hot.drop_experiment(experiment_id)
        leftovers = [k async for k in redis.scan_iter(match=f"sira:{{exp:{experiment_id}*")]
        assert leftovers == []
    finally:
        await hot.close()


async def test_an_event_id_is_an_idempotency_key_per_subject(
    redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    """Both layouts: the same id again for one subject is a duplicate; for another
    subject it is that subject's own event."""
    for shards in (1, 8):
        experiment_id, (a, _) = await create_experiment(migrated_pool, variants=2)
        hot = HotState(redis, migrated_pool, layout=HotLayout(shards))
        try:
            await hot.init_experiment(experiment_id, [a, _], "conversion")
            answers = []
            for subject in ("ann", "bob", "ann"):
                await hot.assign(experiment_id, subject, a, 0.5)
                tracked = TrackEvent(subject, a, "conversion", "order-1", 1_700_000_000_000)
                answers.append((await hot.track(experiment_id, tracked)).status.value)
            assert answers == ["accepted", "accepted", "duplicate"], shards
        finally:
            await hot.close()


async def test_processes_must_agree_on_the_shard_count(redis: aioredis.Redis) -> None:
    await claim_layout(redis, HotLayout(8))
    await claim_layout(redis, HotLayout(8))  # the same: fine
    with pytest.raises(ConfigError, match="SIRA_REDIS_SHARDS=8"):
        await claim_layout(redis, HotLayout(1))
    assert await redis.get(LAYOUT_KEY) == b"8"
    await redis.set(LAYOUT_KEY, "eight")  # hand-edited: refused in words, not a traceback
    with pytest.raises(ConfigError, match="not a shard count"):
        await claim_layout(redis, HotLayout(8))


async def test_a_deployment_from_before_the_layout_key_keeps_one_shard(
    redis: aioredis.Redis,
) -> None:
    """Streams under ``{exp:<id>}`` and no ``sira:layout``: written with one shard, so a
    process that would use 8 (the cluster default) refuses instead of losing them."""
    await redis.sadd(STREAM_REGISTRY, "sira:{exp:0b7e0000-0000-4000-8000-000000000001}:wb")
    with pytest.raises(ConfigError, match="written with 1 shard"):
        await claim_layout(redis, HotLayout(8))
    assert await redis.get(LAYOUT_KEY) is None
    await claim_layout(redis, HotLayout(1))
    assert await redis.get(LAYOUT_KEY) == b"1"


async def test_an_event_recorded_before_ids_were_per_subject_stays_a_duplicate(
    redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    """The events set of an older release holds bare ids: a retry after the upgrade is
    still a duplicate, not counted twice."""
    experiment_id, (a, b) = await create_experiment(migrated_pool, variants=2)
    hot = HotState(redis, migrated_pool)
    try:
        await hot.init_experiment(experiment_id, [a, b], "conversion")
        await hot.assign(experiment_id, "ann", a, 0.5)
        await redis.sadd(experiment_keys(experiment_id).events, "order-7")  # the old format
        retried = TrackEvent("ann", a, "conversion", "order-7", 1_700_000_000_000)
        assert (await hot.track(experiment_id, retried)).status.value == "duplicate"
        assert (await hot.counters(experiment_id))[a].conversions == 0
    finally:
        await hot.close()


@pytest.mark.parametrize("role", ["all", "flusher"])
async def test_a_process_with_another_shard_count_refuses_to_start_in_one_line(
    role: str, database_url: str, redis_url: str, redis: aioredis.Redis, tmp_path: Path
) -> None:
    await redis.set(LAYOUT_KEY, 8)  # what the deployment's first process recorded
    env = {
        **os.environ,
        "SIRA_DATABASE_URL": database_url,
        "SIRA_REDIS_URL": redis_url,
        "SIRA_JWT_SECRET": TEST_JWT_SECRET,
        "SIRA_GRPC_PORT": "0",
        "SIRA_METRICS_PORT": "0",
        "SIRA_HTTP_PORT": "off",
        "SIRA_REDIS_SHARDS": "2",
        "SIRA_DATA_DIR": str(tmp_path),
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sira_server", "--role", role],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "sira-server: SIRA_REDIS_SHARDS is 2 but the hot state in Redis was written with 8"
        " shard(s); set SIRA_REDIS_SHARDS=8, or change it as docs/scaling.md describes"
        " (drain the write-behind, then reset the hot state)"
    )
    assert "Traceback" not in done.stderr
    assert await redis.get(LAYOUT_KEY) == b"8"


@pytest.mark.parametrize(
    ("env", "shards"),
    [
        ({}, 1),
        ({"SIRA_REDIS_SHARDS": "4"}, 4),
        ({"SIRA_REDIS_CLUSTER": "1", "SIRA_REDIS_URL": "redis://x", "SIRA_DATABASE_URL": "x"}, 8),
    ],
)
def test_the_shard_count_setting(env: dict[str, str], shards: int) -> None:
    assert Settings.from_env(env).hot_layout.shards == shards


@pytest.mark.parametrize("raw", ["0", "257", "many"])
def test_a_bad_shard_count_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="SIRA_REDIS_SHARDS"):
        Settings.from_env({"SIRA_REDIS_SHARDS": raw})


def test_a_subject_always_maps_to_the_same_shard() -> None:
    subject = str(uuid.uuid4())
    assert len({shard_of(subject, 8) for _ in range(10)}) == 1
