"""Operator tasks that talk to the stores directly (no server needed): `sira rebuild`."""

from __future__ import annotations

from dataclasses import dataclass

from sira_server.store.experiments import ExperimentRepository
from sira_server.store.hot_state import HotState
from sira_server.store.postgres import create_pool
from sira_server.store.redis_conn import create_redis


@dataclass(frozen=True)
class RebuildReport:
    experiment_id: str
    experiment_key: str
    assigned_subjects: int
    successes: int


async def rebuild_hot_state(database_url: str, redis_url: str, ref: str) -> RebuildReport:
    """Recompute an experiment's Redis state from Postgres (plus its unflushed stream)."""
    pool = await create_pool(database_url, max_size=2)
    redis = create_redis(redis_url, max_connections=4)
    try:
        experiment = await ExperimentRepository(pool).get(ref)
        hot = HotState(redis, pool)
        await hot.ensure_ready(experiment.id, force=True)
        counters = await hot.counters(experiment.id)
        return RebuildReport(
            experiment.id,
            experiment.key,
            sum(c.assigned_subjects for c in counters.values()),
            sum(c.successes for c in counters.values()),
        )
    finally:
        await redis.aclose()
        await pool.close()
