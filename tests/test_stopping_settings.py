"""The stopping rule's settings (fail_fast.error_rate, fail_fast.min_effect): defaults,
validation in the domain and through the real server, and stored experiments that predate
them (migration 0002 gives them the defaults)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import lifecycle_service_pb2 as lpb
from sira.experiments.v1 import lifecycle_service_pb2_grpc
from sira_server.domain.experiment import FailFast
from sira_server.domain.validation import ExperimentInput, VariantInput, validate_experiment
from sira_server.errors import InvalidArgument


def _input(**fail_fast: Any) -> ExperimentInput:
    return ExperimentInput(
        name="Stop rule",
        variants=[VariantInput(name="A", is_control=True), VariantInput(name="B")],
        **fail_fast,
    )


def test_defaults_meet_the_simulated_guarantee() -> None:
    spec = validate_experiment(_input())
    assert spec.fail_fast == FailFast(0.95, 100, False, 0.05, 0.02)
    assert spec.as_json()["fail_fast"]["error_rate"] == 0.05


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"fail_fast_error_rate": 0.0}, "experiment.fail_fast.error_rate"),
        ({"fail_fast_error_rate": 0.6}, "experiment.fail_fast.error_rate"),
        ({"fail_fast_error_rate": math.nan}, "experiment.fail_fast.error_rate"),
        ({"fail_fast_min_effect": 0.0}, "experiment.fail_fast.min_effect"),
        ({"fail_fast_min_effect": 1.0}, "experiment.fail_fast.min_effect"),
        ({"fail_fast_min_effect": -0.1}, "experiment.fail_fast.min_effect"),
    ],
)
def test_out_of_range_settings_are_reported(changes: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_experiment(_input(**changes))
    assert [v.field for v in caught.value.violations] == [field]


def test_edges_are_accepted() -> None:
    spec = validate_experiment(_input(fail_fast_error_rate=0.5, fail_fast_min_effect=0.999))
    assert (spec.fail_fast.error_rate, spec.fail_fast.min_effect) == (0.5, 0.999)


@pytest.fixture
async def lifecycle(
    sira_server: Any, token_for: Callable[..., str]
) -> AsyncIterator[tuple[lifecycle_service_pb2_grpc.LifecycleServiceStub, Any]]:
    auth = (("authorization", f"Bearer {token_for('ops_admin', 'alice')}"),)
    async with grpc.aio.insecure_channel(sira_server.address) as channel:
        yield lifecycle_service_pb2_grpc.LifecycleServiceStub(channel), auth


def _experiment(key: str, fail_fast: epb.FailFastSettings) -> epb.Experiment:
    return epb.Experiment(
        key=key,
        name="Stop rule",
        fail_fast=fail_fast,
        variants=[epb.Variant(name="A", is_control=True), epb.Variant(name="B")],
    )


async def test_settings_round_trip_and_bad_ones_are_invalid_argument(
    lifecycle: tuple[lifecycle_service_pb2_grpc.LifecycleServiceStub, Any], unique_key: str
) -> None:
    stub, auth = lifecycle
    settings = epb.FailFastSettings(auto_stop=True, error_rate=0.01, min_effect=0.005)
    created = (
        await stub.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=_experiment(unique_key, settings)),
            metadata=auth,
        )
    ).experiment
    assert (created.fail_fast.error_rate, created.fail_fast.min_effect) == (0.01, 0.005)
    got = (
        await stub.GetExperiment(lpb.GetExperimentRequest(experiment=unique_key), metadata=auth)
    ).experiment
    assert (got.fail_fast.error_rate, got.fail_fast.min_effect) == (0.01, 0.005)

    # Unset: the defaults.
    plain = (
        await stub.CreateExperiment(
            lpb.CreateExperimentRequest(
                experiment=_experiment(unique_key + "-d", epb.FailFastSettings())
            ),
            metadata=auth,
        )
    ).experiment
    assert (plain.fail_fast.error_rate, plain.fail_fast.min_effect) == (0.05, 0.02)

    bad = epb.FailFastSettings(error_rate=0.9, min_effect=2.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=_experiment(unique_key + "-b", bad)),
            metadata=auth,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    assert status is not None
    fields = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            fields = {v.field: v.description for v in request.field_violations}
    assert set(fields) == {"experiment.fail_fast.error_rate", "experiment.fail_fast.min_effect"}
    assert "0.9" in fields["experiment.fail_fast.error_rate"]


async def test_rows_written_before_migration_0002_read_the_defaults(
    migrated_pool: asyncpg.Pool,
) -> None:
    """An INSERT that names only the 0001 columns (what an older server writes) gets the
    defaults of the new columns."""
    async with migrated_pool.acquire() as conn:
        row = await conn.fetchrow(
            "INSERT INTO experiments (id, key, name, created_by)"
            " VALUES (gen_random_uuid(), $1, 'old', 'test')"
            " RETURNING fail_fast_error_rate, fail_fast_min_effect",
            f"old-{id(conn)}",
        )
        await conn.execute("DELETE FROM experiments WHERE key = $1", f"old-{id(conn)}")
    assert (row["fail_fast_error_rate"], row["fail_fast_min_effect"]) == (0.05, 0.02)
