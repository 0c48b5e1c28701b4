"""track.lua takes many events in one call: a batch answers and stores exactly what its
events sent one by one would, and an error fails its own event only."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from store_helpers import CountingTransport, create_experiment, event

from sira_server.errors import Unavailable
from sira_server.store.hot_keys import ExperimentKeys
from sira_server.store.hot_state import (
    REWARDS,
    TRACK_CALL_EVENTS,
    HotLayout,
    HotState,
    TrackEvent,
    TrackOutcome,
    TrackStatus,
    _track_outcome,
    experiment_keys,
    track_call,
)

SUBJECTS = {"s1": 0, "s2": 0, "s3": 1}
"""Subject -> index of its assigned variant; "ghost" has none."""


async def assigned(hot: HotState, pool: asyncpg.Pool, reward: str) -> tuple[str, list[str]]:
    experiment_id, variants = await create_experiment(pool, reward=reward)
    await hot.init_experiment(experiment_id, variants, reward)
    for subject, index in SUBJECTS.items():
        await hot.assign(experiment_id, subject, variants[index], 0.5)
    return experiment_id, variants


def answered(results: Sequence[TrackOutcome | BaseException]) -> list[TrackOutcome]:
    assert all(isinstance(r, TrackOutcome) for r in results), results
    return [r for r in results if isinstance(r, TrackOutcome)]


def mixed_events(a: str, b: str) -> list[TrackEvent]:
    """Every outcome, some of them decided by an earlier event of the same batch."""

    def capped(event_id: str) -> TrackEvent:
        return TrackEvent("s3", b, "click", event_id, 1_700_000_000_000, cap=2)

    return [
        event("s1", a, event_id="c1"),  # accepted, first conversion
        event("s1", a, value=5.0, currency="USD", event_id="c2"),  # accepted, not first
        event("s1", a, event_id="c1"),  # duplicate of the first
        event("ghost", a, event_id="g1"),  # not assigned
        event("s2", b, event_id="m1"),  # mismatch: s2 has a
        capped("k1"),  # accepted (1 of 2 this hour)
        capped("k2"),  # accepted (2 of 2)
        capped("k3"),  # capped, its id left free
        event("s1", a, "refund", value=5.0, currency="USD", event_id="r1"),
        event("s3", b, event_id="c3"),  # first conversion of s3
        event("s2", a, "churn", event_id="h1"),
        capped("k3"),  # the capped id again: capped, not a duplicate
        event("s1", a, event_id="c4"),  # converted again, at the refund's time
        event("s2", a, event_id="c5"),
        event("s2", a, event_id="c5"),
    ]


async def stored(redis: aioredis.Redis, keys: ExperimentKeys, rename: dict[str, str]) -> object:
    """One shard's counters, sets and write-behind metric records, its variant ids
    renamed (so that two experiments compare), without stream ids or receive times."""

    def named(raw: bytes) -> str:
        text = raw.decode()
        for old, new in rename.items():
            text = text.replace(old, new)
        return text

    def table(raw: dict[bytes, bytes]) -> dict[str, str]:
        return {named(k): named(v) for k, v in raw.items()}

    records = [
        {named(k): named(v) for k, v in fields.items() if k != b"rts"}
        for _, fields in await redis.xrange(keys.wb)
        if fields[b"t"] == b"m"
    ]
    return {
        "succ": table(await redis.hgetall(keys.succ)),
        "cnt": table(await redis.hgetall(keys.cnt)),
        "outcome": table(await redis.hgetall(keys.outcome)),
        "sets": [
            sorted(await redis.smembers(key))
            for key in (keys.conv, keys.refunded, keys.churned, keys.events)
        ],
        "records": records,
    }


@pytest.mark.parametrize("shards", [1, 4])
@pytest.mark.parametrize("reward", REWARDS)
async def test_a_batch_answers_and_stores_what_its_events_one_by_one_would(
    hot: HotState,
    redis: aioredis.Redis,
    migrated_pool: asyncpg.Pool,
    reward: str,
    shards: int,
) -> None:
    """With 4 shards the batch goes as one call per shard (subjects s1..s3 spread), the
    events of one subject still in order."""
    hot = HotState(redis, migrated_pool, transport=hot.transport, layout=HotLayout(shards))
    batched, (a, b) = await assigned(hot, migrated_pool, reward)
    single, (a1, b1) = await assigned(hot, migrated_pool, reward)

    in_one_call = answered(await hot.track_many(batched, mixed_events(a, b)))
    one_by_one = [await hot.track(single, e) for e in mixed_events(a1, b1)]

    s = TrackStatus
    assert [(o.status, o.first_conversion) for o in in_one_call] == [
        (s.ACCEPTED, True),
        (s.ACCEPTED, False),
        (s.DUPLICATE, False),
        (s.NOT_ASSIGNED, False),
        (s.MISMATCH, False),
        (s.ACCEPTED, False),
        (s.ACCEPTED, False),
        (s.CAPPED, False),
        (s.ACCEPTED, False),
        (s.ACCEPTED, True),
        (s.ACCEPTED, False),
        (s.CAPPED, False),
        (s.ACCEPTED, False),
        (s.ACCEPTED, True),
        (s.DUPLICATE, False),
    ]
    assert in_one_call[4] == TrackOutcome(s.MISMATCH, assigned_variant_id=a)
    rename = {a1: a, b1: b}
    renamed = [
        TrackOutcome(o.status, o.first_conversion, rename.get(o.assigned_variant_id or ""))
        for o in one_by_one
    ]
    assert renamed == in_one_call
    for mine, theirs in zip(
        hot.layout.all_keys(batched), hot.layout.all_keys(single), strict=True
    ):  # a subject's shard is the same in both experiments
        assert await stored(redis, theirs, rename) == await stored(redis, mine, {})
    # s1's refund came at its conversions' time: with conversion_not_refunded only s2 counts.
    successes = (await hot.counters(batched))[a].successes
    assert successes == (2 if reward == "conversion" else 1)


async def test_a_large_batch_is_one_round_trip_of_calls_of_at_most_the_chunk_size(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    """Order holds across the calls of one round trip: the second call sees the first's
    event ids."""
    experiment_id, (a, _) = await assigned(hot, migrated_pool, "conversion")
    counting = CountingTransport(hot.transport)
    shared = HotState(redis, migrated_pool, transport=counting)
    ids = [f"e{i}" for i in range(TRACK_CALL_EVENTS)]
    events = [event("s1", a, "click", event_id=i) for i in ids] * 2
    events.append(event("s1", a, "click", event_id="last"))

    outcomes = answered(await shared.track_many(experiment_id, events))

    assert counting.round_trips == [3]
    assert [o.status for o in outcomes] == (
        [TrackStatus.ACCEPTED] * TRACK_CALL_EVENTS
        + [TrackStatus.DUPLICATE] * TRACK_CALL_EVENTS
        + [TrackStatus.ACCEPTED]
    )
    assert (await hot.counters(experiment_id))[a].custom == {"click": TRACK_CALL_EVENTS + 1}


async def test_an_error_fails_its_own_event_and_the_rest_of_the_call_runs(
    hot: HotState, redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    """A wrong type under the conversions set (a bug, not the store being down): each
    conversion fails alone, with Redis's error; the other events of the call are stored."""
    experiment_id, (a, b) = await assigned(hot, migrated_pool, "conversion")
    keys = experiment_keys(experiment_id)
    await redis.delete(keys.conv)
    await redis.set(keys.conv, "not a set")

    churn, conversion, click, mismatch = await hot.track_many(
        experiment_id,
        [
            event("s1", a, "churn"),
            event("s2", a, event_id="broken"),
            event("s3", b, "click"),
            event("s3", a),
        ],
    )

    assert churn == TrackOutcome(TrackStatus.ACCEPTED)
    assert isinstance(conversion, redis_errors.ResponseError)
    assert str(conversion).startswith("WRONGTYPE")
    assert click == TrackOutcome(TrackStatus.ACCEPTED)
    assert mismatch == TrackOutcome(TrackStatus.MISMATCH, assigned_variant_id=b)
    records = [f[b"id"] for _, f in await redis.xrange(keys.wb) if f[b"t"] == b"m"]
    assert b"broken" not in records  # no write-behind record: nothing acknowledged
    assert len(records) == 2


def test_one_call_carries_a_cap_key_per_capped_event_only() -> None:
    script_keys, args = track_call(
        experiment_keys("x"),
        [
            TrackEvent("s1", "v", "click", "e1", 1, cap=3),
            TrackEvent("s2", "v", "click", "e2", 1),
            TrackEvent("s3", "v", "click", "e3", 1, cap=3),
        ],
        7_200_000,
    )
    assert [k.rsplit(":", 1)[-1] for k in script_keys[10:]] == ["s1", "s3"]
    assert all(k.startswith("sira:{exp:x}:") for k in script_keys)  # one slot
    assert len(args) == 2 + 3 * 8


@pytest.mark.parametrize(
    "reply",
    [
        b"EREADONLY You can't write against a read only replica.",  # Redis 7
        b"E@user_script: 1: -READONLY You can't write against a read only replica.",  # 6
    ],
)
def test_an_event_refused_by_the_store_is_unavailable_on_every_redis(reply: bytes) -> None:
    outcome = _track_outcome(reply)
    assert isinstance(outcome, Unavailable)
    assert outcome.metadata["store"] == "redis"
