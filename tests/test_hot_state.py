"""Hot state in a real Redis: sticky assignment, tracking rules, reads, failures."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
import uuid
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from store_helpers import CountingTransport, create_experiment, event

from sira_server.errors import NotFound, Unavailable
from sira_server.store.hot_state import (
    STREAM_REGISTRY,
    AssignRequest,
    HotState,
    TrackStatus,
    VariantCounters,
    experiment_keys,
)
from sira_server.store.lua_scripts import LuaScript

# --- fixtures and helpers --------------------------------------------------------------


async def started(
    hot: HotState, pool: asyncpg.Pool, *, variants: int = 2, reward: str = "conversion"
) -> tuple[str, list[str]]:
    experiment_id, variant_ids = await create_experiment(pool, variants=variants, reward=reward)
    await hot.init_experiment(experiment_id, variant_ids, reward)
    return experiment_id, variant_ids


async def snapshot(redis: aioredis.Redis, experiment_id: str) -> dict[str, object]:
    """Every state key's content (not the stream ids): to prove nothing changed."""
    keys = experiment_keys(experiment_id)
    return {
        "trials": await redis.hgetall(keys.trials),
        "succ": await redis.hgetall(keys.succ),
        "cnt": await redis.hgetall(keys.cnt),
        "conv": await redis.smembers(keys.conv),
        "refunded": await redis.smembers(keys.refunded),
        "churned": await redis.smembers(keys.churned),
        "events": await redis.smembers(keys.events),
        "asg": await redis.hgetall(keys.asg),
        "wb": await redis.xlen(keys.wb),
    }


# --- assignment ------------------------------------------------------------------------


async def test_init_registers_stream_group_and_zero_counters(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, variants = await started(hot, migrated_pool, variants=3)
    keys = experiment_keys(experiment_id)
    assert await redis.sismember(STREAM_REGISTRY, keys.wb)
    groups = await redis.xinfo_groups(keys.wb)
    assert [g["name"] for g in groups] == [b"flusher"]
    assert await hot.posteriors([experiment_id]) == {experiment_id: {v: (0, 0) for v in variants}}
    assert await redis.hgetall(keys.meta) == {b"ready": b"1", b"reward": b"conversion"}


async def test_assign_is_sticky_and_counted_once(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, b) = await started(hot, migrated_pool)
    first = await hot.assign(experiment_id, "user-1", a, 0.25, '{"country": "SN"}')
    again = await hot.assign(experiment_id, "user-1", b, 0.75)
    assert first.created
    assert (first.variant_id, first.propensity) == (a, 0.25)
    assert not again.created
    assert (again.variant_id, again.propensity, again.assigned_ms) == (
        a,
        0.25,
        first.assigned_ms,
    )
    assert await hot.posteriors([experiment_id]) == {experiment_id: {a: (1, 0), b: (0, 0)}}
    stored = await hot.get_assignment(experiment_id, "user-1")
    assert stored is not None
    assert (stored.variant_id, stored.propensity) == (a, 0.25)
    assert await hot.get_assignment(experiment_id, "nobody") is None
    entries: Any = await redis.xrange(experiment_keys(experiment_id).wb)
    assert len(entries) == 1
    assert entries[0][1] == {
        b"t": b"a",
        b"s": b"user-1",
        b"v": a.encode(),
        b"p": b"0.25",
        b"ts": str(first.assigned_ms).encode(),
        b"c": b'{"country": "SN"}',
    }


async def test_assign_unknown_variant_is_rejected(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, _ = await started(hot, migrated_pool)
    before = await snapshot(redis, experiment_id)
    with pytest.raises(NotFound) as info:
        await hot.assign(experiment_id, "user-1", str(uuid.uuid4()), 0.5)
    assert info.value.reason == "ERROR_REASON_VARIANT_NOT_FOUND"
    assert await snapshot(redis, experiment_id) == before


CHILD = """
import asyncio, json, random, sys
from sira_server.store.hot_state import HotState
import redis.asyncio as aioredis

async def main():
    url, experiment_id, subject, variants, n = sys.argv[1:6]
    variants = variants.split(",")
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=32, timeout=30)
    client = aioredis.Redis.from_pool(pool)
    hot = HotState(client, None)
    await client.ping()
    print("ready", flush=True)
    while not await client.exists("go:" + experiment_id):
        await asyncio.sleep(0.001)
    outcomes = await asyncio.gather(*(
        hot.assign(experiment_id, subject, random.choice(variants), 0.5) for _ in range(int(n))
    ))
    print(json.dumps([[o.created, o.variant_id] for o in outcomes]), flush=True)
    await hot.close()
    await client.aclose()

asyncio.run(main())
"""


async def test_concurrent_assigns_from_many_processes_yield_one_variant(
    hot: HotState, redis: aioredis.Redis, redis_url: str, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, variants = await started(hot, migrated_pool, variants=4)
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            redis_url,
            experiment_id,
            "contested",
            ",".join(variants),
            "300",
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ},
        )
        for _ in range(2)
    ]
    for child in children:
        assert child.stdout is not None
        assert (await asyncio.wait_for(child.stdout.readline(), 60)).strip() == b"ready"
    await redis.set(f"go:{experiment_id}", 1)
    local = await asyncio.gather(
        *(hot.assign(experiment_id, "contested", random.choice(variants), 0.5) for _ in range(400))
    )
    results = [(o.created, o.variant_id) for o in local]
    for child in children:
        out, _ = await asyncio.wait_for(child.communicate(), 120)
        assert child.returncode == 0
        results += [(created, variant) for created, variant in json.loads(out)]
    assert len(results) == 1000
    assert len({variant for _, variant in results}) == 1
    assert sum(created for created, _ in results) == 1
    posteriors = (await hot.posteriors([experiment_id]))[experiment_id]
    assert sum(trials for trials, _ in posteriors.values()) == 1
    assert posteriors[results[0][1]] == (1, 0)
    assert await redis.xlen(experiment_keys(experiment_id).wb) == 1


# --- tracking --------------------------------------------------------------------------


async def test_track_rejections_change_nothing(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, b) = await started(hot, migrated_pool)
    await hot.assign(experiment_id, "u1", a, 0.5)
    before = await snapshot(redis, experiment_id)
    not_assigned = await hot.track(experiment_id, event("ghost", a, value=5, currency="XOF"))
    mismatch = await hot.track(experiment_id, event("u1", b, value=5, currency="XOF"))
    assert not_assigned.status is TrackStatus.NOT_ASSIGNED
    assert mismatch.status is TrackStatus.MISMATCH
    assert mismatch.assigned_variant_id == a
    assert await snapshot(redis, experiment_id) == before


async def test_duplicate_event_id_counts_once(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, _) = await started(hot, migrated_pool)
    await hot.assign(experiment_id, "u1", a, 0.5)
    first = await hot.track(experiment_id, event("u1", a, event_id="e-1", value=10, currency="EUR"))
    before = await snapshot(redis, experiment_id)
    second = await hot.track(
        experiment_id, event("u1", a, event_id="e-1", value=10, currency="EUR")
    )
    assert first.status is TrackStatus.ACCEPTED
    assert first.first_conversion
    assert second.status is TrackStatus.DUPLICATE
    assert await snapshot(redis, experiment_id) == before
    counters = (await hot.counters(experiment_id))[a]
    assert (counters.conversions, counters.revenue) == (1, {"EUR": 10.0})


async def test_only_the_first_conversion_is_a_success(
    hot: HotState, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, b) = await started(hot, migrated_pool)
    for subject in ("u1", "u2", "u3"):
        await hot.assign(experiment_id, subject, a, 0.5)
    await hot.assign(experiment_id, "u4", b, 0.5)
    outcomes = [
        await hot.track(experiment_id, event("u1", a, value=10, currency="XOF")),
        await hot.track(experiment_id, event("u1", a, value=2.5, currency="XOF")),
        await hot.track(experiment_id, event("u1", a, value=3, currency="EUR")),
        await hot.track(experiment_id, event("u2", a)),
        await hot.track(experiment_id, event("u2", a, "churn")),
        await hot.track(experiment_id, event("u2", a, "churn")),
        await hot.track(experiment_id, event("u3", a, "add_to_cart")),
        await hot.track(experiment_id, event("u3", a, "add_to_cart")),
        await hot.track(experiment_id, event("u3", a, "refund", value=4, currency="XOF")),
    ]
    assert [o.status for o in outcomes] == [TrackStatus.ACCEPTED] * 9
    assert [o.first_conversion for o in outcomes] == [True, False, False, True] + [False] * 5
    assert await hot.posteriors([experiment_id]) == {experiment_id: {a: (3, 2), b: (1, 0)}}
    counters = await hot.counters(experiment_id)
    assert counters[a] == VariantCounters(
        assigned_subjects=3,
        successes=2,
        conversions=4,
        converted_subjects=2,
        refunds=1,
        refunded_subjects=1,
        churns=2,
        churned_subjects=1,
        revenue={"XOF": 12.5, "EUR": 3.0},
        refund_amount={"XOF": 4.0},
        custom={"add_to_cart": 2},
    )
    assert counters[b] == VariantCounters(assigned_subjects=1)


async def test_refund_retracts_the_success_with_conversion_not_refunded(
    hot: HotState, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, _) = await started(hot, migrated_pool, reward="conversion_not_refunded")
    for subject in ("converts", "refunds-first", "keeps"):
        await hot.assign(experiment_id, subject, a, 0.5)
    await hot.track(experiment_id, event("converts", a))
    await hot.track(experiment_id, event("keeps", a))
    assert (await hot.posteriors([experiment_id]))[experiment_id][a] == (3, 2)
    await hot.track(experiment_id, event("converts", a, "refund"))
    await hot.track(experiment_id, event("converts", a, "refund"))  # second refund: no-op
    assert (await hot.posteriors([experiment_id]))[experiment_id][a] == (3, 1)
    # A refund arriving before its conversion: the conversion never counts.
    await hot.track(experiment_id, event("refunds-first", a, "refund"))
    outcome = await hot.track(experiment_id, event("refunds-first", a))
    assert outcome.first_conversion
    counters = (await hot.counters(experiment_id))[a]
    assert (counters.successes, counters.converted_subjects, counters.refunded_subjects) == (
        1,
        3,
        2,
    )


async def test_refund_keeps_the_success_with_plain_conversion_reward(
    hot: HotState, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, _) = await started(hot, migrated_pool, reward="conversion")
    await hot.assign(experiment_id, "u1", a, 0.5)
    await hot.track(experiment_id, event("u1", a))
    await hot.track(experiment_id, event("u1", a, "refund"))
    assert (await hot.posteriors([experiment_id]))[experiment_id][a] == (1, 1)


async def test_track_many_reports_each_event_in_order(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, b) = await started(hot, migrated_pool)
    await hot.assign(experiment_id, "u1", a, 0.5)
    await hot.assign(experiment_id, "u2", b, 0.5)
    outcomes = await hot.track_many(
        experiment_id,
        [
            event("u1", a, event_id="x1"),
            event("u1", a, event_id="x1"),  # same id in the same batch
            event("u2", a, event_id="x2"),
            event("ghost", b, event_id="x3"),
            event("u2", b, event_id="x4"),
            event("u2", b, event_id="x5"),
        ],
    )
    assert [o.status for o in outcomes] == [
        TrackStatus.ACCEPTED,
        TrackStatus.DUPLICATE,
        TrackStatus.MISMATCH,
        TrackStatus.NOT_ASSIGNED,
        TrackStatus.ACCEPTED,
        TrackStatus.ACCEPTED,
    ]
    assert [o.first_conversion for o in outcomes] == [True, False, False, False, True, False]
    assert await hot.posteriors([experiment_id]) == {experiment_id: {a: (1, 1), b: (1, 1)}}
    assert await redis.xlen(experiment_keys(experiment_id).wb) == 2 + 3


async def test_posteriors_read_many_experiments(hot: HotState, migrated_pool: asyncpg.Pool) -> None:
    first, (a, b) = await started(hot, migrated_pool)
    second, (c, d, e) = await started(hot, migrated_pool, variants=3)
    await hot.assign(first, "u1", b, 0.5)
    await hot.track(first, event("u1", b))
    await hot.assign(second, "u1", e, 0.5)
    unknown = str(uuid.uuid4())
    assert await hot.posteriors([first, second, unknown]) == {
        first: {a: (0, 0), b: (1, 1)},
        second: {c: (0, 0), d: (0, 0), e: (1, 0)},
    }


async def test_drop_experiment_removes_every_key(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, _) = await started(hot, migrated_pool)
    kept, _ = await started(hot, migrated_pool)
    await hot.assign(experiment_id, "u1", a, 0.5)
    await hot.track(experiment_id, event("u1", a))
    await hot.drop_experiment(experiment_id)
    assert not await redis.keys(f"sira:{{exp:{experiment_id}}}:*")
    assert await redis.smembers(STREAM_REGISTRY) == {experiment_keys(kept).wb.encode()}


# --- scripts and failures --------------------------------------------------------------


def unseen_script(name: str) -> LuaScript:
    """A variant of the script Redis has never seen (SCRIPT FLUSH would hit other tests)."""
    script = LuaScript(name)
    script.source += f"\n-- {uuid.uuid4()}\n"
    script.sha = hashlib.sha1(script.source.encode()).hexdigest()
    return script


async def test_scripts_are_reloaded_after_noscript(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    """On the transport itself, single call and batch: NOSCRIPT loads the script and
    re-runs only the calls that did not run."""
    experiment_id, (a, _) = await started(hot, migrated_pool)
    keys = experiment_keys(experiment_id)
    assign_keys = (keys.meta, keys.asg, keys.trials, keys.wb)
    single = await hot.transport.run(
        unseen_script("assign.lua"), [(assign_keys, ("u1", a, "0.5", 1, "{}"))]
    )
    assert single[0][0] == b"C"
    calls = [(assign_keys, ("u1", a, "0.5", 1, "{}")), (assign_keys, ("u9", a, "0.5", 1, "{}"))]
    replies = await hot.transport.run(unseen_script("assign.lua"), calls)
    assert [r[0] for r in replies] == [b"E", b"C"]


async def test_redis_down_raises_unavailable(migrated_pool: asyncpg.Pool) -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    hot = HotState(client, migrated_pool)
    try:
        with pytest.raises(Unavailable) as info:
            await hot.assign(str(uuid.uuid4()), "u1", str(uuid.uuid4()), 0.5)
        assert info.value.reason == "ERROR_REASON_STORE_UNAVAILABLE"
        assert info.value.metadata["store"] == "redis"
        with pytest.raises(Unavailable):
            await hot.track(str(uuid.uuid4()), event("u1", str(uuid.uuid4())))
        with pytest.raises(Unavailable):
            await hot.posteriors([str(uuid.uuid4())])
    finally:
        await hot.close()
        await client.aclose()


async def test_unknown_experiment_without_state_is_not_found(hot: HotState) -> None:
    with pytest.raises(NotFound):
        await hot.assign(str(uuid.uuid4()), "u1", str(uuid.uuid4()), 0.5)


# --- one send path for Track and TrackBatch ------------------------------------------------


async def test_track_and_track_batch_events_share_one_round_trip(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    """`track` (Track) and `track_each` (TrackBatch) join the same per-experiment batches:
    while a round trip is on the wire, the Tracks and a TrackBatch's events that arrive
    leave together in the next, as one script call (track.lua takes many events)."""
    experiment_id, (a, b) = await started(hot, migrated_pool)
    for subject in ("u1", "u2", "u3"):
        await hot.assign(experiment_id, subject, a, 0.5)
    counting = CountingTransport(hot.transport)
    shared = HotState(redis, migrated_pool, transport=counting)
    first, second, third, batch = await asyncio.gather(
        shared.track(experiment_id, event("u1", a)),
        shared.track(experiment_id, event("u2", a)),
        shared.track(experiment_id, event("u3", a)),
        shared.track_each(
            [(experiment_id, event("u1", a, "refund")), (experiment_id, event("u2", b))]
        ),
    )
    assert counting.round_trips == [1, 1]
    assert {first.status, second.status, third.status} == {TrackStatus.ACCEPTED}
    refund, mismatch = batch
    assert refund.status is TrackStatus.ACCEPTED
    assert mismatch.status is TrackStatus.MISMATCH  # answered on its own
    assert (await hot.counters(experiment_id))[a].refunds == 1


async def test_assign_many_and_track_many_answer_per_item(
    hot: HotState, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, (a, _) = await started(hot, migrated_pool)
    outcomes = await hot.assign_many(
        experiment_id,
        [AssignRequest("u1", a, 0.5), AssignRequest("u2", "no-such-variant", 0.5)],
    )
    assert outcomes[0].created
    assert isinstance(outcomes[1], NotFound)
    accepted, not_assigned = await hot.track_many(experiment_id, [event("u1", a), event("u2", a)])
    assert accepted.status is TrackStatus.ACCEPTED
    assert not_assigned.status is TrackStatus.NOT_ASSIGNED


async def test_a_batch_over_two_experiments_is_one_round_trip_each_answered_in_order(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    first, (a, _) = await started(hot, migrated_pool)
    second, (c, _) = await started(hot, migrated_pool)
    await hot.assign(first, "u1", a, 0.5)
    await hot.assign(second, "u1", c, 0.5)
    counting = CountingTransport(hot.transport)
    shared = HotState(redis, migrated_pool, transport=counting)
    outcomes = await shared.track_each(
        [
            (first, event("u1", a, event_id="x")),
            (second, event("u1", c, event_id="x")),
            (first, event("u1", a, event_id="x")),  # the same id again: a duplicate
        ]
    )
    assert [o.status for o in outcomes] == [
        TrackStatus.ACCEPTED,
        TrackStatus.ACCEPTED,
        TrackStatus.DUPLICATE,
    ]
    assert counting.round_trips == [1, 1]  # one call each, the first with both its events
