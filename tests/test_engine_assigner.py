"""The engine decides without gRPC: `Assigner` and `HotStatePreparer` wired to a real
catalog, repository, Postgres and Redis, change events arriving the one way they do in
the server (repository commit -> catalog reload -> listeners)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
import redis.asyncio as aioredis

from sira_server.domain.experiment import Variant
from sira_server.domain.targeting import SubjectProfile
from sira_server.domain.validation import ExperimentInput, VariantInput, validate_experiment
from sira_server.engine.assigner import Assigner, Reason
from sira_server.engine.catalog import ExperimentCatalog
from sira_server.engine.hot_prep import HotStatePreparer
from sira_server.engine.posteriors import PosteriorBook
from sira_server.store.experiments import ExperimentRepository
from sira_server.store.hot_keys import experiment_keys
from sira_server.store.hot_state import HotState

NOBODY = SubjectProfile()


@dataclass
class Wired:
    repository: ExperimentRepository
    catalog: ExperimentCatalog
    assigner: Assigner[str]
    rendered: list[str]
    redis: aioredis.Redis


@pytest.fixture
async def wired(migrated_pool: asyncpg.Pool, redis: aioredis.Redis) -> AsyncIterator[Wired]:
    catalog: ExperimentCatalog | None = None

    async def on_change(experiment_id: str) -> None:
        assert catalog is not None
        await catalog.reload(experiment_id)  # this process only: no pub/sub

    repository = ExperimentRepository(migrated_pool, on_change)
    catalog = ExperimentCatalog(repository, migrated_pool, redis)
    hot = HotState(redis, migrated_pool)
    catalog.add_listener(HotStatePreparer(hot, repository))
    rendered: list[str] = []

    def render(variant: Variant) -> str:
        rendered.append(variant.key)
        return variant.key

    assigner = Assigner(catalog, PosteriorBook(catalog, hot), hot, migrated_pool, render)
    try:
        yield Wired(repository, catalog, assigner, rendered, redis)
    finally:
        await hot.close()


async def started(wired: Wired, key: str) -> str:
    spec = validate_experiment(
        ExperimentInput(
            name="Checkout Button",
            key=key,
            variants=[
                VariantInput(name="Blue", config={}, is_control=True),
                VariantInput(name="Green", config={}),
            ],
        )
    )
    created = await wired.repository.create(spec, actor="mia")
    await wired.repository.start(created.id, actor="mia")
    return created.id


async def redis_state(wired: Wired, experiment_id: str) -> int:
    keys = experiment_keys(experiment_id)
    return int(await wired.redis.exists(keys.meta, keys.trials))


async def test_new_then_sticky_with_variants_rendered_once(wired: Wired) -> None:
    experiment_id = await started(wired, "button-a")
    assert await redis_state(wired, experiment_id) == 2  # prepared on start
    live = await wired.catalog.get(experiment_id)
    first = await wired.assigner.decide(live, "subject-1", NOBODY, lambda: "{}")
    assert first.reason is Reason.NEW
    assert first.variant in ("blue", "green")
    assert first.assigned_ms is not None
    assert 0.0 < first.propensity <= 1.0
    again = await wired.assigner.decide(live, "subject-1", NOBODY, lambda: "{}")
    assert again.reason is Reason.STICKY
    assert (again.variant, again.assigned_ms) == (first.variant, first.assigned_ms)
    assert wired.rendered == ["blue", "green"]  # once per definition, not per call


async def test_a_change_renders_again_and_a_stopped_experiment_concludes(wired: Wired) -> None:
    experiment_id = await started(wired, "button-b")
    live = await wired.catalog.get(experiment_id)
    await wired.assigner.decide(live, "subject-1", NOBODY, lambda: "{}")
    await wired.repository.stop(experiment_id, actor="mia", winner="green")
    stopped = await wired.catalog.get(experiment_id)
    decided = await wired.assigner.decide(stopped, "subject-2", NOBODY, lambda: "{}")
    assert (decided.reason, decided.variant, decided.propensity) == (
        Reason.CONCLUDED,
        "green",
        1.0,
    )
    assert wired.rendered == ["blue", "green", "blue", "green"]


async def test_redis_state_stays_when_archived_and_goes_when_deleted(wired: Wired) -> None:
    archived = await started(wired, "button-c")
    await wired.repository.stop(archived, actor="mia")
    await wired.repository.archive(archived, actor="mia")
    assert await wired.repository.exists(archived)
    assert await redis_state(wired, archived) == 2  # results stay readable

    deleted = await started(wired, "button-d")
    await wired.repository.stop(deleted, actor="mia")
    await wired.repository.delete(deleted, actor="mia")
    assert not await wired.repository.exists(deleted)
    assert await redis_state(wired, deleted) == 0
