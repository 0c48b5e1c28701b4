"""Track with the variant's key (what grpcurl users copy from Assign): accepted, and
errors name the variant the way the caller named it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from server_fixtures import RunningServer

from sira import AsyncClient, FailedPreconditionError, tracked_event
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import tracking_service_pb2 as tpb

TokenFor = Callable[..., str]


@pytest.fixture
async def pay(sira_server: RunningServer, token_for: TokenFor) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(sira_server.address, token=token_for("pay_module", "pay")) as client:
        yield client


@pytest.fixture
async def running(
    sira_server: RunningServer, token_for: TokenFor, unique_key: str
) -> epb.Experiment:
    async with AsyncClient(sira_server.address, token=token_for("ops_admin")) as admin:
        created = await admin.create_experiment(
            epb.Experiment(
                key=unique_key,
                name="by key",
                variants=[epb.Variant(name="Blue", is_control=True), epb.Variant(name="Green")],
            )
        )
        return await admin.start_experiment(created.id)


async def test_track_by_key_and_mismatch_named_by_key(
    pay: AsyncClient, running: epb.Experiment
) -> None:
    got = (await pay.assign(running.key, "k-1")).variant
    other = next(v for v in running.variants if v.id != got.id)
    accepted = await pay.track(
        tracked_event(experiment=running.key, subject_id="k-1", variant_id=got.key)
    )
    assert accepted.outcome == tpb.TRACK_OUTCOME_ACCEPTED
    with pytest.raises(FailedPreconditionError) as by_key:
        await pay.track(
            tracked_event(experiment=running.key, subject_id="k-1", variant_id=other.key)
        )
    assert by_key.value.metadata["variant"] == other.key
    assert by_key.value.metadata["assigned_variant"] == got.key
    assert f"variant '{other.key}'" in by_key.value.message
    assert other.id not in by_key.value.message
    with pytest.raises(FailedPreconditionError) as by_id:
        await pay.track(
            tracked_event(experiment=running.key, subject_id="k-1", variant_id=other.id)
        )
    assert by_id.value.metadata["variant"] == other.id
    assert by_id.value.metadata["assigned_variant"] == got.id
