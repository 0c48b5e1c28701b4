"""`sira-server rebuild <experiment>`: the hot state recomputed from Postgres by an operator."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
import redis.asyncio as aioredis
from store_helpers import create_experiment

from sira_server.cli import main
from sira_server.store.flusher import WriteBehindFlusher
from sira_server.store.hot_state import HotState, TrackEvent, experiment_keys


async def test_rebuild_restores_the_counters_postgres_holds(
    migrated_pool: asyncpg.Pool,
    database_url: str,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    hot = HotState(redis, migrated_pool)
    try:
        experiment_id, variants = await create_experiment(migrated_pool)
        await hot.init_experiment(experiment_id, variants, "conversion")
        for n in range(12):
            await hot.assign(experiment_id, f"s{n}", variants[n % 2], 0.5)
        for n in range(0, 12, 3):
            await hot.track(
                experiment_id,
                TrackEvent(f"s{n}", variants[n % 2], "conversion", f"e{n}", 1_700_000_000_000),
            )
        before = await hot.counters(experiment_id)
        await WriteBehindFlusher(redis, migrated_pool, "t").drain(timeout=10)
        await redis.delete(*experiment_keys(experiment_id).all)

        # The CLI runs its own event loop: give it a thread, as a shell would a process.
        code = await asyncio.to_thread(
            main,
            [
                "rebuild",
                "--json",
                experiment_id,
                "--database-url",
                database_url,
                "--redis-url",
                redis_url,
            ],
        )
        assert code == 0
        report = json.loads(capsys.readouterr().out)
        assert report["assigned_subjects"] == 12
        assert report["successes"] == 4
        assert await hot.counters(experiment_id) == before
    finally:
        await hot.close()
        await redis.aclose()


def test_rebuild_of_an_unknown_experiment_is_one_line(
    database_url: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["rebuild", "no-such", "--database-url", database_url, "--redis-url", redis_url])
    assert code == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: NOT_FOUND: experiment 'no-such' not found"


def test_rebuild_without_urls_says_what_to_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rebuild", "x", "--database-url", "", "--redis-url", ""]) == 2
    assert "SIRA_DATABASE_URL" in capsys.readouterr().err
