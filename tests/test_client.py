"""sira.Client / sira.AsyncClient: retries, metadata, typed errors.

The first half talks to a real grpc.aio server started in the test, whose
servicers fail on purpose (UNAVAILABLE twice, rich error details, slowness).
The second half talks to the real `sira-server` subprocess.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import (  # type: ignore[import-untyped, unused-ignore]
    code_pb2,
    error_details_pb2,
    status_pb2,
)
from grpc_status import rpc_status

import sira
from sira import (
    AsyncClient,
    Client,
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RetryPolicy,
    SiraError,
    UnauthenticatedError,
    UnavailableError,
)
from sira.errors import (
    DeadlineExceededError,
    InternalError,
    UnimplementedError,
    UnknownError,
    error_class,
)
from sira.experiments.v1 import (
    experiment_pb2,
    lifecycle_service_pb2,
    lifecycle_service_pb2_grpc,
    tracking_service_pb2,
    tracking_service_pb2_grpc,
)
from sira.spec_file import load_experiment

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
FAST_RETRY = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.05)


# -- a real grpc.aio server whose servicers misbehave on purpose -----------------


def _status(
    code: grpc.StatusCode,
    message: str,
    reason: str = "",
    metadata: dict[str, str] | None = None,
    violations: list[tuple[str, str]] | None = None,
    domain: str = "sira.experiments.v1",
) -> grpc.Status:
    details = []
    if reason:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata))
        details.append(info)
    if violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in violations
                ]
            )
        )
        details.append(bad)
    return rpc_status.to_status(
        status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    )


@dataclass
class Script:
    """What the fake servicers do: fail the first `failures` calls with `failure`."""

    failures: int = 0
    failure: grpc.Status | None = None
    delay: float = 0.0
    calls: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)

    async def play(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.calls += 1
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.calls <= self.failures and self.failure is not None:
            await context.abort_with_status(self.failure)


UNAVAILABLE = _status(grpc.StatusCode.UNAVAILABLE, "connection reset")
STORE_UNAVAILABLE = _status(
    grpc.StatusCode.UNAVAILABLE,
    "postgres cannot take the write",
    reason="ERROR_REASON_STORE_UNAVAILABLE",
    metadata={"store": "postgres"},
)


class FakeLifecycle(lifecycle_service_pb2_grpc.LifecycleServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def GetExperiment(
        self, request: lifecycle_service_pb2.GetExperimentRequest, context: Any
    ) -> lifecycle_service_pb2.GetExperimentResponse:
        await self.script.play(request, context)
        return lifecycle_service_pb2.GetExperimentResponse(
            experiment=experiment_pb2.Experiment(key=request.experiment, name="found")
        )

    async def StartExperiment(
        self, request: lifecycle_service_pb2.StartExperimentRequest, context: Any
    ) -> lifecycle_service_pb2.StartExperimentResponse:
        await self.script.play(request, context)
        return lifecycle_service_pb2.StartExperimentResponse(
            experiment=experiment_pb2.Experiment(
                key=request.experiment, status=experiment_pb2.EXPERIMENT_STATUS_RUNNING
            )
        )


class FakeTracking(tracking_service_pb2_grpc.TrackingServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def Track(
        self, request: tracking_service_pb2.TrackRequest, context: Any
    ) -> tracking_service_pb2.TrackResponse:
        await self.script.play(request, context)
        return tracking_service_pb2.TrackResponse(
            event_id=request.event.client_event_id,
            outcome=tracking_service_pb2.TRACK_OUTCOME_ACCEPTED,
        )

    async def TrackBatch(
        self, request: tracking_service_pb2.TrackBatchRequest, context: Any
    ) -> tracking_service_pb2.TrackBatchResponse:
        await self.script.play(request, context)
        response = tracking_service_pb2.TrackBatchResponse()
        for event in request.events:
            response.results.add().accepted.event_id = event.client_event_id
        return response


@dataclass
class FakeServer:
    address: str
    script: Script


@pytest.fixture
async def fake_server() -> AsyncIterator[FakeServer]:
    script = Script()
    server = grpc.aio.server()
    lifecycle = FakeLifecycle(script)  # type: ignore[abstract]  # the rest answer UNIMPLEMENTED
    lifecycle_service_pb2_grpc.add_LifecycleServiceServicer_to_server(lifecycle, server)
    tracking_service_pb2_grpc.add_TrackingServiceServicer_to_server(FakeTracking(script), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield FakeServer(f"127.0.0.1:{port}", script)
    finally:
        await server.stop(None)


# -- retries ------------------------------------------------------------------


async def test_async_client_retries_unavailable_then_succeeds(fake_server: FakeServer) -> None:
    fake_server.script.failures, fake_server.script.failure = 2, UNAVAILABLE
    async with AsyncClient(fake_server.address, retry=FAST_RETRY) as client:
        experiment = await client.get_experiment("checkout-button-color")
    assert experiment.name == "found"
    assert fake_server.script.calls == 3


async def test_sync_client_retries_unavailable_then_succeeds(fake_server: FakeServer) -> None:
    fake_server.script.failures, fake_server.script.failure = 2, UNAVAILABLE
    with Client(fake_server.address, retry=FAST_RETRY) as client:
        # The blocking call runs in a thread so the aio server keeps serving.
        experiment = await asyncio.to_thread(client.get_experiment, "checkout-button-color")
    assert experiment.key == "checkout-button-color"
    assert fake_server.script.calls == 3


async def test_gives_up_after_the_configured_attempts(fake_server: FakeServer) -> None:
    fake_server.script.failures, fake_server.script.failure = 99, UNAVAILABLE
    async with AsyncClient(fake_server.address, retry=FAST_RETRY) as client:
        with pytest.raises(UnavailableError) as info:
            await client.get_experiment("x")
    assert fake_server.script.calls == 3
    assert info.value.reason == ""
    assert info.value.message == "connection reset"


async def test_no_retry_policy_means_one_attempt(fake_server: FakeServer) -> None:
    fake_server.script.failures, fake_server.script.failure = 1, UNAVAILABLE
    async with AsyncClient(fake_server.address, retry=RetryPolicy(attempts=1)) as client:
        with pytest.raises(UnavailableError):
            await client.get_experiment("x")
    assert fake_server.script.calls == 1


async def test_track_retries_carry_one_client_event_id(fake_server: FakeServer) -> None:
    fake_server.script.failures, fake_server.script.failure = 2, UNAVAILABLE
    async with AsyncClient(fake_server.address, retry=FAST_RETRY) as client:
        response = await client.track(
            experiment="checkout-button-color",
            subject_id="user-123",
            variant_id="green-button",
            value=49.99,
            currency="EUR",
        )
    ids = {r.event.client_event_id for r in fake_server.script.requests}
    assert len(ids) == 1  # the server sees the same event three times and dedupes it
    (event_id,) = ids
    assert uuid.UUID(event_id).version == 4
    assert response.event_id == event_id
    event = fake_server.script.requests[-1].event
    assert event.event_type == tracking_service_pb2.EVENT_TYPE_CONVERSION
    assert (event.value, event.currency) == (49.99, "EUR")


async def test_track_keeps_a_given_event_id_and_does_not_mutate_input(
    fake_server: FakeServer,
) -> None:
    given = sira.tracked_event(
        experiment="e", subject_id="s", variant_id="v", event_type="refund", value=5
    )
    with Client(fake_server.address, retry=FAST_RETRY) as client:
        await asyncio.to_thread(client.track, given)
        given.client_event_id = "order-42"
        await asyncio.to_thread(client.track, given)
    first, second = (r.event for r in fake_server.script.requests)
    assert first.client_event_id
    assert first.client_event_id != "order-42"
    assert first.event_type == tracking_service_pb2.EVENT_TYPE_REFUND
    assert second.client_event_id == "order-42"
    with pytest.raises(TypeError, match="either an event or keyword fields"):
        client.track(given, subject_id="other")


async def test_track_batch_fills_every_missing_event_id(fake_server: FakeServer) -> None:
    fake_server.script.failures, fake_server.script.failure = 1, UNAVAILABLE
    events = [
        sira.tracked_event(experiment="e", subject_id=f"s{i}", variant_id="v") for i in range(3)
    ]
    events[1].client_event_id = "fixed"
    async with AsyncClient(fake_server.address, retry=FAST_RETRY) as client:
        results = await client.track_batch(events)
    first, second = (list(r.events) for r in fake_server.script.requests)
    assert first == second
    assert first[1].client_event_id == "fixed"
    assert all(e.client_event_id for e in first)
    assert [r.accepted.event_id for r in results] == [e.client_event_id for e in first]


async def test_lifecycle_mutation_not_retried_on_a_transport_failure(
    fake_server: FakeServer,
) -> None:
    # Without the server saying nothing was written, a replay could start twice.
    fake_server.script.failures, fake_server.script.failure = 1, UNAVAILABLE
    async with AsyncClient(fake_server.address, retry=FAST_RETRY) as client:
        with pytest.raises(UnavailableError):
            await client.start_experiment("x")
    assert fake_server.script.calls == 1


async def test_lifecycle_mutation_retried_when_the_store_rejected_it(
    fake_server: FakeServer,
) -> None:
    fake_server.script.failures, fake_server.script.failure = 2, STORE_UNAVAILABLE
    async with AsyncClient(fake_server.address, retry=FAST_RETRY) as client:
        experiment = await client.start_experiment("x")
    assert experiment.status == experiment_pb2.EXPERIMENT_STATUS_RUNNING
    assert fake_server.script.calls == 3


# -- metadata, deadlines ---------------------------------------------------------


async def test_bearer_token_is_sent_as_metadata(fake_server: FakeServer) -> None:
    async with AsyncClient(fake_server.address, token="tok-123") as client:
        await client.get_experiment("x")
    async with AsyncClient(fake_server.address) as anonymous:
        await anonymous.get_experiment("x")
    with_token, without = fake_server.script.metadata
    assert with_token["authorization"] == "Bearer tok-123"
    assert "authorization" not in without
    assert with_token["user-agent"].startswith("sira-python")


async def test_deadline_exceeded_is_typed(fake_server: FakeServer) -> None:
    fake_server.script.delay = 2.0
    async with AsyncClient(fake_server.address, timeout=0.2, retry=FAST_RETRY) as client:
        with pytest.raises(DeadlineExceededError):
            await client.get_experiment("x")
    assert fake_server.script.calls == 1  # a deadline is not retried


async def test_unimplemented_rpc_is_typed(fake_server: FakeServer) -> None:
    async with AsyncClient(fake_server.address, retry=FAST_RETRY) as client:
        with pytest.raises(UnimplementedError):
            await client.get_insights("x")  # the fake server has no InsightsService


def test_unreachable_server_is_unavailable() -> None:
    client = Client("127.0.0.1:1", retry=FAST_RETRY, timeout=2)
    with client, pytest.raises(UnavailableError) as info:
        client.list_experiments()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


# -- typed errors ---------------------------------------------------------------


async def test_error_details_are_decoded(fake_server: FakeServer) -> None:
    fake_server.script.failures = 1
    fake_server.script.failure = _status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid request: experiment.variants: at least two",
        reason="ERROR_REASON_INVALID_ARGUMENT",
        violations=[
            ("experiment.variants", "at least two"),
            ("experiment.key", "lower-case slug"),
        ],
    )
    async with AsyncClient(fake_server.address) as client:
        with pytest.raises(InvalidArgumentError) as info:
            await client.get_experiment("x")
    error = info.value
    assert isinstance(error, SiraError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "ERROR_REASON_INVALID_ARGUMENT"
    assert error.reason_value == ErrorReason.ERROR_REASON_INVALID_ARGUMENT
    assert error.violations == [
        ("experiment.variants", "at least two"),
        ("experiment.key", "lower-case slug"),
    ]
    assert str(error) == (
        "INVALID_ARGUMENT (ERROR_REASON_INVALID_ARGUMENT): "
        "invalid request: experiment.variants: at least two"
    )


async def test_error_info_metadata_and_foreign_domains(fake_server: FakeServer) -> None:
    fake_server.script.failures = 2
    fake_server.script.failure = _status(
        grpc.StatusCode.NOT_FOUND,
        "no experiment 'nope'",
        reason="ERROR_REASON_EXPERIMENT_NOT_FOUND",
        metadata={"experiment": "nope"},
    )
    async with AsyncClient(fake_server.address) as client:
        with pytest.raises(NotFoundError) as info:
            await client.get_experiment("nope")
        assert info.value.metadata == {"experiment": "nope"}
        assert info.value.reason_value == ErrorReason.ERROR_REASON_EXPERIMENT_NOT_FOUND
        fake_server.script.failure = _status(
            grpc.StatusCode.NOT_FOUND, "elsewhere", reason="SOMETHING", domain="example.com"
        )
        with pytest.raises(NotFoundError) as foreign:
            await client.get_experiment("nope")
    assert foreign.value.reason == ""
    assert foreign.value.reason_value == ErrorReason.ERROR_REASON_UNSPECIFIED


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, sira.AlreadyExistsError),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, sira.ResourceExhaustedError),
        (grpc.StatusCode.INTERNAL, InternalError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.UNIMPLEMENTED, UnimplementedError),
        (grpc.StatusCode.DATA_LOSS, UnknownError),
        (grpc.StatusCode.UNKNOWN, UnknownError),
    ],
)
def test_one_class_per_status_code(code: grpc.StatusCode, cls: type[SiraError]) -> None:
    assert error_class(code) is cls
    assert issubclass(cls, SiraError)


def test_from_rpc_error_without_a_call() -> None:
    error = sira.from_rpc_error(grpc.RpcError("bare"))
    assert isinstance(error, UnknownError)
    assert error.code == grpc.StatusCode.UNKNOWN


def test_backoff_grows_and_stays_under_its_bound() -> None:
    policy = RetryPolicy(attempts=5, initial_backoff=0.1, max_backoff=0.3, multiplier=2)
    for retry, bound in ((1, 0.1), (2, 0.2), (3, 0.3), (4, 0.3)):
        pauses = [policy.backoff(retry) for _ in range(200)]
        assert all(0.0 <= p <= bound for p in pauses)
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(attempts=0)


def test_public_api_is_exported() -> None:
    for name in sira.__all__:
        assert hasattr(sira, name), name
    assert {"Client", "AsyncClient", "SiraError", "from_rpc_error"} <= set(sira.__all__)


# -- against the real server ------------------------------------------------------


def _checkout(key: str) -> experiment_pb2.Experiment:
    experiment = load_experiment(EXAMPLES / "checkout-button-color.json")
    experiment.key = key
    return experiment


async def test_real_server_lifecycle(
    sira_server: Any, token_for: Callable[..., str], unique_key: str
) -> None:
    async with AsyncClient(sira_server.address, token=token_for("ops_admin")) as ops:
        created = await ops.create_experiment(_checkout(unique_key))
        assert created.id
        assert created.key == unique_key
        assert created.status == experiment_pb2.EXPERIMENT_STATUS_DRAFT
        assert created.created_by == "alice"
        assert [v.key for v in created.variants] == ["blue-button", "green-button"]

        assert (await ops.get_experiment(created.id)).key == unique_key
        drafts = [e.key async for e in ops.iter_experiments("draft", page_size=1)]
        assert unique_key in drafts

        started = await ops.start_experiment(unique_key)
        assert started.status == experiment_pb2.EXPERIMENT_STATUS_RUNNING
        stopped = await ops.stop_experiment(
            unique_key, winner_variant="green-button", reason="green wins"
        )
        assert stopped.status == experiment_pb2.EXPERIMENT_STATUS_STOPPED
        green = next(v for v in stopped.variants if v.key == "green-button")
        assert stopped.winner_variant_id == green.id
        archived = await ops.archive_experiment(unique_key)
        assert archived.status == experiment_pb2.EXPERIMENT_STATUS_ARCHIVED

        events = [e async for e in ops.iter_audit_events(unique_key, page_size=2)]
        assert [e.action for e in events][:4] == ["archived", "stopped", "started", "created"]
        assert {e.actor for e in events} == {"alice"}


async def test_real_server_assign_and_track(
    sira_server: Any, token_for: Callable[..., str], unique_key: str
) -> None:
    ops = AsyncClient(sira_server.address, token=token_for("ops_admin"))
    pay = AsyncClient(sira_server.address, token=token_for("pay_module", "pay"))
    try:
        await ops.create_experiment(_checkout(unique_key))
        await ops.start_experiment(unique_key)

        try:
            decision = await pay.assign(unique_key, "user-123", {"country": "SN"})
        except UnimplementedError:
            pytest.skip("the server does not serve AssignmentService yet")
        assert decision.variant.key in ("blue-button", "green-button")
        again = await pay.assign(unique_key, "user-123", {"country": "SN"})
        assert again.variant.id == decision.variant.id  # sticky
        decisions = await pay.assign_all("user-123", {"country": "SN"})
        assert unique_key in [d.experiment_key for d in decisions]

        tracked = await pay.track(
            experiment=unique_key,
            subject_id="user-123",
            variant_id=decision.variant.id,
            value=49.99,
            currency="EUR",
            client_event_id=f"{unique_key}-order-1",
        )
        assert tracked.outcome == tracking_service_pb2.TRACK_OUTCOME_ACCEPTED
        replay = await pay.track(
            experiment=unique_key,
            subject_id="user-123",
            variant_id=decision.variant.id,
            value=49.99,
            currency="EUR",
            client_event_id=f"{unique_key}-order-1",
        )
        assert replay.outcome == tracking_service_pb2.TRACK_OUTCOME_DUPLICATE
    finally:
        await ops.close()
        await pay.close()


def test_real_server_errors_are_typed(
    sira_server: Any, token_for: Callable[..., str], unique_key: str
) -> None:
    with Client(sira_server.address, token=token_for("ops_admin")) as ops:
        with pytest.raises(NotFoundError) as missing:
            ops.get_experiment(f"{unique_key}-nope")
        assert missing.value.reason == "ERROR_REASON_EXPERIMENT_NOT_FOUND"

        bad = _checkout(unique_key)
        del bad.variants[1]
        with pytest.raises(InvalidArgumentError) as invalid:
            ops.create_experiment(bad)
        assert invalid.value.reason == "ERROR_REASON_INVALID_ARGUMENT"
        assert any("variants" in field for field, _ in invalid.value.violations)

        ops.create_experiment(_checkout(unique_key))
        with pytest.raises(sira.AlreadyExistsError) as exists:
            ops.create_experiment(_checkout(unique_key))
        assert exists.value.reason == "ERROR_REASON_EXPERIMENT_KEY_EXISTS"

        with pytest.raises(FailedPreconditionError) as state:
            ops.archive_experiment(unique_key)  # a draft cannot be archived
        assert state.value.reason == "ERROR_REASON_INVALID_EXPERIMENT_STATE"

    with Client(sira_server.address) as anonymous:
        with pytest.raises(UnauthenticatedError) as no_token:
            anonymous.list_experiments()
        assert no_token.value.reason == "ERROR_REASON_TOKEN_MISSING"

    with Client(sira_server.address, token="not.a.jwt") as forged:
        with pytest.raises(UnauthenticatedError) as bad_token:
            forged.list_experiments()
        assert bad_token.value.reason == "ERROR_REASON_TOKEN_INVALID"

    with Client(sira_server.address, token=token_for("data_science")) as reader:
        with pytest.raises(PermissionDeniedError) as denied:
            reader.delete_experiment(unique_key)
        assert denied.value.reason == "ERROR_REASON_ROLE_NOT_ALLOWED"
        assert reader.get_experiment(unique_key).key == unique_key


def _shed(retry_after: float) -> grpc.Status:
    """What the server's limits answer (built by the server's own error mapping)."""
    from sira_server.api.guards import error_status
    from sira_server.errors import ResourceExhausted

    return error_status(
        ResourceExhausted(
            "the server is busy", metadata={"limit": "x"}, retry_after_seconds=retry_after
        )
    )


async def test_calls_shed_by_a_server_limit_are_retried_after_retry_info(
    fake_server: FakeServer,
) -> None:
    # Even a non-idempotent call: the server refused it before doing anything.
    fake_server.script.failures, fake_server.script.failure = 2, _shed(0.01)
    async with AsyncClient(fake_server.address, retry=FAST_RETRY) as client:
        started = await client.start_experiment("checkout-button-color")
    assert started.status == experiment_pb2.EXPERIMENT_STATUS_RUNNING
    assert fake_server.script.calls == 3


async def test_a_long_retry_info_is_the_callers_to_honour(fake_server: FakeServer) -> None:
    fake_server.script.failures, fake_server.script.failure = 1, _shed(120.0)
    async with AsyncClient(fake_server.address, retry=FAST_RETRY) as client:
        with pytest.raises(sira.ResourceExhaustedError) as caught:
            await client.get_experiment("x")
    assert fake_server.script.calls == 1
    assert caught.value.reason == "ERROR_REASON_RATE_LIMITED"
    assert caught.value.retry_after == pytest.approx(120.0)
