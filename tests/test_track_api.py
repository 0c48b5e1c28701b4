"""TrackingService end to end: the real `sira-server`, real JWTs, Redis and Postgres.

Counters are read back through GetResults (and the bandit's successes through
GetInsights and the server's Redis): every accepted event counts once, every
rejected one not at all.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import struct_pb2
from server_fixtures import SERVER_REDIS_DB, RunningServer, redis_url_with_db

from sira import (
    AsyncClient,
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SiraError,
    UnauthenticatedError,
    tracked_event,
)
from sira.experiments.v1 import assignment_service_pb2 as apb
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import insights_service_pb2 as ipb
from sira.experiments.v1 import tracking_service_pb2 as tpb
from sira.experiments.v1 import tracking_service_pb2_grpc

TokenFor = Callable[..., str]

ACCEPTED = tpb.TRACK_OUTCOME_ACCEPTED
DUPLICATE = tpb.TRACK_OUTCOME_DUPLICATE


# --- helpers ------------------------------------------------------------------------


def experiment(key: str) -> epb.Experiment:
    def config(color: str) -> struct_pb2.Struct:
        struct = struct_pb2.Struct()
        struct.update({"color": color})
        return struct

    return epb.Experiment(
        key=key,
        name=f"Experiment {key}",
        variants=[
            epb.Variant(name="Blue", is_control=True, config=config("#0A84FF")),
            epb.Variant(name="Green", config=config("#34C759")),
        ],
    )


def new_id() -> str:
    return uuid.uuid4().hex


def event(exp: str, subject: str, variant: str, **fields: Any) -> tpb.TrackedEvent:
    """A conversion with a fresh client_event_id unless told otherwise."""
    fields.setdefault("client_event_id", new_id())
    return tracked_event(experiment=exp, subject_id=subject, variant_id=variant, **fields)


def variant_rows(results: ipb.GetResultsResponse) -> list[ipb.VariantResults]:
    """The counters of a GetResults answer (without its compute time)."""
    return list(results.variants)


@pytest.fixture
async def admin(sira_server: RunningServer, token_for: TokenFor) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(sira_server.address, token=token_for("ops_admin", "olga")) as client:
        yield client


@pytest.fixture
async def pay(sira_server: RunningServer, token_for: TokenFor) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(sira_server.address, token=token_for("pay_module", "pay")) as client:
        yield client


@pytest.fixture
async def anonymous(sira_server: RunningServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(sira_server.address) as client:
        yield client


@pytest.fixture
async def server_redis(server_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The session server's own Redis database (read only here)."""
    url = redis_url_with_db(server_redis_url, SERVER_REDIS_DB)
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def running(admin: AsyncClient, unique_key: str) -> epb.Experiment:
    created = await admin.create_experiment(experiment(unique_key))
    return await admin.start_experiment(created.id)


async def assigned(pay: AsyncClient, exp: epb.Experiment, subject: str) -> apb.Decision:
    decision = await pay.assign(exp.key, subject)
    assert decision.HasField("variant")
    return decision


def other_variant(exp: epb.Experiment, variant_id: str) -> str:
    return next(v.id for v in exp.variants if v.id != variant_id)


def row(results: ipb.GetResultsResponse, variant_id: str) -> ipb.VariantResults:
    return next(v for v in results.variants if v.variant_id == variant_id)


# --- accepted, duplicate, retried ---------------------------------------------------


async def test_accepted_then_duplicate_counts_once(
    pay: AsyncClient, admin: AsyncClient, running: epb.Experiment
) -> None:
    decision = await assigned(pay, running, "t-1")
    variant_id = decision.variant.id
    conversion = event(running.key, "t-1", variant_id, client_event_id="evt-1")
    first = await pay.track(conversion)
    assert (first.outcome, first.event_id) == (ACCEPTED, "evt-1")
    again = await pay.track(conversion)
    assert (again.outcome, again.event_id) == (DUPLICATE, "evt-1")

    results = row(await admin.get_results(running.key), variant_id)
    assert (results.assigned_subjects, results.converted_subjects, results.conversions) == (1, 1, 1)
    assert results.conversion_rate == 1.0


async def test_retry_with_the_same_event_id_counts_once(
    pay: AsyncClient, admin: AsyncClient, running: epb.Experiment
) -> None:
    """What a client does after UNAVAILABLE: the same event, same id, again."""
    variant_id = (await assigned(pay, running, "r-1")).variant.id
    paid = event(running.key, "r-1", variant_id, value=1500.0, currency="XOF")
    outcomes = [(await pay.track(paid)).outcome for _ in range(3)]
    assert outcomes == [ACCEPTED, DUPLICATE, DUPLICATE]
    results = row(await admin.get_results(running.key), variant_id)
    assert results.conversions == 1
    assert [(r.currency, r.total) for r in results.revenue] == [("XOF", 1500.0)]


async def test_server_event_id_without_client_event_id(
    pay: AsyncClient, sira_server: RunningServer, token_for: TokenFor, running: epb.Experiment
) -> None:
    """Raw stub (the client would fill the id in): the server names the event itself."""
    variant_id = (await assigned(pay, running, "n-1")).variant.id
    metadata = (("authorization", f"Bearer {token_for('pay_module')}"),)
    async with grpc.aio.insecure_channel(sira_server.address) as channel:
        stub = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        request = tpb.TrackRequest(event=event(running.key, "n-1", variant_id, client_event_id=""))
        answers = [await stub.Track(request, metadata=metadata) for _ in range(2)]
    assert [a.outcome for a in answers] == [ACCEPTED, ACCEPTED]
    assert answers[0].event_id
    assert answers[0].event_id != answers[1].event_id


# --- rejections ---------------------------------------------------------------------


async def test_unknown_experiment_is_not_found(pay: AsyncClient, unique_key: str) -> None:
    for ref in (f"{unique_key}-missing", str(uuid.uuid4())):
        with pytest.raises(NotFoundError) as caught:
            await pay.track(event(ref, "s", str(uuid.uuid4())))
        assert caught.value.reason == "ERROR_REASON_EXPERIMENT_NOT_FOUND"


async def test_unknown_variant_is_not_found(pay: AsyncClient, running: epb.Experiment) -> None:
    await assigned(pay, running, "u-1")
    with pytest.raises(NotFoundError) as caught:
        await pay.track(event(running.key, "u-1", "no-such-variant"))
    assert caught.value.reason == "ERROR_REASON_VARIANT_NOT_FOUND"
    assert caught.value.metadata == {"experiment": running.key, "variant": "no-such-variant"}


async def test_draft_experiment_is_failed_precondition(
    pay: AsyncClient, admin: AsyncClient, unique_key: str
) -> None:
    draft = await admin.create_experiment(experiment(unique_key))
    with pytest.raises(FailedPreconditionError) as caught:
        await pay.track(event(unique_key, "s", draft.variants[0].id))
    assert caught.value.reason == "ERROR_REASON_INVALID_EXPERIMENT_STATE"


async def test_subject_never_assigned(
    pay: AsyncClient, anonymous: AsyncClient, running: epb.Experiment
) -> None:
    with pytest.raises(FailedPreconditionError) as caught:
        await pay.track(event(running.key, "ghost", running.variants[0].id))
    assert caught.value.reason == "ERROR_REASON_SUBJECT_NOT_ASSIGNED"
    assert caught.value.metadata == {"experiment": running.key, "subject_id": "ghost"}
    # Without a bearer token: the one answer for any missing proof (test_abuse.py).
    with pytest.raises(UnauthenticatedError) as hidden:
        await anonymous.track(event(running.key, "ghost", running.variants[0].id))
    assert hidden.value.reason == "ERROR_REASON_TOKEN_INVALID"


async def test_variant_mismatch_reveals_the_assignment_only_to_token_holders(
    pay: AsyncClient, anonymous: AsyncClient, running: epb.Experiment
) -> None:
    real = (await assigned(pay, running, "m-1")).variant.id
    wrong = other_variant(running, real)
    with pytest.raises(FailedPreconditionError) as caught:
        await pay.track(event(running.key, "m-1", wrong))
    assert caught.value.reason == "ERROR_REASON_VARIANT_MISMATCH"
    assert caught.value.metadata == {
        "experiment": running.key,
        "subject_id": "m-1",
        "variant": wrong,
        "assigned_variant": real,
    }
    with pytest.raises(UnauthenticatedError) as hidden:
        await anonymous.track(event(running.key, "m-1", wrong))
    assert hidden.value.reason == "ERROR_REASON_TOKEN_INVALID"
    assert not hidden.value.metadata
    assert real not in hidden.value.message


INVALID_EVENTS: dict[str, tuple[dict[str, Any], str]] = {
    "negative value": ({"value": -1.0, "currency": "EUR"}, "event.value"),
    "NaN value": ({"value": math.nan, "currency": "EUR"}, "event.value"),
    "infinite value": ({"value": math.inf, "currency": "EUR"}, "event.value"),
    "lower-case currency": ({"value": 5.0, "currency": "eur"}, "event.currency"),
    "short currency": ({"value": 5.0, "currency": "EU"}, "event.currency"),
    "missing currency": ({"value": 5.0}, "event.currency"),
    "custom without name": (
        {"event_type": tpb.EVENT_TYPE_CUSTOM},
        "event.custom_event_name",
    ),
    "custom with a built-in name": (
        {"event_type": tpb.EVENT_TYPE_CUSTOM, "custom_event_name": "refund"},
        "event.custom_event_name",
    ),
    "unspecified type": ({"event_type": tpb.EVENT_TYPE_UNSPECIFIED}, "event.event_type"),
    "event id too long": ({"client_event_id": "e" * 129}, "event.client_event_id"),
    "occurred in an hour": (
        {"occur_time": datetime.now(UTC) + timedelta(hours=1)},
        "event.occur_time",
    ),
}


async def test_invalid_events_are_invalid_argument(
    pay: AsyncClient, running: epb.Experiment
) -> None:
    variant_id = (await assigned(pay, running, "i-1")).variant.id
    for case, (fields, field) in INVALID_EVENTS.items():
        with pytest.raises(InvalidArgumentError) as caught:
            await pay.track(event(running.key, "i-1", variant_id, **fields))
        assert caught.value.reason == "ERROR_REASON_INVALID_ARGUMENT", case
        assert field in dict(caught.value.violations), (case, caught.value.violations)
    for subject, variant, field in (
        ("", variant_id, "event.subject_id"),
        ("i-1", "", "event.variant_id"),
    ):
        with pytest.raises(InvalidArgumentError) as caught:
            await pay.track(event(running.key, subject, variant))
        assert field in dict(caught.value.violations)


async def test_rejected_calls_change_no_counter(
    pay: AsyncClient,
    anonymous: AsyncClient,
    admin: AsyncClient,
    running: epb.Experiment,
    server_redis: aioredis.Redis,
) -> None:
    variant_id = (await assigned(pay, running, "c-1")).variant.id
    await pay.track(event(running.key, "c-1", variant_id, value=10.0, currency="EUR"))
    before = variant_rows(await admin.get_results(running.key))
    events_key = f"sira:{{exp:{running.id}}}:events"
    seen_before = await server_redis.smembers(events_key)

    rejected_ids = [f"rejected-{i}" for i in range(4)]
    rejected = [
        event(
            running.key,
            "c-1",
            variant_id,
            value=-5.0,
            currency="EUR",
            client_event_id=rejected_ids[0],
        ),
        event(running.key, "nobody", variant_id, client_event_id=rejected_ids[1]),
        event(
            running.key, "c-1", other_variant(running, variant_id), client_event_id=rejected_ids[2]
        ),
        event(
            running.key,
            "c-1",
            variant_id,
            event_type=tpb.EVENT_TYPE_UNSPECIFIED,
            client_event_id=rejected_ids[3],
        ),
        event(running.key, "c-1", "not-a-variant"),
        event(f"{running.key}-unknown", "c-1", variant_id),
    ]
    for client in (pay, anonymous):
        for bad in rejected:
            with pytest.raises(SiraError):
                await client.track(bad)
        results = await client.track_batch(rejected)
        assert [r.WhichOneof("result") for r in results] == ["error"] * len(rejected)

    assert variant_rows(await admin.get_results(running.key)) == before
    assert await server_redis.smembers(events_key) == seen_before
    # A rejected event's id is not burnt: the corrected event is accepted under it.
    fixed = event(
        running.key, "c-1", variant_id, client_event_id=rejected_ids[0], value=5.0, currency="EUR"
    )
    assert (await pay.track(fixed)).outcome == ACCEPTED


# --- anonymous tracking -------------------------------------------------------------


async def test_anonymous_track_works_only_for_a_real_assignment(
    pay: AsyncClient, anonymous: AsyncClient, admin: AsyncClient, running: epb.Experiment
) -> None:
    decision = await assigned(pay, running, "anon-1")
    variant_id, token = decision.variant.id, decision.tracking_token
    answer = await anonymous.track(event(running.key, "anon-1", variant_id, tracking_token=token))
    assert answer.outcome == ACCEPTED
    by_key = next(v.key for v in running.variants if v.id == variant_id)
    again = event(running.key, "anon-1", by_key, tracking_token=token)
    assert (await anonymous.track(again)).outcome == ACCEPTED
    with pytest.raises(UnauthenticatedError):  # another subject: the token proves nothing
        await anonymous.track(event(running.key, "anon-2", variant_id, tracking_token=token))
    results = row(await admin.get_results(running.key), variant_id)
    assert (results.converted_subjects, results.conversions) == (1, 2)


# --- successes vs. metrics ----------------------------------------------------------


async def test_first_conversion_is_the_only_success(
    pay: AsyncClient,
    admin: AsyncClient,
    running: epb.Experiment,
    server_redis: aioredis.Redis,
) -> None:
    variant_id = (await assigned(pay, running, "f-1")).variant.id
    for amount in (10.0, 20.0, 30.5):
        answer = await pay.track(
            event(running.key, "f-1", variant_id, value=amount, currency="EUR")
        )
        assert answer.outcome == ACCEPTED
    results = row(await admin.get_results(running.key), variant_id)
    assert (results.assigned_subjects, results.converted_subjects, results.conversions) == (1, 1, 3)
    assert [(r.currency, r.total) for r in results.revenue] == [("EUR", 60.5)]

    insights = await admin.get_insights(running.key)
    arm = next(i for i in insights.insights if i.variant_id == variant_id)
    assert (arm.samples, arm.conversions) == (1, 1)
    successes = await server_redis.hgetall(f"sira:{{exp:{running.id}}}:succ")
    assert {str(k): int(v) for k, v in successes.items()} == {
        v.id: int(v.id == variant_id) for v in running.variants
    }


# --- TrackBatch ---------------------------------------------------------------------


async def test_track_batch_answers_each_event_in_order(
    pay: AsyncClient, admin: AsyncClient, running: epb.Experiment, unique_key: str
) -> None:
    variant_id = (await assigned(pay, running, "b-1")).variant.id
    second = await admin.start_experiment(
        (await admin.create_experiment(experiment(f"{unique_key}-2"))).id
    )
    second_variant = (await assigned(pay, second, "b-1")).variant.id
    events = [
        event(running.key, "b-1", variant_id, client_event_id="b-conv", value=3.0, currency="EUR"),
        event(running.key, "b-1", variant_id, client_event_id="b-conv"),  # same id
        event(running.key, "b-1", variant_id, value=-1.0, currency="EUR"),
        event(running.key, "nobody", variant_id),
        event(running.key, "b-1", other_variant(running, variant_id)),
        event(f"{unique_key}-missing", "b-1", variant_id),
        event(second.key, "b-1", second_variant, client_event_id="b-other"),
        event(running.key, "b-1", variant_id, event_type="churn", client_event_id="b-churn"),
        event(
            running.key,
            "b-1",
            variant_id,
            event_type=tpb.EVENT_TYPE_CUSTOM,
            custom_event_name="viewed_cart",
        ),
    ]
    results = await pay.track_batch(events)
    kinds = [r.WhichOneof("result") for r in results]
    assert kinds == [
        "accepted",
        "accepted",
        "error",
        "error",
        "error",
        "error",
        "accepted",
        "accepted",
        "accepted",
    ]
    assert [results[i].accepted.outcome for i in (0, 1, 6, 7, 8)] == [
        ACCEPTED,
        DUPLICATE,
        ACCEPTED,
        ACCEPTED,
        ACCEPTED,
    ]
    assert (results[0].accepted.event_id, results[6].accepted.event_id) == ("b-conv", "b-other")
    errors = [(r.error.code, ErrorReason.Name(r.error.reason), r.error.field) for r in results[2:6]]
    assert errors == [
        (3, "ERROR_REASON_INVALID_ARGUMENT", "event.value"),
        (9, "ERROR_REASON_SUBJECT_NOT_ASSIGNED", ""),
        (9, "ERROR_REASON_VARIANT_MISMATCH", ""),
        (5, "ERROR_REASON_EXPERIMENT_NOT_FOUND", ""),
    ]
    assert all(r.error.message for r in results[2:6])

    mine = row(await admin.get_results(running.key), variant_id)
    assert (mine.conversions, mine.converted_subjects, mine.churns, mine.churned_subjects) == (
        1,
        1,
        1,
        1,
    )
    assert [(r.currency, r.total) for r in mine.revenue] == [("EUR", 3.0)]
    other = row(await admin.get_results(second.key), second_variant)
    assert (other.conversions, other.converted_subjects) == (1, 1)


async def test_track_batch_size_limits(pay: AsyncClient, running: epb.Experiment) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await pay.track_batch([])
    assert "events" in dict(caught.value.violations)
    variant_id = (await assigned(pay, running, "big-1")).variant.id
    with pytest.raises(InvalidArgumentError):
        await pay.track_batch([event(running.key, "big-1", variant_id) for _ in range(1001)])
    accepted = await pay.track_batch([event(running.key, "big-1", variant_id) for _ in range(1000)])
    assert [r.accepted.outcome for r in accepted] == [ACCEPTED] * 1000
