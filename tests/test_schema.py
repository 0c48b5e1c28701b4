"""migrations/0001: the rules of the data model hold because Postgres enforces them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

NOW = datetime(2026, 1, 1, tzinfo=UTC)


async def _experiment(pool: asyncpg.Pool, **columns: Any) -> uuid.UUID:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "key": f"exp-{uuid.uuid4().hex[:8]}",
        "name": "Checkout button",
        "created_by": "alice",
        **columns,
    }
    names = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    await pool.execute(f"INSERT INTO experiments ({names}) VALUES ({params})", *values.values())
    experiment_id: uuid.UUID = values["id"]
    return experiment_id


async def _variant(
    pool: asyncpg.Pool, experiment_id: uuid.UUID, key: str, position: int, **columns: Any
) -> uuid.UUID:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "experiment_id": experiment_id,
        "key": key,
        "name": key.title(),
        "position": position,
        **columns,
    }
    names = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    await pool.execute(
        f"INSERT INTO experiment_variants ({names}) VALUES ({params})", *values.values()
    )
    variant_id: uuid.UUID = values["id"]
    return variant_id


async def _assign(
    pool: asyncpg.Pool, experiment_id: uuid.UUID, subject: str, variant_id: uuid.UUID
) -> None:
    await pool.execute(
        "INSERT INTO experiment_assignments (experiment_id, molam_id, variant_id, propensity)"
        " VALUES ($1, $2, $3, 0.5)",
        experiment_id,
        subject,
        variant_id,
    )


async def _metric(
    pool: asyncpg.Pool,
    experiment_id: uuid.UUID,
    event_id: str,
    subject: str,
    variant_id: uuid.UUID,
) -> None:
    await pool.execute(
        "INSERT INTO experiment_metrics"
        " (experiment_id, event_id, variant_id, molam_id, event_type, value, occurred_at)"
        " VALUES ($1, $2, $3, $4, 'conversion', 1, $5)",
        experiment_id,
        event_id,
        variant_id,
        subject,
        NOW,
    )


async def _audit(pool: asyncpg.Pool, experiment_id: uuid.UUID | None = None) -> None:
    await pool.execute(
        "INSERT INTO experiment_audit_logs (experiment_id, actor, action, details)"
        " VALUES ($1, 'alice', 'experiment.created', $2)",
        experiment_id,
        {"key": "exp"},
    )


@pytest.fixture
async def two_arms(migrated_pool: asyncpg.Pool) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """A draft experiment with a control and one treatment: (experiment, control, treatment)."""
    experiment_id = await _experiment(migrated_pool)
    control = await _variant(migrated_pool, experiment_id, "control", 0, is_control=True)
    treatment = await _variant(migrated_pool, experiment_id, "treatment", 1)
    return experiment_id, control, treatment


# --- experiments --------------------------------------------------------------------


async def test_jsonb_round_trips_as_python_objects(migrated_pool: asyncpg.Pool) -> None:
    targeting = {"country": ["SN", "CI"], "min_age": 18, "beta": None}
    experiment_id = await _experiment(migrated_pool, targeting=targeting)
    stored = await migrated_pool.fetchval(
        "SELECT targeting FROM experiments WHERE id = $1", experiment_id
    )
    assert stored == targeting


async def test_experiment_key_is_unique(migrated_pool: asyncpg.Pool) -> None:
    await _experiment(migrated_pool, key="checkout-button")
    with pytest.raises(asyncpg.UniqueViolationError):
        await _experiment(migrated_pool, key="checkout-button")


@pytest.mark.parametrize("percent", [0.0, -1.0, 100.5, float("inf"), float("nan")])
async def test_exposure_percent_outside_0_100_is_rejected(
    migrated_pool: asyncpg.Pool, percent: float
) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await _experiment(migrated_pool, exposure_percent=percent)


@pytest.mark.parametrize("percent", [0.01, 50.0, 100.0])
async def test_exposure_percent_inside_range_is_accepted(
    migrated_pool: asyncpg.Pool, percent: float
) -> None:
    await _experiment(migrated_pool, exposure_percent=percent)


@pytest.mark.parametrize("threshold", [0.5, 0.2, 1.0, 1.5])
async def test_fail_fast_threshold_outside_half_to_one_is_rejected(
    migrated_pool: asyncpg.Pool, threshold: float
) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await _experiment(migrated_pool, fail_fast_threshold=threshold)


async def test_fail_fast_threshold_inside_range_is_accepted(migrated_pool: asyncpg.Pool) -> None:
    await _experiment(migrated_pool, fail_fast_threshold=0.51)
    await _experiment(migrated_pool, fail_fast_threshold=0.99)


@pytest.mark.parametrize("min_samples", [0, -5])
async def test_fail_fast_min_samples_below_one_is_rejected(
    migrated_pool: asyncpg.Pool, min_samples: int
) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await _experiment(migrated_pool, fail_fast_min_samples=min_samples)


async def test_fail_fast_min_samples_of_one_is_accepted(migrated_pool: asyncpg.Pool) -> None:
    await _experiment(migrated_pool, fail_fast_min_samples=1)


async def test_targeting_must_be_a_json_object(migrated_pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await _experiment(migrated_pool, targeting=["not", "an", "object"])


async def test_running_experiment_needs_started_at(migrated_pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await _experiment(migrated_pool, status="running")
    await _experiment(migrated_pool, status="running", started_at=NOW)


async def test_stopped_experiment_needs_stopped_at(migrated_pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await _experiment(migrated_pool, status="stopped", started_at=NOW)


# --- variants -----------------------------------------------------------------------


async def test_at_most_one_control_per_experiment(
    migrated_pool: asyncpg.Pool, two_arms: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    experiment_id, _, _ = two_arms
    with pytest.raises(asyncpg.UniqueViolationError, match="experiment_variants_one_control"):
        await _variant(migrated_pool, experiment_id, "other", 2, is_control=True)
    # Another experiment has its own control.
    other = await _experiment(migrated_pool)
    await _variant(migrated_pool, other, "control", 0, is_control=True)


async def test_variant_key_and_position_unique_per_experiment(
    migrated_pool: asyncpg.Pool, two_arms: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    experiment_id, _, _ = two_arms
    with pytest.raises(asyncpg.UniqueViolationError):
        await _variant(migrated_pool, experiment_id, "treatment", 7)
    with pytest.raises(asyncpg.UniqueViolationError):
        await _variant(migrated_pool, experiment_id, "fresh", 1)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("inf"), float("nan")])
async def test_variant_weight_must_be_positive_and_finite(
    migrated_pool: asyncpg.Pool, weight: float
) -> None:
    experiment_id = await _experiment(migrated_pool)
    with pytest.raises(asyncpg.CheckViolationError):
        await _variant(migrated_pool, experiment_id, "a", 0, weight=weight)


async def test_variant_small_positive_weight_is_accepted(migrated_pool: asyncpg.Pool) -> None:
    experiment_id = await _experiment(migrated_pool)
    await _variant(migrated_pool, experiment_id, "a", 0, weight=1e-9)


@pytest.mark.parametrize("config", [["list"], "text", 3, None])
async def test_variant_config_must_be_a_json_object(
    migrated_pool: asyncpg.Pool, config: object
) -> None:
    experiment_id = await _experiment(migrated_pool)
    with pytest.raises((asyncpg.CheckViolationError, asyncpg.NotNullViolationError)):
        await _variant(migrated_pool, experiment_id, "a", 0, config=config)


async def test_variant_config_object_round_trips(migrated_pool: asyncpg.Pool) -> None:
    experiment_id = await _experiment(migrated_pool)
    config = {"button": {"color": "#00aa00", "label": "Payer"}}
    variant_id = await _variant(migrated_pool, experiment_id, "a", 0, config=config)
    stored = await migrated_pool.fetchval(
        "SELECT config FROM experiment_variants WHERE id = $1", variant_id
    )
    assert stored == config


# --- winner -------------------------------------------------------------------------


async def _stop(pool: asyncpg.Pool, experiment_id: uuid.UUID, winner: uuid.UUID) -> None:
    await pool.execute(
        "UPDATE experiments SET status = 'stopped', started_at = $2, stopped_at = $2,"
        " winner_variant_id = $3 WHERE id = $1",
        experiment_id,
        NOW,
        winner,
    )


async def test_winner_must_belong_to_the_experiment(
    migrated_pool: asyncpg.Pool, two_arms: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    experiment_id, _, treatment = two_arms
    other = await _experiment(migrated_pool)
    foreign = await _variant(migrated_pool, other, "control", 0)

    with pytest.raises(asyncpg.ForeignKeyViolationError, match="experiments_winner_fk"):
        await _stop(migrated_pool, experiment_id, foreign)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await _stop(migrated_pool, experiment_id, uuid.uuid4())

    await _stop(migrated_pool, experiment_id, treatment)
    winner = await migrated_pool.fetchval(
        "SELECT winner_variant_id FROM experiments WHERE id = $1", experiment_id
    )
    assert winner == treatment


async def test_winner_only_once_stopped(
    migrated_pool: asyncpg.Pool, two_arms: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    experiment_id, _, treatment = two_arms
    with pytest.raises(asyncpg.CheckViolationError):
        await migrated_pool.execute(
            "UPDATE experiments SET winner_variant_id = $2 WHERE id = $1",
            experiment_id,
            treatment,
        )


# --- assignments and metrics ----------------------------------------------------------


async def test_one_assignment_per_experiment_and_subject(
    migrated_pool: asyncpg.Pool, two_arms: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    experiment_id, control, treatment = two_arms
    await _assign(migrated_pool, experiment_id, "user-1", control)
    with pytest.raises(asyncpg.UniqueViolationError, match="experiment_assignments_pkey"):
        await _assign(migrated_pool, experiment_id, "user-1", treatment)
    with pytest.raises(asyncpg.UniqueViolationError, match="experiment_assignments_pkey"):
        await _assign(migrated_pool, experiment_id, "user-1", control)
    # The same subject in another experiment is a different assignment.
    other = await _experiment(migrated_pool)
    other_variant = await _variant(migrated_pool, other, "control", 0)
    await _assign(migrated_pool, other, "user-1", other_variant)


async def test_assignment_variant_must_belong_to_the_experiment(
    migrated_pool: asyncpg.Pool, two_arms: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    experiment_id, _, _ = two_arms
    other = await _experiment(migrated_pool)
    foreign = await _variant(migrated_pool, other, "control", 0)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await _assign(migrated_pool, experiment_id, "user-1", foreign)


async def test_event_id_is_unique_per_experiment(
    migrated_pool: asyncpg.Pool, two_arms: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    experiment_id, control, _ = two_arms
    await _assign(migrated_pool, experiment_id, "user-1", control)
    await _metric(migrated_pool, experiment_id, "evt-1", "user-1", control)
    with pytest.raises(asyncpg.UniqueViolationError, match="experiment_metrics_pkey"):
        await _metric(migrated_pool, experiment_id, "evt-1", "user-1", control)
    # Idempotent ingest: a replayed batch is a no-op, not an error.
    status = await migrated_pool.execute(
        "INSERT INTO experiment_metrics"
        " (experiment_id, event_id, variant_id, molam_id, event_type, occurred_at)"
        " VALUES ($1, 'evt-1', $2, 'user-1', 'conversion', $3) ON CONFLICT DO NOTHING",
        experiment_id,
        control,
        NOW,
    )
    assert status == "INSERT 0 0"

    # Event ids are scoped to their experiment.
    other = await _experiment(migrated_pool)
    other_variant = await _variant(migrated_pool, other, "control", 0)
    await _assign(migrated_pool, other, "user-1", other_variant)
    await _metric(migrated_pool, other, "evt-1", "user-1", other_variant)


async def test_metric_for_an_unassigned_subject_is_rejected(
    migrated_pool: asyncpg.Pool, two_arms: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    experiment_id, control, _ = two_arms
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await _metric(migrated_pool, experiment_id, "evt-1", "stranger", control)


async def test_metric_for_another_variant_than_assigned_is_rejected(
    migrated_pool: asyncpg.Pool, two_arms: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    experiment_id, control, treatment = two_arms
    await _assign(migrated_pool, experiment_id, "user-1", control)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await _metric(migrated_pool, experiment_id, "evt-1", "user-1", treatment)
    await _metric(migrated_pool, experiment_id, "evt-1", "user-1", control)


# --- audit log ----------------------------------------------------------------------


async def test_audit_log_accepts_inserts(migrated_pool: asyncpg.Pool) -> None:
    await _audit(migrated_pool)
    await _audit(migrated_pool, uuid.uuid4())  # no foreign key: outlives its experiment
    assert await migrated_pool.fetchval("SELECT count(*) FROM experiment_audit_logs") == 2


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE experiment_audit_logs SET actor = 'mallory'",
        "DELETE FROM experiment_audit_logs",
        "TRUNCATE experiment_audit_logs",
    ],
)
async def test_audit_log_is_append_only(migrated_pool: asyncpg.Pool, statement: str) -> None:
    await _audit(migrated_pool)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await migrated_pool.execute(statement)
    assert await migrated_pool.fetchval("SELECT actor FROM experiment_audit_logs") == "alice"


# --- bandit snapshot ----------------------------------------------------------------


async def test_bandit_state_keeps_successes_within_samples(
    migrated_pool: asyncpg.Pool, two_arms: tuple[uuid.UUID, uuid.UUID, uuid.UUID]
) -> None:
    experiment_id, control, _ = two_arms
    insert = (
        "INSERT INTO experiment_bandit_state"
        " (experiment_id, variant_id, alpha, beta, total_samples, successes)"
        " VALUES ($1, $2, $3, $4, $5, $6)"
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await migrated_pool.execute(insert, experiment_id, control, 1.0, 1.0, 3, 4)
    with pytest.raises(asyncpg.CheckViolationError):
        await migrated_pool.execute(insert, experiment_id, control, 0.5, 1.0, 0, 0)
    await migrated_pool.execute(insert, experiment_id, control, 4.0, 7.0, 9, 3)
