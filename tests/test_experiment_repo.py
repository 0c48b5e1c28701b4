"""ExperimentRepository against a real, freshly migrated Postgres database per test."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from sira_server.domain.experiment import (
    Experiment,
    ExperimentSpec,
    ExperimentStatus,
    Operation,
    VariantSpec,
)
from sira_server.domain.validation import (
    ExperimentInput,
    VariantInput,
    merge_update,
    validate_experiment,
)
from sira_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SiraError,
    Unavailable,
)
from sira_server.store.experiments import ExperimentRepository
from sira_server.store.postgres import create_pool


def checkout_spec(key: str = "", name: str = "Checkout Button Color") -> ExperimentSpec:
    return validate_experiment(
        ExperimentInput(
            name=name,
            key=key,
            targeting={"country": ["SN", "FR"]},
            variants=[
                VariantInput(
                    name="Blue Button", config={"button_color": "#0A84FF"}, is_control=True
                ),
                VariantInput(name="Green Button", config={"button_color": "#34C759"}),
            ],
        )
    )


@pytest.fixture
def changes() -> list[str]:
    return []


@pytest.fixture
def repo(migrated_pool: asyncpg.Pool, changes: list[str]) -> ExperimentRepository:
    async def on_change(experiment_id: str) -> None:
        changes.append(experiment_id)

    return ExperimentRepository(migrated_pool, on_change)


async def counts(pool: asyncpg.Pool) -> dict[str, int]:
    row = await pool.fetchrow(
        """SELECT
            (SELECT count(*) FROM experiments) AS experiments,
            (SELECT count(*) FROM experiment_variants) AS variants,
            (SELECT count(*) FROM experiment_audit_logs) AS audit,
            (SELECT count(*) FROM experiment_bandit_state) AS bandit,
            (SELECT count(*) FROM experiment_assignments) AS assignments,
            (SELECT count(*) FROM experiment_metrics) AS metrics"""
    )
    assert row is not None
    return dict(row)


async def audit_actions(pool: asyncpg.Pool, experiment_id: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT action FROM experiment_audit_logs WHERE experiment_id = $1 ORDER BY id",
        uuid.UUID(experiment_id),
    )
    return [r["action"] for r in rows]


async def in_status(repo: ExperimentRepository, status: ExperimentStatus) -> Experiment:
    """A fresh experiment brought to ``status`` through the repository."""
    experiment = await repo.create(checkout_spec(key=f"e-{uuid.uuid4().hex[:8]}"), actor="alice")
    path = [ExperimentStatus.RUNNING, ExperimentStatus.STOPPED, ExperimentStatus.ARCHIVED]
    steps = {
        ExperimentStatus.RUNNING: repo.start,
        ExperimentStatus.STOPPED: repo.stop,
        ExperimentStatus.ARCHIVED: repo.archive,
    }
    for target in path:
        if experiment.status is status:
            break
        experiment = await steps[target](experiment.id, actor="alice")
    assert experiment.status is status
    return experiment


# --- create and read -----------------------------------------------------------------


async def test_create_then_get_by_id_and_key(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool, changes: list[str]
) -> None:
    created = await repo.create(checkout_spec(), actor="alice")
    assert created.status is ExperimentStatus.DRAFT
    assert created.key == "checkout-button-color"
    assert created.version == 1
    assert created.created_by == "alice"
    assert created.started_at is None
    assert created.spec() == checkout_spec()
    assert [v.key for v in created.variants] == ["blue-button", "green-button"]
    assert [v.position for v in created.variants] == [0, 1]
    assert created.control is not None
    assert created.control.key == "blue-button"
    assert all(v.is_active for v in created.variants)
    assert await repo.get(created.id) == created
    assert await repo.get("checkout-button-color") == created
    assert await repo.get(created.id.upper()) == created
    assert changes == [created.id]
    assert await counts(migrated_pool) == {
        "experiments": 1,
        "variants": 2,
        "audit": 1,
        "bandit": 0,
        "assignments": 0,
        "metrics": 0,
    }
    row = await migrated_pool.fetchrow("SELECT * FROM experiment_audit_logs")
    assert row is not None
    assert (str(row["experiment_id"]), row["actor"], row["action"]) == (
        created.id,
        "alice",
        "created",
    )
    assert row["details"]["experiment"]["key"] == "checkout-button-color"
    assert row["details"]["experiment"]["variants"][1]["config"] == {"button_color": "#34C759"}


@pytest.mark.parametrize("ref", ["nope", str(uuid.uuid4())])
async def test_get_unknown(repo: ExperimentRepository, ref: str) -> None:
    with pytest.raises(NotFound) as caught:
        await repo.get(ref)
    assert caught.value.reason == "ERROR_REASON_EXPERIMENT_NOT_FOUND"
    assert caught.value.metadata == {"experiment": ref}


async def test_a_key_shaped_like_a_uuid_still_resolves(repo: ExperimentRepository) -> None:
    key = str(uuid.uuid4())
    created = await repo.create(checkout_spec(key=key), actor="alice")
    assert (await repo.get(key)).id == created.id


async def test_duplicate_key_is_already_exists(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool
) -> None:
    await repo.create(checkout_spec(), actor="alice")
    with pytest.raises(AlreadyExists) as caught:
        await repo.create(checkout_spec(), actor="bob")
    assert caught.value.reason == "ERROR_REASON_EXPERIMENT_KEY_EXISTS"
    assert caught.value.metadata == {"key": "checkout-button-color"}
    assert (await counts(migrated_pool))["experiments"] == 1
    assert (await counts(migrated_pool))["audit"] == 1


# --- a failed create leaves nothing ----------------------------------------------------


def _bypassing_validation(**changes: Any) -> ExperimentSpec:
    return dataclasses.replace(checkout_spec(), **changes)


@pytest.mark.parametrize(
    ("spec", "actor", "error"),
    [
        pytest.param(
            _bypassing_validation(
                variants=(VariantSpec("same", "A", {}), VariantSpec("same", "B", {}))
            ),
            "alice",
            InvalidArgument,
            id="duplicate variant key caught by the database",
        ),
        pytest.param(
            _bypassing_validation(
                variants=(
                    VariantSpec("a", "A", {}, is_control=True),
                    VariantSpec("b", "B", {}, is_control=True),
                )
            ),
            "alice",
            InvalidArgument,
            id="two controls caught by the database",
        ),
        pytest.param(
            _bypassing_validation(variants=(VariantSpec("a", "A", {}, weight=-1.0),)),
            "alice",
            asyncpg.CheckViolationError,
            id="bad weight caught by the database",
        ),
        pytest.param(
            checkout_spec(), "", asyncpg.CheckViolationError, id="audit insert fails last"
        ),
    ],
)
async def test_failed_create_leaves_nothing(
    repo: ExperimentRepository,
    migrated_pool: asyncpg.Pool,
    changes: list[str],
    spec: ExperimentSpec,
    actor: str,
    error: type[Exception],
) -> None:
    with pytest.raises(error):
        await repo.create(spec, actor=actor)
    assert set((await counts(migrated_pool)).values()) == {0}
    assert changes == []


async def test_duplicate_key_race_leaves_one_experiment(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool
) -> None:
    results = await asyncio.gather(
        *(repo.create(checkout_spec(), actor=f"user{i}") for i in range(3)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Experiment)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert len(losers) == 2
    assert all(isinstance(e, AlreadyExists) for e in losers)
    assert await counts(migrated_pool) == {
        "experiments": 1,
        "variants": 2,
        "audit": 1,
        "bandit": 0,
        "assignments": 0,
        "metrics": 0,
    }


# --- the state machine ---------------------------------------------------------------


async def test_checkout_lifecycle(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool, changes: list[str]
) -> None:
    created = await repo.create(checkout_spec(), actor="alice")

    started = await repo.start("checkout-button-color", actor="bob")
    assert started.status is ExperimentStatus.RUNNING
    assert started.started_at is not None
    assert started.version == 2
    assert started.updated_at >= created.updated_at
    bandit = await migrated_pool.fetch(
        "SELECT variant_id, alpha, beta, total_samples, successes"
        " FROM experiment_bandit_state ORDER BY variant_id"
    )
    assert sorted(str(r["variant_id"]) for r in bandit) == sorted(v.id for v in created.variants)
    assert {(r["alpha"], r["beta"], r["total_samples"], r["successes"]) for r in bandit} == {
        (1.0, 1.0, 0, 0)
    }

    green = started.variants[1]
    stopped = await repo.stop(created.id, actor="carol", winner=green.key, reason="green wins")
    assert stopped.status is ExperimentStatus.STOPPED
    assert stopped.stopped_at is not None
    assert stopped.winner_variant_id == green.id
    assert stopped.winner == green
    assert stopped.stop_reason == "green wins"
    assert stopped.version == 3

    archived = await repo.archive(created.id, actor="alice")
    assert archived.status is ExperimentStatus.ARCHIVED
    assert archived.archived_at is not None
    assert archived.version == 4
    assert archived.winner_variant_id == green.id

    assert await audit_actions(migrated_pool, created.id) == [
        "created",
        "started",
        "stopped",
        "archived",
    ]
    rows = await migrated_pool.fetch("SELECT actor, details FROM experiment_audit_logs ORDER BY id")
    assert [r["actor"] for r in rows] == ["alice", "bob", "carol", "alice"]
    assert rows[1]["details"]["bandit_states_initialized"] == 2
    assert rows[2]["details"]["winner_variant_key"] == "green-button"
    assert rows[2]["details"]["winner_variant_id"] == green.id
    assert rows[2]["details"]["reason"] == "green wins"
    assert rows[2]["details"]["ran_seconds"] >= 0
    assert changes == [created.id] * 4


TRANSITIONS: dict[Operation, Callable[[ExperimentRepository, str], Awaitable[object]]] = {
    Operation.UPDATE: lambda repo, ref: repo.update(
        ref, lambda e: dataclasses.replace(e.spec(), name="Renamed"), actor="dave"
    ),
    Operation.START: lambda repo, ref: repo.start(ref, actor="dave"),
    Operation.STOP: lambda repo, ref: repo.stop(ref, actor="dave"),
    Operation.ARCHIVE: lambda repo, ref: repo.archive(ref, actor="dave"),
    Operation.DELETE: lambda repo, ref: repo.delete(ref, actor="dave"),
}
ALLOWED: dict[Operation, set[ExperimentStatus]] = {
    Operation.UPDATE: {ExperimentStatus.DRAFT},
    Operation.START: {ExperimentStatus.DRAFT},
    Operation.STOP: {ExperimentStatus.RUNNING},
    Operation.ARCHIVE: {ExperimentStatus.STOPPED},
    Operation.DELETE: {ExperimentStatus.DRAFT, ExperimentStatus.STOPPED},
}


@pytest.mark.parametrize("operation", list(Operation), ids=lambda o: o.value)
@pytest.mark.parametrize("status", list(ExperimentStatus), ids=lambda s: s.value)
async def test_every_transition(
    repo: ExperimentRepository,
    migrated_pool: asyncpg.Pool,
    status: ExperimentStatus,
    operation: Operation,
) -> None:
    experiment = await in_status(repo, status)
    before = await counts(migrated_pool)
    audit_before = await audit_actions(migrated_pool, experiment.id)
    if status in ALLOWED[operation]:
        await TRANSITIONS[operation](repo, experiment.key)
        assert await audit_actions(migrated_pool, experiment.id) == [
            *audit_before,
            operation.audit_action.value,
        ]
        if operation is Operation.DELETE:
            with pytest.raises(NotFound):
                await repo.get(experiment.id)
        else:
            after = await repo.get(experiment.id)
            assert after.status is (operation.target or status)
            assert after.version == experiment.version + 1
            assert after.updated_at >= experiment.updated_at
        return
    with pytest.raises(FailedPrecondition) as caught:
        await TRANSITIONS[operation](repo, experiment.key)
    assert caught.value.reason == "ERROR_REASON_INVALID_EXPERIMENT_STATE"
    assert caught.value.metadata == {
        "experiment": experiment.key,
        "status": status.value,
        "allowed_statuses": ",".join(s.value for s in operation.allowed_from),
    }
    assert caught.value.message.startswith(f"experiment '{experiment.key}' is {status.value};")
    assert await repo.get(experiment.id) == experiment  # untouched, same version
    assert await counts(migrated_pool) == before
    assert await audit_actions(migrated_pool, experiment.id) == audit_before


async def test_concurrent_starts_only_one_wins(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool
) -> None:
    experiment = await repo.create(checkout_spec(), actor="alice")
    results = await asyncio.gather(
        *(repo.start(experiment.id, actor=f"user{i}") for i in range(4)),
        return_exceptions=True,
    )
    started = [r for r in results if isinstance(r, Experiment)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(started) == 1
    assert len(refused) == 3
    for error in refused:
        assert isinstance(error, FailedPrecondition)
        assert error.metadata["status"] == "running"
    assert started[0].version == 2
    assert (await counts(migrated_pool))["bandit"] == 2
    assert await audit_actions(migrated_pool, experiment.id) == ["created", "started"]


async def test_concurrent_stop_and_delete_serialize(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool
) -> None:
    experiment = await in_status(repo, ExperimentStatus.RUNNING)
    results = await asyncio.gather(
        repo.stop(experiment.id, actor="a"),
        repo.stop(experiment.id, actor="b"),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["Experiment", "FailedPrecondition"]
    assert await audit_actions(migrated_pool, experiment.id) == ["created", "started", "stopped"]


# --- stop and the winner -------------------------------------------------------------


async def test_stop_with_winner_by_id_and_without_winner(repo: ExperimentRepository) -> None:
    first = await in_status(repo, ExperimentStatus.RUNNING)
    blue = first.variants[0]
    stopped = await repo.stop(first.key, actor="alice", winner=blue.id)
    assert stopped.winner_variant_id == blue.id

    second = await in_status(repo, ExperimentStatus.RUNNING)
    stopped = await repo.stop(second.key, actor="alice")
    assert stopped.winner_variant_id is None
    assert stopped.winner is None
    assert stopped.stop_reason == ""


async def test_stop_with_a_foreign_or_unknown_winner(repo: ExperimentRepository) -> None:
    experiment = await in_status(repo, ExperimentStatus.RUNNING)
    other = await in_status(repo, ExperimentStatus.DRAFT)
    for ref in ("purple-button", other.variants[1].id, str(uuid.uuid4())):
        with pytest.raises(NotFound) as caught:
            await repo.stop(experiment.id, actor="alice", winner=ref)
        assert caught.value.reason == "ERROR_REASON_VARIANT_NOT_FOUND"
        assert caught.value.metadata == {"experiment": experiment.key, "variant": ref}
    assert (await repo.get(experiment.id)).status is ExperimentStatus.RUNNING


async def test_stop_with_a_dropped_winner(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool
) -> None:
    experiment = await in_status(repo, ExperimentStatus.RUNNING)
    green = experiment.variants[1]
    await migrated_pool.execute(
        "UPDATE experiment_variants SET state = 'dropped', dropped_at = now() WHERE id = $1",
        uuid.UUID(green.id),
    )
    reloaded = await repo.get(experiment.id)
    assert [v.key for v in reloaded.active_variants] == ["blue-button"]
    assert reloaded.variants[1].dropped_at is not None
    with pytest.raises(InvalidArgument) as caught:
        await repo.stop(experiment.id, actor="alice", winner="green-button")
    assert caught.value.reason == "ERROR_REASON_VARIANT_NOT_FOUND"
    assert [v.field for v in caught.value.violations] == ["winner_variant"]
    assert (await repo.get(experiment.id)).status is ExperimentStatus.RUNNING


# --- update --------------------------------------------------------------------------


async def test_update_records_before_and_after(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool, changes: list[str]
) -> None:
    experiment = await repo.create(checkout_spec(), actor="alice")
    patch = ExperimentInput(name="Checkout Button Colour", exposure_percent=30.0)
    updated = await repo.update(
        experiment.key,
        lambda e: merge_update(e.spec(), patch, frozenset({"name", "exposure_percent"})),
        actor="bob",
    )
    assert updated.name == "Checkout Button Colour"
    assert updated.key == experiment.key
    assert updated.exposure_percent == 30.0
    assert updated.version == 2
    assert updated.variants == experiment.variants
    row = await migrated_pool.fetchrow(
        "SELECT actor, details FROM experiment_audit_logs WHERE action = 'updated'"
    )
    assert row is not None
    assert row["actor"] == "bob"
    assert row["details"] == {
        "version": 2,
        "name": {"before": "Checkout Button Color", "after": "Checkout Button Colour"},
        "exposure_percent": {"before": 100.0, "after": 30.0},
    }
    assert changes == [experiment.id, experiment.id]


async def test_update_variants_keeps_ids_of_kept_keys(repo: ExperimentRepository) -> None:
    experiment = await repo.create(checkout_spec(), actor="alice")
    blue, green = experiment.variants
    patch = ExperimentInput(
        variants=[
            VariantInput(name="Green Button", weight=3.0),
            VariantInput(name="Red Button", is_control=True),
            VariantInput(name="Blue Button"),
        ]
    )
    updated = await repo.update(
        experiment.id,
        lambda e: merge_update(e.spec(), patch, frozenset({"variants"})),
        actor="alice",
    )
    assert [v.key for v in updated.variants] == ["green-button", "red-button", "blue-button"]
    assert updated.variants[0].id == green.id
    assert updated.variants[2].id == blue.id
    assert updated.variants[1].id not in {blue.id, green.id}
    assert updated.variants[0].weight == 3.0
    assert updated.control == updated.variants[1]
    assert updated.variants[0].config == {}  # replaced whole


async def test_update_that_changes_nothing_writes_nothing(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool
) -> None:
    experiment = await repo.create(checkout_spec(), actor="alice")
    same = await repo.update(experiment.id, lambda e: e.spec(), actor="bob")
    assert same == experiment
    assert await audit_actions(migrated_pool, experiment.id) == ["created"]


async def test_update_validation_error_rolls_back(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool
) -> None:
    experiment = await repo.create(checkout_spec(), actor="alice")
    patch = ExperimentInput(variants=[VariantInput(name="Lonely")])
    with pytest.raises(InvalidArgument):
        await repo.update(
            experiment.id,
            lambda e: merge_update(e.spec(), patch, frozenset({"variants"})),
            actor="alice",
        )
    assert await repo.get(experiment.id) == experiment


# --- lists ---------------------------------------------------------------------------


async def _page_through(
    repo: ExperimentRepository, page_size: int, status: ExperimentStatus | None = None
) -> list[Experiment]:
    seen: list[Experiment] = []
    token = ""
    while True:
        page = await repo.list_experiments(status=status, page_size=page_size, page_token=token)
        assert len(page.items) <= page_size
        seen.extend(page.items)
        token = page.next_page_token
        if not token:
            return seen


async def test_list_pagination_has_no_duplicates_or_gaps(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool
) -> None:
    created = [
        await repo.create(checkout_spec(key=f"exp-{i:02d}"), actor="alice") for i in range(23)
    ]
    # Ties on created_at are broken by id.
    await migrated_pool.execute(
        "UPDATE experiments SET created_at = '2026-01-01T00:00:00Z' WHERE key < 'exp-08'"
    )
    for i in (1, 5, 9):
        await repo.start(created[i].id, actor="alice")

    rows = await migrated_pool.fetch("SELECT id FROM experiments ORDER BY created_at DESC, id DESC")
    expected = [str(r["id"]) for r in rows]
    for page_size in (1, 5, 7, 23, 50):
        listed = await _page_through(repo, page_size)
        assert [e.id for e in listed] == expected
    running = await _page_through(repo, 2, ExperimentStatus.RUNNING)
    assert sorted(e.key for e in running) == ["exp-01", "exp-05", "exp-09"]
    assert all(len(e.variants) == 2 for e in running)
    assert await _page_through(repo, 10, ExperimentStatus.ARCHIVED) == []


async def test_list_is_stable_while_experiments_are_added(repo: ExperimentRepository) -> None:
    for i in range(6):
        await repo.create(checkout_spec(key=f"old-{i}"), actor="alice")
    first = await repo.list_experiments(page_size=3)
    await repo.create(checkout_spec(key="newcomer"), actor="alice")
    second = await repo.list_experiments(page_size=3, page_token=first.next_page_token)
    keys = [e.key for e in (*first.items, *second.items)]
    assert keys == [f"old-{i}" for i in range(5, -1, -1)]
    assert second.next_page_token == ""


@pytest.mark.parametrize("token", ["garbage!", "e30", "eyJxIjoiZXhwZXJpbWVudHM6In0"])
async def test_list_rejects_bad_tokens(repo: ExperimentRepository, token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await repo.list_experiments(page_token=token)
    assert caught.value.reason == "ERROR_REASON_INVALID_PAGE_TOKEN"
    assert [v.field for v in caught.value.violations] == ["page_token"]


async def test_list_rejects_a_token_of_another_filter(repo: ExperimentRepository) -> None:
    for i in range(3):
        await repo.create(checkout_spec(key=f"e{i}"), actor="alice")
    page = await repo.list_experiments(page_size=1)
    with pytest.raises(InvalidArgument) as caught:
        await repo.list_experiments(
            status=ExperimentStatus.DRAFT, page_size=1, page_token=page.next_page_token
        )
    assert caught.value.reason == "ERROR_REASON_INVALID_PAGE_TOKEN"
    with pytest.raises(InvalidArgument):
        await repo.list_audit_events(page_token=page.next_page_token)


async def test_audit_events_newest_first_and_paginated(repo: ExperimentRepository) -> None:
    one = await in_status(repo, ExperimentStatus.ARCHIVED)  # 4 events
    two = await in_status(repo, ExperimentStatus.RUNNING)  # 2 events
    every: list[str] = []
    token = ""
    while True:
        page = await repo.list_audit_events(page_size=4, page_token=token)
        every.extend(f"{e.experiment_id}:{e.action}" for e in page.items)
        token = page.next_page_token
        if not token:
            break
    assert every == [
        f"{two.id}:started",
        f"{two.id}:created",
        f"{one.id}:archived",
        f"{one.id}:stopped",
        f"{one.id}:started",
        f"{one.id}:created",
    ]
    page = await repo.list_audit_events(experiment=one.key, page_size=2)
    assert [e.action for e in page.items] == ["archived", "stopped"]
    rest = await repo.list_audit_events(
        experiment=one.key, page_size=2, page_token=page.next_page_token
    )
    assert [e.action for e in rest.items] == ["started", "created"]
    assert rest.next_page_token == ""
    ids = [e.id for e in (*page.items, *rest.items)]
    assert ids == sorted(ids, reverse=True)
    with pytest.raises(InvalidArgument):  # a token of another experiment's list
        await repo.list_audit_events(experiment=two.key, page_token=page.next_page_token)
    with pytest.raises(NotFound):
        await repo.list_audit_events(experiment="no-such-experiment")


# --- archive stale -------------------------------------------------------------------


async def test_archive_stale(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool, changes: list[str]
) -> None:
    ages = {"s100": 100, "s91": 91, "s10": 10}
    stopped = {}
    for key, days in ages.items():
        experiment = await repo.create(checkout_spec(key=key), actor="alice")
        await repo.start(key, actor="alice")
        await repo.stop(key, actor="alice")
        await migrated_pool.execute(
            "UPDATE experiments SET started_at = now() - make_interval(days => $2 + 5),"
            " stopped_at = now() - make_interval(days => $2) WHERE key = $1",
            key,
            days,
        )
        stopped[key] = await repo.get(experiment.id)
    running = await in_status(repo, ExperimentStatus.RUNNING)
    await migrated_pool.execute(
        "UPDATE experiments SET started_at = now() - interval '400 days' WHERE id = $1",
        uuid.UUID(running.id),
    )
    changes.clear()

    dry = await repo.archive_stale(older_than_days=90, actor="ops", dry_run=True)
    assert [e.key for e in dry] == ["s100", "s91"]
    assert all(e.status is ExperimentStatus.STOPPED for e in dry)
    assert changes == []
    assert (await repo.get("s100")).version == stopped["s100"].version

    archived = await repo.archive_stale(older_than_days=90, actor="ops")
    assert [e.key for e in archived] == ["s100", "s91"]
    assert all(e.status is ExperimentStatus.ARCHIVED for e in archived)
    assert all(e.archived_at is not None for e in archived)
    assert [e.version for e in archived] == [stopped["s100"].version + 1] * 2
    assert sorted(changes) == sorted(e.id for e in archived)
    rows = await migrated_pool.fetch(
        "SELECT actor, details FROM experiment_audit_logs WHERE action = 'archived' ORDER BY id"
    )
    assert [r["actor"] for r in rows] == ["ops", "ops"]
    assert {r["details"]["older_than_days"] for r in rows} == {90}

    assert await repo.archive_stale(older_than_days=90, actor="ops") == []
    assert [e.key for e in await repo.archive_stale(older_than_days=5, actor="ops")] == ["s10"]
    assert (await repo.get(running.id)).status is ExperimentStatus.RUNNING


# --- delete --------------------------------------------------------------------------


async def test_delete_cascades_and_keeps_the_audit_trail(
    repo: ExperimentRepository, migrated_pool: asyncpg.Pool
) -> None:
    keep = await in_status(repo, ExperimentStatus.RUNNING)
    experiment = await in_status(repo, ExperimentStatus.RUNNING)
    for target in (keep, experiment):
        green = uuid.UUID(target.variants[1].id)
        exp_id = uuid.UUID(target.id)
        await migrated_pool.execute(
            "INSERT INTO experiment_assignments (experiment_id, molam_id, variant_id, propensity)"
            " VALUES ($1, 'user-123', $2, 0.5)",
            exp_id,
            green,
        )
        await migrated_pool.execute(
            "INSERT INTO experiment_metrics"
            " (experiment_id, event_id, variant_id, molam_id, event_type, value, occurred_at)"
            " VALUES ($1, 'evt-1', $2, 'user-123', 'conversion', 49.99, now())",
            exp_id,
            green,
        )
    with pytest.raises(FailedPrecondition):
        await repo.delete(experiment.id, actor="root")
    await repo.stop(experiment.id, actor="root", winner="green-button")

    await repo.delete(experiment.key, actor="root")

    assert await counts(migrated_pool) == {
        "experiments": 1,
        "variants": 2,
        "audit": 2 + 4,  # kept: created, started; deleted: created, started, stopped, deleted
        "bandit": 2,
        "assignments": 1,
        "metrics": 1,
    }
    with pytest.raises(NotFound):
        await repo.get(experiment.id)
    trail = await repo.list_audit_events(experiment=experiment.id)
    assert [e.action for e in trail.items] == ["deleted", "stopped", "started", "created"]
    assert trail.items[0].actor == "root"
    assert trail.items[0].details == {
        "key": experiment.key,
        "name": experiment.name,
        "status": "stopped",
        "version": 3,
        "variants": 2,
        "assignments": 1,
        "metrics": 1,
    }
    with pytest.raises(NotFound):  # deleted twice
        await repo.delete(experiment.id, actor="root")


# --- faults --------------------------------------------------------------------------


async def test_on_change_failure_does_not_fail_the_commit(
    migrated_pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(experiment_id: str) -> None:
        raise ConnectionError("redis down")

    repo = ExperimentRepository(migrated_pool, broken)
    experiment = await repo.create(checkout_spec(), actor="alice")
    assert (await repo.get(experiment.id)).status is ExperimentStatus.DRAFT
    assert "on_change" in caplog.text


async def test_unreachable_postgres_is_unavailable() -> None:
    # Nothing listens on port 1; min_size=0 so the pool only connects on acquire.
    pool = await create_pool("postgresql://postgres@127.0.0.1:1/test", min_size=0, max_size=1)
    try:
        repo = ExperimentRepository(pool, acquire_timeout=5.0)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: repo.get("x"),
            lambda: repo.list_experiments(),
            lambda: repo.create(checkout_spec(), actor="alice"),
            lambda: repo.start("x", actor="alice"),
        ]
        for call in calls:
            with pytest.raises(Unavailable) as caught:
                await call()
            assert caught.value.reason == "ERROR_REASON_STORE_UNAVAILABLE"
            assert caught.value.metadata == {"store": "postgres"}
    finally:
        pool.terminate()


async def test_pool_acquire_timeout_is_unavailable(database_url: str) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        repo = ExperimentRepository(pool, acquire_timeout=0.2)
        async with pool.acquire():  # the only connection is busy
            with pytest.raises(Unavailable):
                await repo.get("anything")
        with pytest.raises(SiraError) as caught:  # and usable again afterwards
            await repo.get("anything")
        assert isinstance(caught.value, NotFound)
    finally:
        await pool.close()
