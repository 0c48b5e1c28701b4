"""LifecycleService end to end: a real `sira-server` subprocess, real JWTs, real Postgres.

The server is shared by the session, so every test uses its own experiment keys.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import lifecycle_service_pb2 as pb
from sira.experiments.v1 import lifecycle_service_pb2_grpc

TokenFor = Callable[..., str]


class Client:
    """The LifecycleService stub with a bearer token per role."""

    def __init__(self, channel: grpc.aio.Channel, token_for: TokenFor) -> None:
        self.stub = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
        self._token_for = token_for

    def auth(self, role: str = "marketing", subject: str = "mia") -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self._token_for(role, subject)}"),)


@pytest.fixture
async def client(sira_server: Any, token_for: TokenFor) -> AsyncIterator[Client]:
    async with grpc.aio.insecure_channel(sira_server.address) as channel:
        yield Client(channel, token_for)


def checkout_button_color(key: str) -> epb.Experiment:
    """The seed's use case 2, with a test-unique key."""

    def config(**values: str) -> struct_pb2.Struct:
        s = struct_pb2.Struct()
        s.update(values)
        return s

    return epb.Experiment(
        key=key,
        name="Checkout Button Color",
        targeting=epb.Targeting(countries=["SN", "FR"]),
        variants=[
            epb.Variant(name="Blue Button", config=config(button_color="#0A84FF"), is_control=True),
            epb.Variant(name="Green Button", config=config(button_color="#34C759")),
        ],
    )


class RpcError:
    """What a client sees of a failed call: code, ErrorInfo and BadRequest."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        self.code = error.code()
        self.message = error.details()
        status = rpc_status.from_call(error)
        assert status is not None, "no google.rpc.Status details"
        self.info = error_details_pb2.ErrorInfo()
        self.violations: dict[str, str] = {}
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(self.info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.violations = {v.field: v.description for v in bad.field_violations}
        assert self.info.domain == "sira.experiments.v1"

    @property
    def reason(self) -> str:
        reason: str = self.info.reason
        return reason

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.info.metadata)


async def fails(call: Any) -> RpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return RpcError(caught.value)


async def test_checkout_button_color_lifecycle(client: Client, unique_key: str) -> None:
    stub, auth = client.stub, client.auth()

    created = (
        await stub.CreateExperiment(
            pb.CreateExperimentRequest(experiment=checkout_button_color(unique_key)),
            metadata=auth,
        )
    ).experiment
    assert created.status == epb.EXPERIMENT_STATUS_DRAFT
    assert created.key == unique_key
    assert uuid.UUID(created.id)
    assert created.created_by == "mia"
    assert created.version == 1
    assert created.allocation == epb.ALLOCATION_STRATEGY_THOMPSON_SAMPLING
    assert created.reward == epb.REWARD_DEFINITION_CONVERSION
    assert created.exposure_percent == 100
    assert created.primary_metric == "conversion"
    assert (created.fail_fast.threshold, created.fail_fast.min_samples) == (0.95, 100)
    assert list(created.targeting.countries) == ["FR", "SN"]
    assert [v.key for v in created.variants] == ["blue-button", "green-button"]
    assert [v.weight for v in created.variants] == [1.0, 1.0]
    assert all(v.state == epb.VARIANT_STATE_ACTIVE for v in created.variants)
    assert created.variants[1].config["button_color"] == "#34C759"
    assert created.HasField("create_time")
    assert not created.HasField("start_time")

    got = await stub.GetExperiment(pb.GetExperimentRequest(experiment=unique_key), metadata=auth)
    assert got.experiment == created
    reader = client.auth("data_science", "dana")
    got = await stub.GetExperiment(pb.GetExperimentRequest(experiment=created.id), metadata=reader)
    assert got.experiment == created

    started = (
        await stub.StartExperiment(pb.StartExperimentRequest(experiment=unique_key), metadata=auth)
    ).experiment
    assert started.status == epb.EXPERIMENT_STATUS_RUNNING
    assert started.HasField("start_time")
    assert started.version == 2

    green = started.variants[1]
    stopped = (
        await stub.StopExperiment(
            pb.StopExperimentRequest(
                experiment=created.id, winner_variant="green-button", reason="green converts"
            ),
            metadata=auth,
        )
    ).experiment
    assert stopped.status == epb.EXPERIMENT_STATUS_STOPPED
    assert stopped.winner_variant_id == green.id
    assert stopped.stop_reason == "green converts"
    assert stopped.HasField("stop_time")

    archived = (
        await stub.ArchiveExperiment(
            pb.ArchiveExperimentRequest(experiment=unique_key), metadata=auth
        )
    ).experiment
    assert archived.status == epb.EXPERIMENT_STATUS_ARCHIVED
    assert archived.HasField("archive_time")
    assert archived.version == 4

    events = (
        await stub.ListAuditEvents(pb.ListAuditEventsRequest(experiment=unique_key), metadata=auth)
    ).events
    assert [e.action for e in events] == ["archived", "stopped", "started", "created"]
    assert {e.actor for e in events} == {"mia"}
    assert {e.experiment_id for e in events} == {created.id}
    assert events[1].details["winner_variant_key"] == "green-button"
    assert events[1].details["reason"] == "green converts"

    listed = await list_all(client, epb.EXPERIMENT_STATUS_ARCHIVED)
    assert unique_key in [e.key for e in listed]
    assert all(e.status == epb.EXPERIMENT_STATUS_ARCHIVED for e in listed)


async def list_all(client: Client, status: int = 0) -> list[epb.Experiment]:
    out: list[epb.Experiment] = []
    token = ""
    while True:
        page = await client.stub.ListExperiments(
            pb.ListExperimentsRequest(status=status, page_size=3, page_token=token),  # type: ignore[arg-type]
            metadata=client.auth(),
        )
        out.extend(page.experiments)
        token = page.next_page_token
        if not token:
            return out


async def test_list_pages_have_no_duplicates(client: Client, unique_key: str) -> None:
    for i in range(4):
        experiment = checkout_button_color(f"{unique_key}-{i}")
        await client.stub.CreateExperiment(
            pb.CreateExperimentRequest(experiment=experiment), metadata=client.auth()
        )
    listed = await list_all(client)
    ids = [e.id for e in listed]
    assert len(ids) == len(set(ids))
    mine = [e.key for e in listed if e.key.startswith(unique_key)]
    assert mine == [f"{unique_key}-{i}" for i in (3, 2, 1, 0)]  # newest first


async def test_invalid_experiment_lists_every_violation(client: Client) -> None:
    experiment = epb.Experiment(
        name="",
        exposure_percent=150,
        fail_fast=epb.FailFastSettings(threshold=0.3),
        targeting=epb.Targeting(countries=["SN", "ZZ"]),
        variants=[
            epb.Variant(name="A", weight=-2),
            epb.Variant(name="B", is_control=True),
            epb.Variant(name="B"),
        ],
    )
    error = await fails(
        client.stub.CreateExperiment(
            pb.CreateExperimentRequest(experiment=experiment), metadata=client.auth()
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "ERROR_REASON_INVALID_ARGUMENT"
    assert set(error.violations) == {
        "experiment.name",
        "experiment.exposure_percent",
        "experiment.fail_fast.threshold",
        "experiment.targeting.countries[1]",
        "experiment.variants[0].weight",
        "experiment.variants[2].key",
    }
    assert "duplicate variant key 'b'" in error.violations["experiment.variants[2].key"]


async def test_a_single_variant_is_rejected(client: Client, unique_key: str) -> None:
    experiment = checkout_button_color(unique_key)
    del experiment.variants[1]
    error = await fails(
        client.stub.CreateExperiment(
            pb.CreateExperimentRequest(experiment=experiment), metadata=client.auth()
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == ["experiment.variants"]


async def test_duplicate_key_is_already_exists(client: Client, unique_key: str) -> None:
    request = pb.CreateExperimentRequest(experiment=checkout_button_color(unique_key))
    await client.stub.CreateExperiment(request, metadata=client.auth())
    error = await fails(client.stub.CreateExperiment(request, metadata=client.auth()))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.reason == "ERROR_REASON_EXPERIMENT_KEY_EXISTS"
    assert error.metadata == {"key": unique_key}


async def test_unknown_experiment_is_not_found(client: Client) -> None:
    for ref in ("no-such-experiment", str(uuid.uuid4())):
        error = await fails(
            client.stub.GetExperiment(
                pb.GetExperimentRequest(experiment=ref), metadata=client.auth()
            )
        )
        assert error.code == grpc.StatusCode.NOT_FOUND
        assert error.reason == "ERROR_REASON_EXPERIMENT_NOT_FOUND"
        assert error.metadata == {"experiment": ref}
    error = await fails(
        client.stub.GetExperiment(pb.GetExperimentRequest(experiment=""), metadata=client.auth())
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == ["experiment"]


async def test_wrong_state_is_failed_precondition(client: Client, unique_key: str) -> None:
    stub, auth = client.stub, client.auth()
    await stub.CreateExperiment(
        pb.CreateExperimentRequest(experiment=checkout_button_color(unique_key)), metadata=auth
    )
    error = await fails(
        stub.ArchiveExperiment(pb.ArchiveExperimentRequest(experiment=unique_key), metadata=auth)
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.metadata == {
        "experiment": unique_key,
        "status": "draft",
        "allowed_statuses": "stopped",
    }

    await stub.StartExperiment(pb.StartExperimentRequest(experiment=unique_key), metadata=auth)
    for call in (
        stub.StartExperiment(pb.StartExperimentRequest(experiment=unique_key), metadata=auth),
        stub.UpdateExperiment(
            pb.UpdateExperimentRequest(
                experiment=epb.Experiment(key=unique_key, name="Renamed"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            metadata=auth,
        ),
        stub.DeleteExperiment(
            pb.DeleteExperimentRequest(experiment=unique_key),
            metadata=client.auth("ops_admin", "olga"),
        ),
    ):
        error = await fails(call)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "ERROR_REASON_INVALID_EXPERIMENT_STATE"
        assert error.metadata["status"] == "running"
    assert error.message == (
        f"experiment '{unique_key}' is running; only draft or stopped experiments can be deleted"
    )


async def test_stop_with_an_unknown_winner(client: Client, unique_key: str) -> None:
    stub, auth = client.stub, client.auth()
    await stub.CreateExperiment(
        pb.CreateExperimentRequest(experiment=checkout_button_color(unique_key)), metadata=auth
    )
    await stub.StartExperiment(pb.StartExperimentRequest(experiment=unique_key), metadata=auth)
    error = await fails(
        stub.StopExperiment(
            pb.StopExperimentRequest(experiment=unique_key, winner_variant="purple-button"),
            metadata=auth,
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "ERROR_REASON_VARIANT_NOT_FOUND"
    assert error.metadata == {"experiment": unique_key, "variant": "purple-button"}
    got = await stub.GetExperiment(pb.GetExperimentRequest(experiment=unique_key), metadata=auth)
    assert got.experiment.status == epb.EXPERIMENT_STATUS_RUNNING


async def test_update_a_draft_with_a_mask(client: Client, unique_key: str) -> None:
    stub, auth = client.stub, client.auth()
    created = (
        await stub.CreateExperiment(
            pb.CreateExperimentRequest(experiment=checkout_button_color(unique_key)),
            metadata=auth,
        )
    ).experiment
    patch = epb.Experiment(
        id=created.id,
        name="Checkout Button Colour",
        exposure_percent=25,
        description="ignored: not in the mask",
    )
    updated = (
        await stub.UpdateExperiment(
            pb.UpdateExperimentRequest(
                experiment=patch,
                update_mask=field_mask_pb2.FieldMask(paths=["name", "exposure_percent"]),
            ),
            metadata=auth,
        )
    ).experiment
    assert updated.name == "Checkout Button Colour"
    assert updated.exposure_percent == 25
    assert updated.description == ""
    assert updated.variants == created.variants
    assert updated.version == 2

    error = await fails(
        stub.UpdateExperiment(
            pb.UpdateExperimentRequest(
                experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["colour", "key"])
            ),
            metadata=auth,
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(error.violations) == {"update_mask.paths[0]", "update_mask.paths[1]"}

    # An empty mask replaces everything: here with fewer variants than allowed.
    error = await fails(
        stub.UpdateExperiment(
            pb.UpdateExperimentRequest(experiment=epb.Experiment(id=created.id, name="X")),
            metadata=auth,
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == ["experiment.variants"]


async def test_bad_page_token_and_size(client: Client) -> None:
    error = await fails(
        client.stub.ListExperiments(
            pb.ListExperimentsRequest(page_token="not-a-token"), metadata=client.auth()
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "ERROR_REASON_INVALID_PAGE_TOKEN"
    assert list(error.violations) == ["page_token"]
    error = await fails(
        client.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=1001), metadata=client.auth()
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == ["page_size"]


async def test_delete_and_archive_stale(
    client: Client, unique_key: str, sira_server_database_url: str
) -> None:
    stub, auth, admin = client.stub, client.auth(), client.auth("ops_admin", "olga")
    draft_key, stale_key = f"{unique_key}-draft", f"{unique_key}-stale"
    for key in (draft_key, stale_key):
        await stub.CreateExperiment(
            pb.CreateExperimentRequest(experiment=checkout_button_color(key)), metadata=auth
        )
    error = await fails(
        stub.DeleteExperiment(pb.DeleteExperimentRequest(experiment=draft_key), metadata=auth)
    )
    assert error.code == grpc.StatusCode.PERMISSION_DENIED  # marketing may not delete
    await stub.DeleteExperiment(pb.DeleteExperimentRequest(experiment=draft_key), metadata=admin)
    error = await fails(
        stub.GetExperiment(pb.GetExperimentRequest(experiment=draft_key), metadata=auth)
    )
    assert error.code == grpc.StatusCode.NOT_FOUND

    await stub.StartExperiment(pb.StartExperimentRequest(experiment=stale_key), metadata=auth)
    await stub.StopExperiment(pb.StopExperimentRequest(experiment=stale_key), metadata=auth)
    conn = await asyncpg.connect(sira_server_database_url)
    try:
        await conn.execute(
            "UPDATE experiments SET started_at = now() - interval '120 days',"
            " stopped_at = now() - interval '100 days' WHERE key = $1",
            stale_key,
        )
    finally:
        await conn.close()

    error = await fails(
        stub.ArchiveStaleExperiments(
            pb.ArchiveStaleExperimentsRequest(older_than_days=-1), metadata=admin
        )
    )
    assert list(error.violations) == ["older_than_days"]
    dry = await stub.ArchiveStaleExperiments(
        pb.ArchiveStaleExperimentsRequest(dry_run=True), metadata=admin
    )
    assert stale_key in [e.key for e in dry.experiments]
    assert all(e.status == epb.EXPERIMENT_STATUS_STOPPED for e in dry.experiments)
    done = await stub.ArchiveStaleExperiments(pb.ArchiveStaleExperimentsRequest(), metadata=admin)
    mine = [e for e in done.experiments if e.key == stale_key]
    assert len(mine) == 1
    assert mine[0].status == epb.EXPERIMENT_STATUS_ARCHIVED
    events = (
        await stub.ListAuditEvents(pb.ListAuditEventsRequest(experiment=stale_key), metadata=auth)
    ).events
    assert (events[0].action, events[0].actor) == ("archived", "olga")
