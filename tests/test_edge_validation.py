"""Hostile input through the real server: every field is checked at the edge.

Each case here was a finding of the hardening review (issue 7): NUL characters that
Postgres rejects after Redis acknowledged, NaN in configs, forged page tokens,
undecodable bytes, huge inputs echoed into the trailers. Each must now be
INVALID_ARGUMENT with a BadRequest naming the field, and nothing acknowledged may be
lost on its way to Postgres.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import field_mask_pb2, struct_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status
from server_fixtures import (
    RunningServer,
    create_migrated_database,
    drop_database,
    run_sira_server,
)

from sira.experiments.v1 import assignment_service_pb2 as apb
from sira.experiments.v1 import (
    assignment_service_pb2_grpc,
    insights_service_pb2_grpc,
    lifecycle_service_pb2_grpc,
    tracking_service_pb2_grpc,
)
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import insights_service_pb2 as ipb
from sira.experiments.v1 import lifecycle_service_pb2 as lpb
from sira.experiments.v1 import tracking_service_pb2 as tpb
from sira_server.store.hot_keys import FLUSHER_GROUP, experiment_keys

TokenFor = Callable[..., str]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TRAILER_BUDGET = 8 * 1024
"""What a rejected call may put in its trailers: far below a client's 16 KiB."""


# --- a client that sees everything of a failure ---------------------------------------


class Failure:
    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        self.code = error.code()
        self.message = error.details() or ""
        self.trailer_bytes = len(self.message.encode()) + sum(
            len(k) + len(v) for k, v in (error.trailing_metadata() or ())
        )
        status = rpc_status.from_call(error)
        assert status is not None, f"no rich status: {self.code} {self.message[:200]}"
        self.info = error_details_pb2.ErrorInfo()
        self.violations: dict[str, str] = {}
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(self.info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.violations = {v.field: v.description for v in bad.field_violations}


class Stubs:
    def __init__(self, channel: grpc.aio.Channel, token_for: TokenFor) -> None:
        self.channel = channel
        self.lifecycle = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
        self.assignment = assignment_service_pb2_grpc.AssignmentServiceStub(channel)
        self.tracking = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        self.insights = insights_service_pb2_grpc.InsightsServiceStub(channel)
        self.admin = (("authorization", f"Bearer {token_for('ops_admin', 'olga')}"),)
        self.pay = (("authorization", f"Bearer {token_for('pay_module', 'pay')}"),)

    def method(self, service: str, name: str) -> Any:
        return getattr(getattr(self, service), name)

    def auth_for(self, service: str) -> Any:
        return self.pay if service in ("assignment", "tracking") else self.admin


async def fails(call: Any) -> Failure:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return Failure(caught.value)


def config(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def experiment(exp_key: str, **fields: Any) -> epb.Experiment:
    defaults: dict[str, Any] = {"key": exp_key, "name": f"Edge {exp_key}"}
    return epb.Experiment(
        variants=[
            epb.Variant(key="blue", name="Blue", is_control=True, config=config(c="#00f")),
            epb.Variant(key="green", name="Green", config=config(c="#0f0")),
        ],
        **{**defaults, **fields},
    )


async def running(stubs: Stubs, key: str) -> str:
    created = await stubs.lifecycle.CreateExperiment(
        lpb.CreateExperimentRequest(experiment=experiment(key)), metadata=stubs.admin
    )
    await stubs.lifecycle.StartExperiment(
        lpb.StartExperimentRequest(experiment=key), metadata=stubs.admin
    )
    return created.experiment.id


@pytest.fixture
async def stubs(sira_server: RunningServer, token_for: TokenFor) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(sira_server.address) as channel:
        yield Stubs(channel, token_for)


# --- control characters and lengths, every service ------------------------------------


def _nul_cases() -> Iterator[tuple[str, str, str, Message]]:
    """(service, method, field named in the BadRequest, request)."""
    nul = "a\x00b"
    ref = f"x{nul}"
    for name, request_type in (
        ("GetExperiment", lpb.GetExperimentRequest),
        ("StartExperiment", lpb.StartExperimentRequest),
        ("StopExperiment", lpb.StopExperimentRequest),
        ("ArchiveExperiment", lpb.ArchiveExperimentRequest),
        ("DeleteExperiment", lpb.DeleteExperimentRequest),
        ("ListAuditEvents", lpb.ListAuditEventsRequest),
    ):
        yield "lifecycle", name, "experiment", request_type(experiment=ref)
    yield "insights", "GetResults", "experiment", ipb.GetResultsRequest(experiment=ref)
    yield "insights", "GetInsights", "experiment", ipb.GetInsightsRequest(experiment=ref)
    yield (
        "lifecycle",
        "StopExperiment",
        "reason",
        lpb.StopExperimentRequest(experiment="k", reason=f"bad{nul}"),
    )
    yield (
        "lifecycle",
        "StopExperiment",
        "winner_variant",
        lpb.StopExperimentRequest(experiment="k", winner_variant="\x07"),
    )
    yield "lifecycle", "ListExperiments", "page_token", lpb.ListExperimentsRequest(page_token=nul)
    yield (
        "lifecycle",
        "ListAuditEvents",
        "page_token",
        lpb.ListAuditEventsRequest(page_token=nul),
    )
    for field in ("name", "description", "key", "primary_metric"):
        yield (
            "lifecycle",
            "CreateExperiment",
            f"experiment.{field}",
            lpb.CreateExperimentRequest(experiment=experiment("k", **{field: nul})),
        )
    bad_variant = experiment("k")
    bad_variant.variants[1].name = nul
    yield (
        "lifecycle",
        "CreateExperiment",
        "experiment.variants[1].name",
        lpb.CreateExperimentRequest(experiment=bad_variant),
    )
    bad_config = experiment("k")
    bad_config.variants[0].config.update({"label": nul})
    yield (
        "lifecycle",
        "CreateExperiment",
        "experiment.variants[0].config.label",
        lpb.CreateExperimentRequest(experiment=bad_config),
    )
    bad_targeting = experiment("k", targeting=epb.Targeting(devices=["mobile", nul]))
    yield (
        "lifecycle",
        "CreateExperiment",
        "experiment.targeting.devices[1]",
        lpb.CreateExperimentRequest(experiment=bad_targeting),
    )
    yield (
        "lifecycle",
        "UpdateExperiment",
        "experiment.id",
        lpb.UpdateExperimentRequest(experiment=epb.Experiment(id=ref)),
    )
    yield (
        "lifecycle",
        "UpdateExperiment",
        "update_mask.paths[0]",
        lpb.UpdateExperimentRequest(
            experiment=epb.Experiment(key="k"), update_mask=field_mask_pb2.FieldMask(paths=[nul])
        ),
    )
    yield "assignment", "Assign", "experiment", apb.AssignRequest(experiment=ref, subject_id="s")
    yield "assignment", "Assign", "subject_id", apb.AssignRequest(experiment="k", subject_id=nul)
    yield (
        "assignment",
        "AssignAll",
        "context.attributes['a']",
        apb.AssignAllRequest(subject_id="s", context=apb.SubjectContext(attributes={"a": "\x00"})),
    )
    yield (
        "assignment",
        "AssignAll",
        "context.country",
        apb.AssignAllRequest(subject_id="s", context=apb.SubjectContext(country="S\x1b")),
    )
    event = tpb.TrackedEvent(
        experiment="k", subject_id="s", variant_id="v", event_type=tpb.EVENT_TYPE_CHURN
    )
    for field in ("experiment", "subject_id", "variant_id", "client_event_id", "currency"):
        bad_event = tpb.TrackedEvent()
        bad_event.CopyFrom(event)
        setattr(bad_event, field, "\x00")
        yield "tracking", "Track", f"event.{field}", tpb.TrackRequest(event=bad_event)


NUL_CASES = list(_nul_cases())


@pytest.mark.parametrize(
    ("service", "method", "field", "request_message"),
    NUL_CASES,
    ids=[f"{c[1]}-{c[2]}" for c in NUL_CASES],
)
async def test_control_characters_are_invalid_argument_naming_the_field(
    stubs: Stubs, service: str, method: str, field: str, request_message: Message
) -> None:
    failure = await fails(
        stubs.method(service, method)(request_message, metadata=stubs.auth_for(service))
    )
    assert failure.code == INVALID, failure.message
    assert field in failure.violations, failure.violations
    assert "control characters" in failure.violations[field]
    assert failure.info.reason == "ERROR_REASON_INVALID_ARGUMENT"


async def test_a_track_without_token_and_nul_is_invalid_argument(stubs: Stubs) -> None:
    event = tpb.TrackedEvent(
        experiment="\x00", subject_id="s", variant_id="v", event_type=tpb.EVENT_TYPE_CHURN
    )
    failure = await fails(stubs.tracking.Track(tpb.TrackRequest(event=event)))
    assert failure.code == INVALID
    assert "event.experiment" in failure.violations


async def test_free_text_keeps_tabs_and_new_lines(stubs: Stubs, unique_key: str) -> None:
    created = await stubs.lifecycle.CreateExperiment(
        lpb.CreateExperimentRequest(
            experiment=experiment(unique_key, description="Why:\n\t- green converts better")
        ),
        metadata=stubs.admin,
    )
    assert created.experiment.description == "Why:\n\t- green converts better"
    failure = await fails(
        stubs.lifecycle.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=experiment(unique_key, name="two\nlines")),
            metadata=stubs.admin,
        )
    )
    assert "experiment.name" in failure.violations


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (apb.AssignRequest(experiment="k", subject_id="s" * 257), "subject_id"),
        (apb.AssignRequest(experiment="k" * 65, subject_id="s"), "experiment"),
        (
            apb.AssignAllRequest(
                subject_id="s",
                context=apb.SubjectContext(attributes={f"a{i}": "v" for i in range(65)}),
            ),
            "context.attributes",
        ),
        (
            apb.AssignAllRequest(
                subject_id="s", context=apb.SubjectContext(attributes={"a": "v" * 257})
            ),
            "context.attributes['a']",
        ),
        (
            apb.AssignAllRequest(
                subject_id="s", context=apb.SubjectContext(attributes={"k" * 65: "v"})
            ),
            f"context.attributes['{'k' * 40}...']",
        ),
    ],
    ids=["subject", "reference", "attribute-count", "attribute-value", "attribute-key"],
)
async def test_lengths_and_counts_are_bounded(
    stubs: Stubs, request_message: Message, field: str
) -> None:
    method = "Assign" if isinstance(request_message, apb.AssignRequest) else "AssignAll"
    failure = await fails(stubs.method("assignment", method)(request_message, metadata=stubs.pay))
    assert failure.code == INVALID
    assert field in failure.violations, failure.violations


# --- numbers and configs -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
async def test_nan_and_infinity_in_a_config_are_invalid_argument(
    stubs: Stubs, unique_key: str, bad: float
) -> None:
    exp = experiment(unique_key)
    exp.variants[1].config.update({"nested": {"discount": bad}})
    failure = await fails(
        stubs.lifecycle.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=exp), metadata=stubs.admin
        )
    )
    assert failure.code == INVALID
    assert "experiment.variants[1].config.nested.discount" in failure.violations


async def test_config_depth_and_weights_are_bounded(stubs: Stubs, unique_key: str) -> None:
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(8):
        deep = {"d": deep}
    exp = experiment(unique_key)
    exp.variants[0].config.update(deep)
    exp.variants[1].weight = 1e300
    exp.exposure_percent = math.nan
    failure = await fails(
        stubs.lifecycle.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=exp), metadata=stubs.admin
        )
    )
    assert failure.code == INVALID
    assert any("nesting deeper" in d for d in failure.violations.values()), failure.violations
    assert "experiment.exposure_percent" in failure.violations
    # The weight's range is the domain's rule, reported once the edge passes.
    exp.variants[0].config.Clear()
    exp.ClearField("exposure_percent")
    failure = await fails(
        stubs.lifecycle.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=exp), metadata=stubs.admin
        )
    )
    assert "experiment.variants[1].weight" in failure.violations


async def test_an_event_value_cannot_make_revenue_infinite(stubs: Stubs, unique_key: str) -> None:
    await running(stubs, unique_key)
    decision = (
        await stubs.assignment.Assign(
            apb.AssignRequest(experiment=unique_key, subject_id="rich"), metadata=stubs.pay
        )
    ).decision
    huge = tpb.TrackedEvent(
        experiment=unique_key,
        subject_id="rich",
        variant_id=decision.variant.id,
        event_type=tpb.EVENT_TYPE_CONVERSION,
        value=1e308,
        currency="XOF",
        client_event_id=uuid.uuid4().hex,
    )
    for _ in range(2):
        failure = await fails(
            stubs.tracking.Track(tpb.TrackRequest(event=huge), metadata=stubs.pay)
        )
        assert failure.code == INVALID
        assert "event.value" in failure.violations
    results = await stubs.insights.GetResults(
        ipb.GetResultsRequest(experiment=unique_key), metadata=stubs.admin
    )
    totals = [r.total for v in results.variants for r in v.revenue]
    assert all(math.isfinite(t) for t in totals)


# --- TrackBatch: one bad event fails only itself -------------------------------------------


async def test_one_bad_event_fails_only_its_item(stubs: Stubs, unique_key: str) -> None:
    await running(stubs, unique_key)
    decision = (
        await stubs.assignment.Assign(
            apb.AssignRequest(experiment=unique_key, subject_id="batch"), metadata=stubs.pay
        )
    ).decision

    def event(**fields: Any) -> tpb.TrackedEvent:
        base: dict[str, Any] = {
            "experiment": unique_key,
            "subject_id": "batch",
            "variant_id": decision.variant.id,
            "event_type": tpb.EVENT_TYPE_CHURN,
            "client_event_id": uuid.uuid4().hex,
        }
        return tpb.TrackedEvent(**{**base, **fields})

    events = [
        event(),
        event(experiment="\x00"),
        event(subject_id="bat\x00ch"),
        event(event_type=tpb.EVENT_TYPE_CONVERSION, value=1e308, currency="XOF"),
        event(client_event_id="x" * 200),
        event(),
    ]
    response = await stubs.tracking.TrackBatch(
        tpb.TrackBatchRequest(events=events), metadata=stubs.pay
    )
    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["accepted", "error", "error", "error", "error", "accepted"]
    fields = [r.error.field for r in response.results[1:5]]
    assert fields == [
        "event.experiment",
        "event.subject_id",
        "event.value",
        "event.client_event_id",
    ]
    assert all(r.error.code == INVALID.value[0] for r in response.results[1:5])


# --- page tokens -------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


FORGED_TOKENS = [
    _b64(json.dumps({"q": "audit:", "i": 9223372036854775808}).encode()),
    _b64(b"[" * 1000),
    _b64(json.dumps({"q": "audit:", "i": -1}).encode()),
    _b64(json.dumps({"q": "audit:", "i": True}).encode()),
    _b64(json.dumps({"q": "audit:", "i": 5, "x": 1}).encode()),
    _b64(json.dumps({"q": "experiments:", "t": 10**30, "i": str(uuid.uuid4())}).encode()),
    _b64(json.dumps({"q": "experiments:", "t": 1, "i": "not-a-uuid"}).encode()),
    _b64(b"\xff\xfe"),
    "%%%not-base64",
    "A" * 300,
]


@pytest.mark.parametrize("token", FORGED_TOKENS, ids=range(len(FORGED_TOKENS)))
async def test_forged_page_tokens_are_invalid_argument(stubs: Stubs, token: str) -> None:
    for call in (
        stubs.lifecycle.ListAuditEvents(
            lpb.ListAuditEventsRequest(page_token=token), metadata=stubs.admin
        ),
        stubs.lifecycle.ListExperiments(
            lpb.ListExperimentsRequest(page_token=token), metadata=stubs.admin
        ),
    ):
        failure = await fails(call)
        assert failure.code == INVALID, failure.message
        assert "page_token" in failure.violations


async def test_real_page_tokens_still_page(stubs: Stubs, unique_key: str) -> None:
    for i in range(3):
        await stubs.lifecycle.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=experiment(f"{unique_key}-{i}")),
            metadata=stubs.admin,
        )
    first = await stubs.lifecycle.ListAuditEvents(
        lpb.ListAuditEventsRequest(page_size=1), metadata=stubs.admin
    )
    second = await stubs.lifecycle.ListAuditEvents(
        lpb.ListAuditEventsRequest(page_size=1, page_token=first.next_page_token),
        metadata=stubs.admin,
    )
    assert second.events[0].id < first.events[0].id
    listed = await stubs.lifecycle.ListExperiments(
        lpb.ListExperimentsRequest(page_size=1), metadata=stubs.admin
    )
    more = await stubs.lifecycle.ListExperiments(
        lpb.ListExperimentsRequest(page_size=1, page_token=listed.next_page_token),
        metadata=stubs.admin,
    )
    assert more.experiments[0].id != listed.experiments[0].id


# --- undecodable bytes ------------------------------------------------------------------------


async def test_undecodable_bytes_are_invalid_argument_without_a_traceback(
    stubs: Stubs, sira_server: RunningServer
) -> None:
    log_before = len(sira_server.log())
    garbage = [b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\x0f", b"\x12\x05ab"]
    calls = [
        ("/sira.experiments.v1.TrackingService/Track", ()),
        ("/sira.experiments.v1.AssignmentService/Assign", stubs.pay),
        ("/sira.experiments.v1.LifecycleService/ListExperiments", stubs.admin),
    ]
    for _ in range(5):
        for method, metadata in calls:
            call = stubs.channel.unary_unary(
                method, request_serializer=None, response_deserializer=None
            )
            for raw in garbage:
                failure = await fails(call(raw, metadata=metadata))
                assert failure.code == INVALID, (method, raw, failure.message)
                assert "request" in failure.violations
    # A valid call after all that: the server is fine and its log has no traceback.
    await stubs.lifecycle.ListExperiments(lpb.ListExperimentsRequest(), metadata=stubs.admin)
    new_log = sira_server.log()[log_before:]
    assert "Traceback" not in new_log
    assert new_log.count("undecodable") <= 1


# --- trailers stay small whatever the input --------------------------------------------------


async def test_errors_quote_little_and_trailers_stay_small(stubs: Stubs, unique_key: str) -> None:
    huge = "é" * 1_500_000  # 3 MB of UTF-8, under the default 4 MiB message limit
    failure = await fails(
        stubs.assignment.Assign(
            apb.AssignRequest(experiment=unique_key, subject_id=huge), metadata=stubs.pay
        )
    )
    assert failure.code == INVALID
    assert failure.trailer_bytes < TRAILER_BUDGET
    # Many violations, each quoting input: capped in number and length.
    junk = ["Ω" * 120 + str(i) for i in range(256)]
    exp = experiment(unique_key, targeting=epb.Targeting(countries=junk, languages=junk))
    failure = await fails(
        stubs.lifecycle.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=exp), metadata=stubs.admin
        )
    )
    assert failure.code == INVALID
    assert 0 < len(failure.violations) <= 10
    assert failure.trailer_bytes < TRAILER_BUDGET
    assert "Ω" * 101 not in failure.message
    assert all("Ω" * 101 not in d for d in failure.violations.values())


async def test_not_found_quotes_at_most_a_hundred_characters(stubs: Stubs, unique_key: str) -> None:
    subject = "s" * 256
    await running(stubs, unique_key)
    event = tpb.TrackedEvent(
        experiment=unique_key,
        subject_id=subject,
        variant_id="blue",
        event_type=tpb.EVENT_TYPE_CHURN,
    )
    failure = await fails(stubs.tracking.Track(tpb.TrackRequest(event=event), metadata=stubs.pay))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "s" * 101 not in failure.message
    assert all(len(v) <= 128 for v in failure.info.metadata.values())


# --- acknowledged means written: Redis counters equal Postgres rows ----------------------------


@pytest.fixture(scope="module")
async def own_server(
    postgres_server_dsn: str, redis_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[RunningServer, str, str]]:
    """A server of this module's own, on the engineer's test Redis database: its flusher
    and its counters are not shared with any other test."""
    database_url = await create_migrated_database(postgres_server_dsn, "sira_edge")
    flush = aioredis.Redis.from_url(redis_server_url)
    await flush.flushdb()
    await flush.aclose()
    data_dir: Path = tmp_path_factory.mktemp("edge-server")
    try:
        with run_sira_server(database_url, redis_server_url, data_dir) as server:
            yield server, database_url, redis_server_url
    finally:
        await drop_database(postgres_server_dsn, database_url)


async def _flushed(redis_url: str, experiment_id: str) -> None:
    """Until the flusher has read and acknowledged every write-behind record."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        for _ in range(600):
            groups = await client.xinfo_groups(experiment_keys(experiment_id).wb)
            group = next((g for g in groups if g["name"] == FLUSHER_GROUP.encode()), None)
            if group is not None and group["pending"] == 0 and group["lag"] == 0:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the flusher never caught up: {groups}")
    finally:
        await client.aclose()


async def test_hostile_input_never_splits_redis_from_postgres(
    own_server: tuple[RunningServer, str, str], token_for: TokenFor
) -> None:
    server, database_url, redis_url = own_server
    key = f"h-{uuid.uuid4().hex[:12]}"
    async with grpc.aio.insecure_channel(server.address) as channel:
        stubs = Stubs(channel, token_for)
        experiment_id = await running(stubs, key)
        hostile_contexts = [
            apb.SubjectContext(attributes={"a": "\x00"}),
            apb.SubjectContext(attributes={"\x00": "a"}),
            apb.SubjectContext(country="\x00"),
            apb.SubjectContext(user_segment="x\x7f"),
            apb.SubjectContext(attributes={"a": "\u0085"}),
        ]
        for i, ctx in enumerate(hostile_contexts):
            for call in (
                stubs.assignment.AssignAll(
                    apb.AssignAllRequest(subject_id=f"hostile-{i}", context=ctx),
                    metadata=stubs.pay,
                ),
                stubs.assignment.Assign(
                    apb.AssignRequest(experiment=key, subject_id=f"hostile-{i}", context=ctx),
                    metadata=stubs.pay,
                ),
            ):
                assert (await fails(call)).code == INVALID
        for subject in ("nul\x00", "bell\x07", "x" * 257):
            failure = await fails(
                stubs.assignment.Assign(
                    apb.AssignRequest(experiment=key, subject_id=subject), metadata=stubs.pay
                )
            )
            assert failure.code == INVALID
        assigned: dict[str, str] = {}
        for i in range(10):
            subject = f"ok-{i}-ünïcode ✓"
            decision = (
                await stubs.assignment.Assign(
                    apb.AssignRequest(
                        experiment=key,
                        subject_id=subject,
                        context=apb.SubjectContext(country="SN", attributes={"plan": "a b\u00a0c"}),
                    ),
                    metadata=stubs.pay,
                )
            ).decision
            assigned[subject] = decision.variant.id
        events = [
            tpb.TrackedEvent(
                experiment=key,
                subject_id=subject,
                variant_id=variant,
                event_type=tpb.EVENT_TYPE_CONVERSION,
                value=value,
                currency="XOF",
                client_event_id=event_id,
            )
            for (subject, variant), value, event_id in zip(
                assigned.items(),
                [10.0, 1e308, math.nan, 5.0, 1e12, 1e13, 7.5, 0.5, 2.0, 3.0],
                ["e1", "e2", "e3", "e\x00", "e5", "e6", "é" * 129, "é" * 128, "e9", "e10"],
                strict=True,
            )
        ]
        response = await stubs.tracking.TrackBatch(
            tpb.TrackBatchRequest(events=events), metadata=stubs.pay
        )
        accepted = [r.WhichOneof("result") == "accepted" for r in response.results]
        assert accepted == [True, False, False, False, True, False, False, True, True, True]
        results = await stubs.insights.GetResults(
            ipb.GetResultsRequest(experiment=key), metadata=stubs.admin
        )
    await _flushed(redis_url, experiment_id)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetchval(
            "SELECT count(*) FROM experiment_assignments WHERE experiment_id = $1",
            uuid.UUID(experiment_id),
        )
        metric_rows = await conn.fetchval(
            "SELECT count(*) FROM experiment_metrics WHERE experiment_id = $1",
            uuid.UUID(experiment_id),
        )
    finally:
        await conn.close()
    dead = aioredis.Redis.from_url(redis_url)
    try:
        dead_letters = await dead.xlen(experiment_keys(experiment_id).dead)
    finally:
        await dead.aclose()
    assigned_count = sum(v.assigned_subjects for v in results.variants)
    conversions = sum(v.conversions for v in results.variants)
    assert (assigned_count, conversions, dead_letters) == (10, 5, 0)
    assert (rows, metric_rows) == (assigned_count, conversions)


@pytest.mark.parametrize("sub", ["olga\x00", "tab\there", "o" * 257])
async def test_a_token_subject_postgres_cannot_store_is_unauthenticated(
    stubs: Stubs, token_for: TokenFor, unique_key: str, sub: str
) -> None:
    """The token's subject becomes the audit log's actor: a NUL there was INTERNAL."""
    metadata = (("authorization", f"Bearer {token_for('ops_admin', sub)}"),)
    failure = await fails(
        stubs.lifecycle.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=experiment(unique_key)), metadata=metadata
        )
    )
    assert failure.code == grpc.StatusCode.UNAUTHENTICATED
    assert failure.info.reason == "ERROR_REASON_TOKEN_INVALID"
