"""Operator tasks that talk to the stores directly (no server needed): `sira-server rebuild`,
`sira-server deadletter list|replay`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from sira_server.store.deadletter import (
    DeadLetter,
    ReplayReport,
    list_dead_letters,
    replay_dead_letters,
)
from sira_server.store.experiments import ExperimentRepository
from sira_server.store.hot_state import HotLayout, HotState, held_layout
from sira_server.store.postgres import create_pool
from sira_server.store.redis_conn import create_redis


@dataclass(frozen=True)
class RebuildReport:
    experiment_id: str
    experiment_key: str
    assigned_subjects: int
    successes: int


async def rebuild_hot_state(
    database_url: str, redis_url: str, ref: str, *, redis_cluster: bool = False, shards: int = 1
) -> RebuildReport:
    """Recompute an experiment's Redis state from Postgres (plus its unflushed stream), in
    the layout Redis holds (`shards` when it holds none yet)."""
    pool = await create_pool(database_url, max_size=2)
    redis = create_redis(redis_url, cluster=redis_cluster, max_connections=4)
    try:
        experiment = await ExperimentRepository(pool).get(ref)
        layout = await held_layout(redis) or HotLayout(shards)  # the servers' layout
        hot = HotState(redis, pool, layout=layout)
        try:
            await hot.ensure_ready(experiment.id, force=True)
            counters = await hot.counters(experiment.id)
        finally:
            await hot.close()
        return RebuildReport(
            experiment.id,
            experiment.key,
            sum(c.assigned_subjects for c in counters.values()),
            sum(c.successes for c in counters.values()),
        )
    finally:
        await redis.aclose()
        await pool.close()


@dataclass(frozen=True)
class DeadLetterView:
    """A parked record as `sira-server deadletter list` shows it."""

    experiment_key: str
    letter: DeadLetter


async def _experiment_ids(pool: asyncpg.Pool, ref: str) -> list[str] | None:
    """[id] of the experiment `ref` names (NotFound otherwise); None for every experiment."""
    if not ref:
        return None
    return [(await ExperimentRepository(pool).get(ref)).id]


async def list_dead(
    database_url: str,
    redis_url: str,
    ref: str = "",
    *,
    limit: int = 100,
    redis_cluster: bool = False,
) -> list[DeadLetterView]:
    """`sira-server deadletter list`: parked write-behind records with their experiment's key."""
    pool = await create_pool(database_url, max_size=2)
    redis = create_redis(redis_url, cluster=redis_cluster, max_connections=4)
    try:
        letters = await list_dead_letters(redis, await _experiment_ids(pool, ref), limit=limit)
        rows = await pool.fetch(
            "SELECT id::text AS id, key FROM experiments WHERE id = ANY($1::uuid[])",
            sorted({letter.experiment_id for letter in letters}),
        )
        keys = {row["id"]: row["key"] for row in rows}
        return [DeadLetterView(keys.get(d.experiment_id, "(deleted)"), d) for d in letters]
    finally:
        await redis.aclose()
        await pool.close()


async def replay_dead(
    database_url: str,
    redis_url: str,
    ref: str = "",
    *,
    entry_ids: Sequence[str] = (),
    redis_cluster: bool = False,
) -> ReplayReport:
    """`sira-server deadletter replay`: write parked records again (see store.deadletter)."""
    pool = await create_pool(database_url, max_size=2)
    redis = create_redis(redis_url, cluster=redis_cluster, max_connections=4)
    try:
        return await replay_dead_letters(
            redis, pool, await _experiment_ids(pool, ref), entry_ids=entry_ids
        )
    finally:
        await redis.aclose()
        await pool.close()
