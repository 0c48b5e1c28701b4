"""Rebuilding the hot state from Postgres after Redis lost it."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from store_helpers import create_experiment

from sira_server.errors import Unavailable
from sira_server.store.flusher import SimulatedCrashError, WriteBehindFlusher
from sira_server.store.hot_state import (
    STREAM_REGISTRY,
    HotState,
    TrackEvent,
    TrackStatus,
    VariantCounters,
    experiment_keys,
)
from sira_server.store.postgres import create_pool
from sira_server.store.rebuild import rebuild_experiment


async def random_traffic(
    hot: HotState, experiment_id: str, variants: list[str], seed: int, subjects: int = 60
) -> None:
    """Assignments and a realistic mess of events: repeats, retries, refunds first, rejects,
    occurrence times in any order (and ties), which decide which refunds retract."""
    rng = random.Random(seed)
    assigned: dict[str, str] = {}
    for i in range(subjects):
        subject = f"{seed}-s{i}"
        outcome = await hot.assign(
            experiment_id, subject, rng.choice(variants), rng.random() + 0.01
        )
        assigned[subject] = outcome.variant_id
    used_ids: list[str] = []
    for n in range(subjects * 3):
        subject = rng.choice(list(assigned))
        variant = assigned[subject]
        kind = rng.choice(["conversion", "conversion", "refund", "churn", "signup", "reject"])
        event_id = rng.choice(used_ids) if used_ids and rng.random() < 0.1 else f"{seed}-e{n}"
        used_ids.append(event_id)
        if kind == "reject":
            await hot.track(experiment_id, _event(f"ghost-{n}", variant, "conversion", event_id))
            continue
        with_value = kind in ("conversion", "refund") and rng.random() < 0.8
        await hot.track(
            experiment_id,
            _event(
                subject,
                variant,
                kind,
                event_id,
                value=round(rng.uniform(0.5, 500), 2) if with_value else 0.0,
                currency=rng.choice(["XOF", "EUR"]) if with_value else None,
                occurred_ms=1_700_000_000_000 + 1000 * rng.randrange(20),
            ),
        )


def _event(
    subject: str,
    variant: str,
    event_type: str,
    event_id: str,
    *,
    value: float = 0.0,
    currency: str | None = None,
    occurred_ms: int = 1_700_000_000_000,
) -> TrackEvent:
    return TrackEvent(subject, variant, event_type, event_id, occurred_ms, value, currency)


async def postgres_counters(
    pool: asyncpg.Pool, experiment_id: str, reward: str
) -> dict[str, dict[str, Any]]:
    """Results computed independently from Postgres rows (plain SQL aggregates)."""
    async with pool.acquire() as conn:
        assigned = await conn.fetch(
            "SELECT variant_id::text, count(*) FROM experiment_assignments"
            " WHERE experiment_id = $1 GROUP BY 1",
            experiment_id,
        )
        events = await conn.fetch(
            "SELECT variant_id::text, event_type, count(*), count(DISTINCT molam_id)"
            " FROM experiment_metrics WHERE experiment_id = $1 GROUP BY 1, 2",
            experiment_id,
        )
        amounts = await conn.fetch(
            "SELECT variant_id::text, event_type, currency, sum(value)"
            " FROM experiment_metrics WHERE experiment_id = $1"
            " AND currency IS NOT NULL AND value > 0 GROUP BY 1, 2, 3",
            experiment_id,
        )
        # Not a success: a refund at or after the subject's latest conversion.
        refunded_excluded = "AND NOT EXISTS (SELECT 1 FROM experiment_metrics r"
        refunded_excluded += " WHERE r.experiment_id = m.experiment_id"
        refunded_excluded += " AND r.molam_id = m.molam_id AND r.event_type = 'refund'"
        refunded_excluded += " AND r.occurred_at >= (SELECT max(c.occurred_at)"
        refunded_excluded += " FROM experiment_metrics c WHERE c.experiment_id = m.experiment_id"
        refunded_excluded += " AND c.molam_id = m.molam_id AND c.event_type = 'conversion'))"
        successes = await conn.fetch(
            "SELECT variant_id::text, count(DISTINCT molam_id) FROM experiment_metrics m"
            " WHERE experiment_id = $1 AND event_type = 'conversion' "
            + (refunded_excluded if reward == "conversion_not_refunded" else "")
            + " GROUP BY 1",
            experiment_id,
        )
    result: dict[str, dict[str, Any]] = {}
    for variant, count in assigned:
        result.setdefault(variant, {})["assigned_subjects"] = count
    for variant, count in successes:
        result.setdefault(variant, {})["successes"] = count
    names = {"conversion": "conversions", "refund": "refunds", "churn": "churns"}
    subjects = {"conversion": "converted", "refund": "refunded", "churn": "churned"}
    for variant, event_type, count, distinct in events:
        entry = result.setdefault(variant, {})
        if event_type in names:
            entry[names[event_type]] = count
            entry[f"{subjects[event_type]}_subjects"] = distinct
        else:
            entry.setdefault("custom", {})[event_type] = count
    for variant, event_type, currency, total in amounts:
        name = "revenue" if event_type == "conversion" else "refund_amount"
        result[variant].setdefault(name, {})[currency] = pytest.approx(total)
    return result


def as_dicts(counters: dict[str, VariantCounters]) -> dict[str, dict[str, object]]:
    """Counters without the zero entries (SQL aggregates have no row for zero)."""
    return {
        variant: {
            name: value
            for name, value in vars_of(c).items()
            if value not in (0, {}) or name in ("assigned_subjects",)
        }
        for variant, c in counters.items()
    }


def vars_of(counters: VariantCounters) -> dict[str, object]:
    return {name: getattr(counters, name) for name in VariantCounters.__dataclass_fields__}


@pytest.mark.parametrize("reward", ["conversion", "conversion_not_refunded"])
async def test_rebuilt_state_equals_postgres(
    reward: str, hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, variants = await create_experiment(migrated_pool, variants=3, reward=reward)
    await hot.init_experiment(experiment_id, variants, reward)
    await random_traffic(hot, experiment_id, variants, seed=7)
    keys = experiment_keys(experiment_id)
    before = await hot.counters(experiment_id)
    before_posteriors = await hot.posteriors([experiment_id])
    before_sets = {
        name: await redis.smembers(getattr(keys, name))
        for name in ("conv", "refunded", "churned", "events")
    }
    before_asg = await redis.hgetall(keys.asg)
    before_outcome = await redis.hgetall(keys.outcome)
    assert bool(before_outcome) == (reward == "conversion_not_refunded")
    await WriteBehindFlusher(redis, migrated_pool, "f").drain(timeout=60)
    assert await redis.xlen(keys.wb) == 0

    await redis.flushdb()  # Redis comes back empty
    assert await rebuild_experiment(redis, migrated_pool, experiment_id, variants, reward)

    after = await hot.counters(experiment_id)
    assert as_dicts(after) == await postgres_counters(migrated_pool, experiment_id, reward)
    for variant in variants:
        hot_before, rebuilt = vars_of(before[variant]), vars_of(after[variant])
        for name in ("revenue", "refund_amount"):
            assert rebuilt.pop(name) == pytest.approx(hot_before.pop(name))
        assert rebuilt == hot_before
    assert await hot.posteriors([experiment_id]) == before_posteriors
    assert await redis.hgetall(keys.asg) == before_asg
    assert await redis.hgetall(keys.outcome) == before_outcome
    for name, members in before_sets.items():
        assert await redis.smembers(getattr(keys, name)) == members
    assert await redis.hgetall(keys.meta) == {b"ready": b"1", b"reward": reward.encode()}
    assert await redis.sismember(STREAM_REGISTRY, keys.wb)


async def test_lost_state_is_rebuilt_on_first_use(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, b) = await create_experiment(migrated_pool)
    await hot.init_experiment(experiment_id, [a, b], "conversion")
    first = await hot.assign(experiment_id, "u1", a, 0.5)
    await hot.track(experiment_id, _event("u1", a, "conversion", "e1"))
    await WriteBehindFlusher(redis, migrated_pool, "f").drain(timeout=60)
    await redis.flushdb()

    again = await hot.assign(experiment_id, "u1", b, 0.5)
    assert not again.created
    assert (again.variant_id, again.assigned_ms) == (a, first.assigned_ms)
    duplicate = await hot.track(experiment_id, _event("u1", a, "conversion", "e1"))
    assert duplicate.status is TrackStatus.DUPLICATE
    repeat = await hot.track(experiment_id, _event("u1", a, "conversion", "e2"))
    assert (repeat.status, repeat.first_conversion) == (TrackStatus.ACCEPTED, False)
    assert await hot.posteriors([experiment_id]) == {experiment_id: {a: (1, 1), b: (0, 0)}}
    # The flusher finds the re-created stream and group.
    await hot.assign(experiment_id, "u2", b, 0.5)
    stats = await WriteBehindFlusher(redis, migrated_pool, "f").flush_once()
    assert (stats.assignments_inserted, stats.metrics_inserted) == (1, 1)


async def test_many_requests_hitting_lost_state_share_the_rebuild(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, b) = await create_experiment(migrated_pool)
    await hot.init_experiment(experiment_id, [a, b], "conversion")
    for i in range(10):
        await hot.assign(experiment_id, f"old{i}", a, 0.5)
    await WriteBehindFlusher(redis, migrated_pool, "f").drain(timeout=60)
    await redis.flushdb()

    outcomes, _ = await asyncio.gather(
        asyncio.gather(
            *(hot.assign(experiment_id, f"new{i}", b, 0.5) for i in range(50)),
            *(hot.assign(experiment_id, f"old{i}", b, 0.5) for i in range(10)),
        ),
        hot.posteriors([experiment_id]),
    )

    assert [o.created for o in outcomes] == [True] * 50 + [False] * 10
    assert {o.variant_id for o in outcomes[50:]} == {a}
    assert await hot.posteriors([experiment_id]) == {experiment_id: {a: (10, 0), b: (50, 0)}}


async def test_rebuild_keeps_records_not_yet_flushed(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, variants = await create_experiment(
        migrated_pool, variants=2, reward="conversion_not_refunded"
    )
    await hot.init_experiment(experiment_id, variants, "conversion_not_refunded")
    await random_traffic(hot, experiment_id, variants, seed=1, subjects=30)
    await WriteBehindFlusher(redis, migrated_pool, "f").drain(timeout=60)
    await random_traffic(hot, experiment_id, variants, seed=2, subjects=30)  # only in Redis
    # Flushed but not yet acknowledged: in Postgres and in the stream.
    half = WriteBehindFlusher(redis, migrated_pool, "half", batch_size=40)
    half.fail_after_commit_before_ack = True
    with pytest.raises(SimulatedCrashError):
        await half.flush_once()
    before = await hot.counters(experiment_id)
    before_posteriors = await hot.posteriors([experiment_id])

    assert await hot.ensure_ready(experiment_id, force=True)

    after = await hot.counters(experiment_id)
    for variant in variants:
        hot_before, rebuilt = vars_of(before[variant]), vars_of(after[variant])
        for name in ("revenue", "refund_amount"):
            assert rebuilt.pop(name) == pytest.approx(hot_before.pop(name))
        assert rebuilt == hot_before
    assert await hot.posteriors([experiment_id]) == before_posteriors


async def test_concurrent_callers_share_one_rebuild(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, variants = await create_experiment(migrated_pool)
    await hot.init_experiment(experiment_id, variants, "conversion")
    await random_traffic(hot, experiment_id, variants, seed=3, subjects=20)
    await WriteBehindFlusher(redis, migrated_pool, "f").drain(timeout=60)
    before = await hot.posteriors([experiment_id])
    await redis.flushdb()

    rebuilt = await asyncio.gather(
        *(
            rebuild_experiment(redis, migrated_pool, experiment_id, variants, "conversion")
            for _ in range(8)
        )
    )
    assert sum(rebuilt) == 1
    assert await hot.posteriors([experiment_id]) == before
    assert await redis.get(experiment_keys(experiment_id).lock) is None


async def test_rebuild_without_postgres_is_unavailable(
    redis: aioredis.Redis, migrated_pool: asyncpg.Pool, database_url: str
) -> None:
    experiment_id, variants = await create_experiment(migrated_pool)
    closed = await create_pool(database_url, min_size=0, max_size=1)
    await closed.close()
    hot = HotState(redis, closed)
    try:
        with pytest.raises(Unavailable) as info:
            await hot.assign(experiment_id, "u1", variants[0], 0.5)
    finally:
        await hot.close()
    assert info.value.metadata["store"] == "postgres"
    assert await redis.get(experiment_keys(experiment_id).lock) is None


async def test_start_hook_after_redis_lost_its_data_rebuilds_instead_of_resetting(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, variants = await create_experiment(migrated_pool)
    await hot.init_experiment(experiment_id, variants, "conversion")
    await random_traffic(hot, experiment_id, variants, seed=5, subjects=15)
    await WriteBehindFlusher(redis, migrated_pool, "f").drain(timeout=60)
    before = await hot.posteriors([experiment_id])
    await redis.flushdb()

    await hot.init_experiment(experiment_id, variants, "conversion")  # e.g. a catalog refresh
    await hot.init_experiment(experiment_id, variants, "conversion")  # idempotent

    assert await hot.posteriors([experiment_id]) == before
    assert await redis.sismember(STREAM_REGISTRY, experiment_keys(experiment_id).wb)
