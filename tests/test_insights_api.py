"""GetInsights through the real server: who may read it, numbers equal to the statistics
layer on the same counts (and to scipy's exact Beta quantiles), the SRM check, a draft's
answer, and the `sira insights` command."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from scipy import stats

from sira import cli
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
from sira_server.domain.experiment import Allocation, ExperimentStatus, FailFast, Reward
from sira_server.domain.insights import ArmCounts, compute_insights
from sira_server.store.hot_state import HotState
from sira_server.store.postgres import create_pool
from sira_server.store.redis_conn import create_redis

TokenFor = Callable[..., str]
Metadata = tuple[tuple[str, str], ...]

DEADLINE_SECONDS = 30.0
TOLERANCE = 1e-6


@dataclass
class Api:
    lifecycle: lifecycle_service_pb2_grpc.LifecycleServiceStub
    assignment: assignment_service_pb2_grpc.AssignmentServiceStub
    tracking: tracking_service_pb2_grpc.TrackingServiceStub
    insights: insights_service_pb2_grpc.InsightsServiceStub
    token_for: TokenFor

    def auth(self, role: str) -> Metadata:
        return (("authorization", f"Bearer {self.token_for(role, role)}"),)

    async def create(self, experiment: epb.Experiment, *, start: bool = True) -> epb.Experiment:
        request = lpb.CreateExperimentRequest(experiment=experiment)
        created: epb.Experiment = (
            await self.lifecycle.CreateExperiment(request, metadata=self.auth("marketing"))
        ).experiment
        if not start:
            return created
        started: epb.Experiment = (
            await self.lifecycle.StartExperiment(
                lpb.StartExperimentRequest(experiment=experiment.key),
                metadata=self.auth("marketing"),
            )
        ).experiment
        return started

    async def assign_many(self, key: str, subjects: Sequence[str]) -> list[apb.Decision]:
        async def one(subject: str) -> apb.Decision:
            request = apb.AssignRequest(experiment=key, subject_id=subject)
            reply = await self.assignment.Assign(request, metadata=self.auth("pay_module"))
            decision: apb.Decision = reply.decision
            return decision

        decisions: list[apb.Decision] = []
        for start in range(0, len(subjects), 50):
            decisions += await asyncio.gather(*(one(s) for s in subjects[start : start + 50]))
        return decisions

    async def track(
        self, key: str, subject: str, variant_id: str, event_type: tpb.EventType.ValueType
    ) -> None:
        event = tpb.TrackedEvent(
            experiment=key, subject_id=subject, variant_id=variant_id, event_type=event_type
        )
        reply = await self.tracking.Track(
            tpb.TrackRequest(event=event), metadata=self.auth("pay_module")
        )
        assert reply.outcome == tpb.TRACK_OUTCOME_ACCEPTED

    async def get_insights(self, key: str, role: str = "data_science") -> ipb.GetInsightsResponse:
        request = ipb.GetInsightsRequest(experiment=key)
        reply: ipb.GetInsightsResponse = await self.insights.GetInsights(
            request, metadata=self.auth(role)
        )
        return reply

    async def get_results(self, key: str) -> ipb.GetResultsResponse:
        request = ipb.GetResultsRequest(experiment=key)
        reply: ipb.GetResultsResponse = await self.insights.GetResults(
            request, metadata=self.auth("data_science")
        )
        return reply

    async def settled(
        self, key: str, subjects: int
    ) -> tuple[ipb.GetResultsResponse, ipb.GetInsightsResponse]:
        """Results and insights computed on the same counts: insights are cached for
        about a second, so poll until they show every subject and conversion."""
        results = await self.get_results(key)
        assert sum(v.assigned_subjects for v in results.variants) == subjects
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            insights = await self.get_insights(key)
            seen = [(v.samples, v.guardrails[0].subjects) for v in insights.insights]
            counted = [(v.assigned_subjects, v.refunded_subjects) for v in results.variants]
            if seen == counted and insights.compute_time.ToNanoseconds() > time.time_ns() - 5e9:
                return results, insights
            assert time.monotonic() < deadline, (seen, counted)
            await asyncio.sleep(0.2)


@pytest.fixture
async def api(sira_server: Any, token_for: TokenFor) -> AsyncIterator[Api]:
    async with grpc.aio.insecure_channel(sira_server.address) as channel:
        yield Api(
            lifecycle_service_pb2_grpc.LifecycleServiceStub(channel),
            assignment_service_pb2_grpc.AssignmentServiceStub(channel),
            tracking_service_pb2_grpc.TrackingServiceStub(channel),
            insights_service_pb2_grpc.InsightsServiceStub(channel),
            token_for,
        )


def three_arms(key: str, **fields: Any) -> epb.Experiment:
    return epb.Experiment(
        key=key,
        name="Payment Method Priority",
        variants=[
            epb.Variant(name="Wallet First", is_control=True),
            epb.Variant(name="Card First"),
            epb.Variant(name="Mobile Money First"),
        ],
        **fields,
    )


async def traffic(api: Api, key: str, n: int) -> dict[str, list[str]]:
    """n subjects; per variant, deterministic patterns of conversions (k % 7 < variant
    position + 1), refunds (every 9th converted) and churns (every 11th)."""
    subjects = [f"{key}-s{i}" for i in range(n)]
    decisions = await api.assign_many(key, subjects)
    by_variant: dict[str, list[str]] = {}
    for subject, decision in zip(subjects, decisions, strict=True):
        by_variant.setdefault(decision.variant.id, []).append(subject)
    calls = []
    for position, (variant_id, members) in enumerate(sorted(by_variant.items())):
        for k, subject in enumerate(members):
            if k % 7 <= position:
                calls.append(api.track(key, subject, variant_id, tpb.EVENT_TYPE_CONVERSION))
                if k % 9 == 0:
                    calls.append(api.track(key, subject, variant_id, tpb.EVENT_TYPE_REFUND))
            if k % 11 == 0:
                calls.append(api.track(key, subject, variant_id, tpb.EVENT_TYPE_CHURN))
    await asyncio.gather(*calls)
    return by_variant


def rpc_error(caught: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> tuple[grpc.StatusCode, str]:
    status = rpc_status.from_call(caught.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
    reason: str = info.reason
    return caught.value.code(), reason


async def test_readers_may_read_insights_modules_may_not(api: Api, unique_key: str) -> None:
    await api.create(three_arms(unique_key))
    for role in ("data_science", "marketing", "ops_admin"):
        reply = await api.get_insights(unique_key, role)
        assert len(reply.insights) == 3
    for role in ("pay_module", "connect_module"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.get_insights(unique_key, role)
        assert rpc_error(caught) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "ERROR_REASON_ROLE_NOT_ALLOWED",
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.insights.GetInsights(ipb.GetInsightsRequest(experiment=unique_key))
    assert rpc_error(caught) == (grpc.StatusCode.UNAUTHENTICATED, "ERROR_REASON_TOKEN_MISSING")


async def test_unknown_experiment_is_not_found(api: Api, unique_key: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.get_insights(unique_key)
    assert rpc_error(caught) == (grpc.StatusCode.NOT_FOUND, "ERROR_REASON_EXPERIMENT_NOT_FOUND")


def arm_counts(results: ipb.GetResultsResponse) -> list[ArmCounts]:
    return [
        ArmCounts(
            variant_id=v.variant_id,
            assigned_subjects=v.assigned_subjects,
            converted_subjects=v.converted_subjects,
            refunded_subjects=v.refunded_subjects,
            churned_subjects=v.churned_subjects,
            variant_key=v.variant_key,
            name=v.variant_name,
            is_control=v.is_control,
        )
        for v in results.variants
    ]


async def test_numbers_equal_the_statistics_layer_on_the_same_counts(
    api: Api, unique_key: str
) -> None:
    await api.create(three_arms(unique_key))
    await traffic(api, unique_key, 600)
    results, reply = await api.settled(unique_key, 600)

    expected = compute_insights(
        arm_counts(results),
        FailFast(threshold=reply.threshold, min_samples=reply.min_samples),
        reward=Reward.CONVERSION,
        allocation=Allocation.THOMPSON_SAMPLING,
        status=ExperimentStatus.RUNNING,
    )
    assert reply.status == epb.EXPERIMENT_STATUS_RUNNING
    assert (reply.threshold, reply.min_samples, reply.draws) == (0.95, 100, expected.draws)
    assert reply.leading_variant_id == expected.leading_variant_id
    assert ipb.RecommendedAction.Name(reply.action) == expected.action.value
    assert reply.recommendation == expected.recommendation
    assert tuple(reply.failing_variant_ids) == expected.failing_variant_ids
    assert not reply.srm.applicable  # a bandit has no promised split
    for got, want in zip(reply.insights, expected.insights, strict=True):
        assert (got.variant_id, got.variant, got.is_control) == (
            want.variant_id,
            want.variant,
            want.is_control,
        )
        assert (got.samples, got.conversions) == (want.samples, want.conversions)
        assert got.conversion_rate == pytest.approx(want.conversion_rate, abs=TOLERANCE)
        assert (got.confidence_interval.lower, got.confidence_interval.upper) == pytest.approx(
            want.confidence_interval, abs=TOLERANCE
        )
        # Same counts, same seed, same draws: the Monte Carlo numbers are the same too.
        assert got.prob_best == pytest.approx(want.prob_best, abs=TOLERANCE)
        assert got.prob_worse_than_best == pytest.approx(want.prob_worse_than_best, abs=TOLERANCE)
        assert got.expected_loss == pytest.approx(want.expected_loss, abs=TOLERANCE)
        assert got.fails_fast == want.fails_fast
        if want.lift is None:
            assert not got.HasField("lift")
        else:
            assert got.lift == pytest.approx(want.lift, abs=TOLERANCE)
            assert want.lift_interval is not None
            assert (got.lift_interval.lower, got.lift_interval.upper) == pytest.approx(
                want.lift_interval, abs=TOLERANCE
            )
        for g, w in zip(got.guardrails, want.guardrails, strict=True):
            assert (g.metric, g.subjects, g.flagged) == (w.metric, w.subjects, w.flagged)
            assert g.rate == pytest.approx(w.rate, abs=TOLERANCE)
            assert g.prob_worse_than_best == pytest.approx(w.prob_worse_than_best, abs=TOLERANCE)

    # Independent references: the posterior Beta(1 + s, 1 + n - s), exact quantiles.
    for got, counted in zip(reply.insights, results.variants, strict=True):
        n, s = counted.assigned_subjects, counted.converted_subjects
        assert got.conversions == s
        assert got.conversion_rate == pytest.approx((1 + s) / (2 + n), abs=1e-12)
        lower, upper = stats.beta.ppf([0.025, 0.975], 1 + s, 1 + n - s)
        assert got.confidence_interval.lower == pytest.approx(lower, abs=TOLERANCE)
        assert got.confidence_interval.upper == pytest.approx(upper, abs=TOLERANCE)
        for g in got.guardrails:
            events = counted.refunded_subjects if g.metric == "refund" else counted.churned_subjects
            assert g.subjects == events
            low, high = stats.beta.ppf([0.025, 0.975], 1 + events, 1 + n - events)
            assert g.credible_interval.lower == pytest.approx(low, abs=TOLERANCE)
            assert g.credible_interval.upper == pytest.approx(high, abs=TOLERANCE)
    assert sum(v.prob_best for v in reply.insights) == pytest.approx(1.0, abs=1e-9)


async def test_srm_flags_a_split_that_does_not_match_the_weights(
    api: Api, sira_server: Any, unique_key: str
) -> None:
    """Fixed 1:1 weights. Assign alone cannot break the split (it draws by the weights),
    so the extra subjects of the first arm go through the store's own assign script into
    the server's Redis: the same atomic step Assign ends with, minus the draw (like a
    second writer with a bug). Every count the server reads is then a real one."""
    key = unique_key
    started = await api.create(
        epb.Experiment(
            key=key,
            name="Checkout Button Color",
            allocation=epb.ALLOCATION_STRATEGY_FIXED_WEIGHTS,
            variants=[epb.Variant(name="Blue", is_control=True), epb.Variant(name="Green")],
        )
    )
    await api.assign_many(key, [f"{key}-s{i}" for i in range(200)])
    _, balanced = await api.settled(key, 200)
    srm = balanced.srm
    assert srm.applicable
    assert srm.degrees_of_freedom == 1
    counts = [v.samples for v in balanced.insights]
    chi2, p_value = stats.chisquare(counts)
    assert srm.chi_square == pytest.approx(chi2, rel=1e-9)
    assert srm.p_value == pytest.approx(p_value, rel=1e-9)
    assert srm.flagged == (p_value < 0.001)

    pool = await create_pool(sira_server.env["SIRA_DATABASE_URL"], max_size=2)
    redis = create_redis(sira_server.env["SIRA_REDIS_URL"])
    try:
        hot = HotState(redis, pool)
        blue = started.variants[0].id
        for i in range(200):
            outcome = await hot.assign(started.id, f"{key}-extra{i}", blue, 0.5)
            assert outcome.created
        await hot.close()
    finally:
        await redis.aclose()
        await pool.close()
    _, skewed = await api.settled(key, 400)
    before = [v.samples for v in balanced.insights]
    counts = [v.samples for v in skewed.insights]
    assert counts == [before[0] + 200, before[1]]
    chi2, p_value = stats.chisquare(counts)
    assert skewed.srm.flagged
    assert skewed.srm.chi_square == pytest.approx(chi2, rel=1e-9)
    assert skewed.srm.p_value == pytest.approx(p_value, rel=1e-6, abs=1e-300)
    assert skewed.srm.p_value < 0.001


async def test_draft_has_zeros_and_says_start(api: Api, unique_key: str) -> None:
    await api.create(three_arms(unique_key), start=False)
    reply = await api.get_insights(unique_key)
    assert reply.status == epb.EXPERIMENT_STATUS_DRAFT
    assert [(v.samples, v.conversions) for v in reply.insights] == [(0, 0)] * 3
    for v in reply.insights:
        assert v.conversion_rate == pytest.approx(0.5)  # the Beta(1, 1) prior's mean
        assert not v.fails_fast
    assert reply.leading_variant_id == ""
    assert list(reply.failing_variant_ids) == []
    assert reply.action == ipb.RECOMMENDED_ACTION_UNSPECIFIED
    assert "start" in reply.recommendation.lower()


def sira(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_prints_table_chart_and_recommendation_json_equals_rpc(
    api: Api,
    sira_server: Any,
    token_for: TokenFor,
    unique_key: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    await api.create(three_arms(unique_key))
    await traffic(api, unique_key, 300)
    _, reply = await api.settled(unique_key, 300)
    common = ("--address", sira_server.address, "--token", token_for("data_science", "dana"))

    code, out, err = await asyncio.to_thread(sira, capsys, "insights", unique_key, *common)
    assert (code, err) == (0, "")
    for v in reply.insights:  # table rows and chart bars
        assert f"{v.conversions}/{v.samples}" in out
        assert f"{v.conversion_rate * 100:.2f}%" in out
    bars = [line for line in out.splitlines() if line.startswith(("Wallet", "Card", "Mobile"))]
    assert sum("│" in bar and ("█" in bar or "░" in bar) for bar in bars) == 3
    assert "conversion rate, posterior mean and 95% credible interval" in out
    action = ipb.RecommendedAction.Name(reply.action).removeprefix("RECOMMENDED_ACTION_")
    assert (
        f"recommendation: {action.lower().replace('_', ' ')} — {reply.recommendation[:40]}" in out
    )

    code, out, err = await asyncio.to_thread(
        sira, capsys, "insights", unique_key, "--json", *common
    )
    assert (code, err) == (0, "")
    printed = json.loads(out)
    rpc = json_format.MessageToDict(
        await api.get_insights(unique_key), preserving_proto_field_name=True
    )
    # Same counts, same fixed Monte Carlo seed: only the computation time may differ.
    printed.pop("compute_time")
    rpc.pop("compute_time")
    assert printed == rpc
