"""Two write-behind consumers on one stream, while subjects are assigned and convert at
once: every acknowledged event reaches Postgres.

A metric read by one consumer while the other still holds its assignment is an orphan
and must stay pending. The orphan check once ran after the insert: another consumer's
commit in between (READ COMMITTED) made a skipped metric look written, and it was
acknowledged and lost (about 1 % of the events here). It now runs before the insert.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import redis.asyncio as aioredis
from store_helpers import create_experiment

from sira_server.store.flusher import WriteBehindFlusher, run_restarting
from sira_server.store.hot_state import HotState, TrackEvent, TrackStatus, experiment_keys

WORKERS = 8
SUBJECTS = 150
WAIT_SECONDS = 60.0


async def test_two_consumers_lose_no_metric_whose_assignment_the_other_holds(
    redis: aioredis.Redis, migrated_pool: asyncpg.Pool
) -> None:
    experiment_id, variants = await create_experiment(migrated_pool)
    hot = HotState(redis, migrated_pool)
    await hot.init_experiment(experiment_id, variants, "conversion")
    flushers = [
        WriteBehindFlusher(redis, migrated_pool, f"c{i}", idle_sleep_seconds=0.01) for i in range(2)
    ]
    tasks = [asyncio.create_task(run_restarting(f)) for f in flushers]

    async def subject_converts(worker: int) -> None:
        for n in range(SUBJECTS):
            subject = f"s{worker}-{n}"
            held = await hot.assign(experiment_id, subject, variants[n % 2], 0.5)
            event = TrackEvent(
                subject, held.variant_id, "conversion", f"e-{subject}", time.time_ns() // 10**6
            )
            assert (await hot.track(experiment_id, event)).status is TrackStatus.ACCEPTED

    try:
        await asyncio.gather(*(subject_converts(w) for w in range(WORKERS)))
        deadline = time.monotonic() + WAIT_SECONDS
        while await redis.xlen(experiment_keys(experiment_id).wb):
            assert time.monotonic() < deadline, "the stream did not drain"
            await asyncio.sleep(0.05)
    finally:
        for flusher in flushers:
            flusher.stop()
        await asyncio.gather(*tasks)
        await hot.close()  # its script transport (production's: a channel)
    stored = await migrated_pool.fetchval(
        "SELECT count(*) FROM experiment_metrics WHERE experiment_id = $1", experiment_id
    )
    assert stored == WORKERS * SUBJECTS
