"""Fail-fast auto-stop: the pure plan, one real round against Postgres + Redis, and the
server's own background rounds seen through gRPC (drop, stickiness, report-only mode, the
refund-aware reward)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format

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
from sira_server.domain.autopilot import AUTOPILOT_ACTOR, plan
from sira_server.domain.experiment import (
    Allocation,
    Experiment,
    ExperimentStatus,
    FailFast,
    Reward,
    Variant,
    VariantState,
)
from sira_server.domain.insights import (
    ArmCounts,
    ExperimentInsights,
    RecommendedAction,
    compute_insights,
)
from sira_server.domain.targeting import TargetingRule
from sira_server.domain.validation import ExperimentInput, VariantInput, validate_experiment
from sira_server.engine.autopilot import AUTOPILOT_LOCK, FailFastAutopilot
from sira_server.engine.catalog import ExperimentCatalog, LiveExperiment
from sira_server.engine.insights_book import InsightsBook
from sira_server.store.experiments import ExperimentRepository
from sira_server.store.hot_state import HotState, TrackEvent
from sira_server.store.redis_conn import create_redis

TokenFor = Callable[..., str]
Metadata = tuple[tuple[str, str], ...]

RULE = FailFast(threshold=0.95, min_samples=100, auto_stop=True)
DEADLINE_SECONDS = 30.0
AUTOPILOT_ROUND_SECONDS = 2.0
"""FailFastAutopilot's default interval in the server."""


# --- plan(): pure cases --------------------------------------------------------------


def make_experiment(
    names: Sequence[str] = ("Alpha", "Beta", "Gamma"),
    *,
    rule: FailFast = RULE,
    status: ExperimentStatus = ExperimentStatus.RUNNING,
    dropped: Sequence[str] = (),
) -> Experiment:
    now = datetime.now(UTC)
    variants = tuple(
        Variant(
            id=str(uuid.uuid4()),
            key=name.lower(),
            name=name,
            config={},
            is_control=i == 0,
            weight=1.0,
            position=i,
            state=VariantState.DROPPED if name in dropped else VariantState.ACTIVE,
        )
        for i, name in enumerate(names)
    )
    return Experiment(
        id=str(uuid.uuid4()),
        key="exp",
        name="Experiment",
        description="",
        status=status,
        targeting=TargetingRule(),
        allocation=Allocation.THOMPSON_SAMPLING,
        exposure_percent=100.0,
        primary_metric="conversion",
        fail_fast=rule,
        reward=Reward.CONVERSION,
        variants=variants,
        created_by="mia",
        created_at=now,
        updated_at=now,
        version=2,
    )


def insights_of(
    experiment: Experiment,
    conversions: Sequence[tuple[int, int]],
    refunded: Sequence[int] | None = None,
) -> ExperimentInsights:
    """compute_insights on (samples, converted subjects) per variant."""
    refunds = refunded or [0] * len(conversions)
    return compute_insights(
        [
            ArmCounts.from_variant(
                v, assigned_subjects=n, converted_subjects=c, refunded_subjects=r
            )
            for v, (n, c), r in zip(experiment.variants, conversions, refunds, strict=True)
        ],
        experiment.fail_fast,
        status=experiment.status,
    )


ONE_FAILS = [(300, 90), (300, 9), (300, 90)]
"""Beta converts at 3 %, Alpha and Gamma at 30 % (a tie: no winner)."""


def test_auto_stop_off_only_reports() -> None:
    experiment = make_experiment(rule=replace(RULE, auto_stop=False))
    insights = insights_of(experiment, ONE_FAILS)
    assert insights.failing_variant_ids == (experiment.variants[1].id,)
    assert plan(experiment, insights).empty


def test_failing_variant_is_dropped_with_its_evidence() -> None:
    experiment = make_experiment()
    insights = insights_of(experiment, ONE_FAILS)
    assert insights.action is RecommendedAction.DROP_VARIANTS
    steps = plan(experiment, insights)
    beta = experiment.variants[1]
    assert steps.drop == (beta.id,)
    assert steps.winner is None
    assert steps.reason == insights.recommendation
    proof = steps.evidence
    assert (proof["threshold"], proof["min_samples"]) == (0.95, 100)
    assert proof["draws"] == insights.draws
    row = proof["variants"][1]
    assert row["variant_id"] == beta.id
    assert (row["samples"], row["conversions"]) == (300, 9)
    assert row["fails_fast"] is True
    assert row["prob_worse_than_best"] == insights.insights[1].prob_worse_than_best > 0.95
    assert row["credible_interval"] == list(insights.insights[1].confidence_interval)


def test_guardrail_flagged_variant_is_dropped_and_the_last_one_wins() -> None:
    """Equal conversion, but Alpha's refund rate is far higher: Alpha fails its guardrail,
    Beta is the only active variant left, so the plan drops Alpha and concludes."""
    experiment = make_experiment(("Alpha", "Beta"))
    insights = insights_of(experiment, [(300, 60), (300, 60)], refunded=[60, 6])
    alpha, beta = experiment.variants
    assert not any(v.fails_fast for v in insights.insights)
    assert [g.metric for g in insights.insights[0].guardrails if g.flagged] == ["refund"]
    steps = plan(experiment, insights)
    assert steps.drop == (alpha.id,)
    assert steps.winner == beta.id
    assert "'Beta' wins" in steps.reason
    assert steps.evidence["variants"][0]["guardrails_flagged"] == ["refund"]


def test_guardrail_drop_keeps_the_others_running() -> None:
    experiment = make_experiment()
    insights = insights_of(experiment, [(300, 60)] * 3, refunded=[6, 60, 6])
    steps = plan(experiment, insights)
    assert steps.drop == (experiment.variants[1].id,)
    assert steps.winner is None


def test_one_remaining_active_variant_concludes() -> None:
    """Beta and Gamma were dropped earlier: Alpha is the only active variant and wins."""
    experiment = make_experiment(dropped=("Beta", "Gamma"))
    insights = insights_of(experiment, [(300, 90), (300, 9), (120, 10)])
    assert insights.failing_variant_ids == ()  # dropped variants are not failing again
    steps = plan(experiment, insights)
    assert steps.winner == experiment.variants[0].id
    assert steps.drop == ()
    assert "only active variant" in steps.reason


def test_a_dropped_variant_is_never_dropped_twice() -> None:
    """Gamma was dropped earlier; Beta fails now: Alpha is left and wins."""
    experiment = make_experiment(dropped=("Gamma",))
    insights = insights_of(experiment, [(300, 90), (300, 9), (120, 10)])
    steps = plan(experiment, insights)
    assert steps.winner == experiment.variants[0].id
    assert experiment.variants[2].id not in steps.drop


def test_stop_with_winner_drops_the_loser_and_cites_the_rule() -> None:
    experiment = make_experiment(("Blue", "Green"))
    insights = insights_of(experiment, [(1000, 45), (1000, 85)])
    assert insights.action is RecommendedAction.STOP_WITH_WINNER
    steps = plan(experiment, insights)
    assert steps.winner == experiment.variants[1].id
    assert steps.drop == (experiment.variants[0].id,)
    assert steps.reason.endswith(insights.recommendation)
    assert "e-value" in steps.reason
    assert "at most 5.0%" in steps.reason
    assert steps.evidence["leading_variant_id"] == experiment.variants[1].id
    assert steps.evidence["error_rate"] == 0.05
    assert steps.evidence["e_value_threshold"] == pytest.approx(20.0)
    blue = steps.evidence["variants"][0]
    assert blue["fails_fast"]
    assert blue["e_value"] >= 20.0
    assert 0.0 <= blue["prob_worse_than_best"] <= 1.0


def test_a_tie_between_two_arms_plans_nothing() -> None:
    experiment = make_experiment(("Blue", "Green"))
    assert plan(experiment, insights_of(experiment, [(1000, 60), (1000, 66)])).empty


@pytest.mark.parametrize("status", [ExperimentStatus.STOPPED, ExperimentStatus.DRAFT])
def test_not_running_plans_nothing(status: ExperimentStatus) -> None:
    experiment = make_experiment(status=status)
    assert plan(experiment, insights_of(experiment, ONE_FAILS)).empty


def test_nothing_to_do_while_evidence_is_thin() -> None:
    experiment = make_experiment()
    assert plan(experiment, insights_of(experiment, [(50, 15), (50, 1), (50, 15)])).empty


# --- one real round against Postgres + Redis --------------------------------------------


@dataclass
class Engine:
    pool: asyncpg.Pool
    repository: ExperimentRepository
    catalog: ExperimentCatalog
    hot: HotState
    book: InsightsBook
    autopilot: FailFastAutopilot


@pytest.fixture
async def engine(migrated_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Engine]:
    """The server's pieces wired as app.py wires them, without gRPC or background tasks."""
    redis = create_redis(redis_url)
    catalog: ExperimentCatalog | None = None

    async def on_change(experiment_id: str) -> None:
        assert catalog is not None
        await catalog.reload(experiment_id)  # this process only: no pub/sub to others

    repository = ExperimentRepository(migrated_pool, on_change)
    catalog = ExperimentCatalog(repository, migrated_pool, redis)
    hot = HotState(redis, migrated_pool)

    async def prepare_hot_state(live: LiveExperiment | None, experiment_id: str) -> None:
        if live is not None and live.running:
            await hot.init_experiment(live.id, live.variant_ids, live.experiment.reward.value)

    catalog.add_listener(prepare_hot_state)
    book = InsightsBook(hot)
    try:
        yield Engine(
            migrated_pool,
            repository,
            catalog,
            hot,
            book,
            FailFastAutopilot(catalog, book, repository, migrated_pool),
        )
    finally:
        await hot.close()
        await redis.aclose()


async def running_experiment(engine: Engine, *, auto_stop: bool) -> Experiment:
    spec = validate_experiment(
        ExperimentInput(
            name="Payment Method Priority",
            auto_stop=auto_stop,
            fail_fast_threshold=0.95,
            fail_fast_min_samples=100,
            variants=[
                VariantInput(name="Alpha", config={}, is_control=True),
                VariantInput(name="Beta", config={}),
                VariantInput(name="Gamma", config={}),
            ],
        )
    )
    created = await engine.repository.create(spec, actor="mia")
    return await engine.repository.start(created.id, actor="mia")


async def seed_counters(
    hot: HotState, experiment: Experiment, counts: Sequence[tuple[int, int]]
) -> None:
    """Assignments and first conversions through the store's own Lua scripts: the hot
    counters the server would hold after this traffic."""
    now = int(time.time() * 1000)
    for variant, (n, converted) in zip(experiment.variants, counts, strict=True):
        subjects = [f"{variant.key}-{k}" for k in range(n)]
        await asyncio.gather(*(hot.assign(experiment.id, s, variant.id, 1 / 3) for s in subjects))
        outcomes = await hot.track_many(
            experiment.id,
            [
                TrackEvent(s, variant.id, "conversion", f"{s}-paid", now)
                for s in subjects[:converted]
            ],
        )
        assert all(o.first_conversion for o in outcomes)


async def sira_audit(pool: asyncpg.Pool, experiment_id: str) -> list[tuple[str, Any]]:
    rows = await pool.fetch(
        "SELECT action, details FROM experiment_audit_logs "
        "WHERE experiment_id = $1 AND actor = $2 ORDER BY id",
        uuid.UUID(experiment_id),
        AUTOPILOT_ACTOR,
    )
    return [(row["action"], row["details"]) for row in rows]


async def test_round_drops_the_failing_variant_with_audited_evidence(engine: Engine) -> None:
    experiment = await running_experiment(engine, auto_stop=True)
    alpha, beta, gamma = experiment.variants
    await seed_counters(engine.hot, experiment, ONE_FAILS)

    # Another replica holds the round's lock: this one does nothing.
    async with engine.pool.acquire() as other:
        await other.execute("SELECT pg_advisory_lock($1)", AUTOPILOT_LOCK)
        try:
            assert await engine.autopilot.round() == []
        finally:
            await other.execute("SELECT pg_advisory_unlock($1)", AUTOPILOT_LOCK)
    assert (await engine.repository.get(experiment.id)).variants[1].is_active

    plans = await engine.autopilot.round()
    assert [p.drop for p in plans] == [(beta.id,)]
    assert plans[0].winner is None
    after = await engine.repository.get(experiment.id)
    assert after.status is ExperimentStatus.RUNNING
    assert [v.state for v in after.variants] == [
        VariantState.ACTIVE,
        VariantState.DROPPED,
        VariantState.ACTIVE,
    ]
    assert after.variants[1].dropped_at is not None
    assert not engine.catalog.running()[0].active[1]  # the decision path knows at once

    audit = await sira_audit(engine.pool, experiment.id)
    assert [action for action, _ in audit] == ["variant_dropped"]
    details = audit[0][1]
    assert (details["variant_id"], details["variant_key"]) == (beta.id, "beta")
    assert (details["threshold"], details["min_samples"]) == (0.95, 100)
    rows = {row["variant_id"]: row for row in details["variants"]}
    assert (rows[beta.id]["samples"], rows[beta.id]["conversions"]) == (300, 9)
    assert rows[beta.id]["fails_fast"] is True
    assert rows[beta.id]["prob_worse_than_best"] > 0.95
    assert {rows[alpha.id]["conversions"], rows[gamma.id]["conversions"]} == {90}
    verdict = details["verdict"]  # the decision as data, not as words
    assert (verdict["action"], verdict["reason"]) == (
        "RECOMMENDED_ACTION_DROP_VARIANTS",
        "variants_failing",
    )
    assert verdict["variant_ids"] == [beta.id]
    assert verdict["e_value_threshold"] == details["e_value_threshold"]
    assert verdict["error_rate"] == 0.05
    assert "recommendation" not in details

    # Alpha and Gamma tie: the next round has nothing to do.
    assert await engine.autopilot.round() == []
    assert len(await sira_audit(engine.pool, experiment.id)) == 1


async def test_round_without_auto_stop_only_reports(engine: Engine) -> None:
    experiment = await running_experiment(engine, auto_stop=False)
    await seed_counters(engine.hot, experiment, ONE_FAILS)
    assert await engine.autopilot.round() == []
    live = engine.catalog.running()[0]
    verdict = (await engine.book.compute(live.experiment)).insights
    assert verdict.failing_variant_ids == (experiment.variants[1].id,)
    assert verdict.action is RecommendedAction.DROP_VARIANTS
    after = await engine.repository.get(experiment.id)
    assert after.status is ExperimentStatus.RUNNING
    assert all(v.is_active for v in after.variants)
    assert await sira_audit(engine.pool, experiment.id) == []


# --- the server's own rounds, through gRPC -------------------------------------------


@dataclass
class Api:
    lifecycle: lifecycle_service_pb2_grpc.LifecycleServiceStub
    assignment: assignment_service_pb2_grpc.AssignmentServiceStub
    tracking: tracking_service_pb2_grpc.TrackingServiceStub
    insights: insights_service_pb2_grpc.InsightsServiceStub
    operator: Metadata
    module: Metadata
    reader: Metadata

    async def create_and_start(self, experiment: epb.Experiment) -> epb.Experiment:
        await self.lifecycle.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=experiment), metadata=self.operator
        )
        started: epb.Experiment = (
            await self.lifecycle.StartExperiment(
                lpb.StartExperimentRequest(experiment=experiment.key), metadata=self.operator
            )
        ).experiment
        return started

    async def get(self, key: str) -> epb.Experiment:
        request = lpb.GetExperimentRequest(experiment=key)
        got: epb.Experiment = (
            await self.lifecycle.GetExperiment(request, metadata=self.reader)
        ).experiment
        return got

    async def assign(self, key: str, subject: str) -> apb.Decision:
        request = apb.AssignRequest(experiment=key, subject_id=subject)
        decision: apb.Decision = (
            await self.assignment.Assign(request, metadata=self.module)
        ).decision
        return decision

    async def assign_many(self, key: str, subjects: Sequence[str]) -> list[apb.Decision]:
        decisions: list[apb.Decision] = []
        for start in range(0, len(subjects), 50):
            batch = subjects[start : start + 50]
            decisions += await asyncio.gather(*(self.assign(key, s) for s in batch))
        return decisions

    async def track(
        self, key: str, subject: str, variant_id: str, event_type: tpb.EventType.ValueType
    ) -> tpb.TrackResponse:
        event = tpb.TrackedEvent(
            experiment=key,
            subject_id=subject,
            variant_id=variant_id,
            event_type=event_type,
            client_event_id=f"{subject}-{event_type}",
        )
        reply: tpb.TrackResponse = await self.tracking.Track(
            tpb.TrackRequest(event=event), metadata=self.module
        )
        return reply

    async def get_insights(self, key: str) -> ipb.GetInsightsResponse:
        request = ipb.GetInsightsRequest(experiment=key)
        reply: ipb.GetInsightsResponse = await self.insights.GetInsights(
            request, metadata=self.reader
        )
        return reply

    async def audit_by_sira(self, key: str) -> list[tuple[str, dict[str, Any]]]:
        request = lpb.ListAuditEventsRequest(experiment=key, page_size=100)
        events = (await self.lifecycle.ListAuditEvents(request, metadata=self.reader)).events
        return [
            (e.action, json_format.MessageToDict(e.details, preserving_proto_field_name=True))
            for e in events
            if e.actor == AUTOPILOT_ACTOR
        ]


@pytest.fixture
async def api(sira_server: Any, token_for: TokenFor) -> AsyncIterator[Api]:
    def bearer(role: str) -> Metadata:
        return (("authorization", f"Bearer {token_for(role, role)}"),)

    async with grpc.aio.insecure_channel(sira_server.address) as channel:
        yield Api(
            lifecycle_service_pb2_grpc.LifecycleServiceStub(channel),
            assignment_service_pb2_grpc.AssignmentServiceStub(channel),
            tracking_service_pb2_grpc.TrackingServiceStub(channel),
            insights_service_pb2_grpc.InsightsServiceStub(channel),
            operator=bearer("ops_admin"),
            module=bearer("pay_module"),
            reader=bearer("data_science"),
        )


def three_arms(key: str, *, auto_stop: bool) -> epb.Experiment:
    """Fixed 1:1:1 weights, so each arm gets its share whatever the results."""
    return epb.Experiment(
        key=key,
        name="Payment Method Priority",
        allocation=epb.ALLOCATION_STRATEGY_FIXED_WEIGHTS,
        variants=[
            epb.Variant(name="Alpha", is_control=True),
            epb.Variant(name="Beta"),
            epb.Variant(name="Gamma"),
        ],
        fail_fast=epb.FailFastSettings(threshold=0.95, min_samples=100, auto_stop=auto_stop),
    )


async def drive_one_failing_arm(
    api: Api, key: str, ids: Sequence[str], n: int
) -> dict[str, list[str]]:
    """n subjects; Alpha and Gamma convert 3 in 10 subjects, Beta 1 in 25 (deterministic
    patterns, so Alpha and Gamma tie and only Beta can fail). Subjects per variant id.

    Batch by batch, each batch's conversions tracked before the next batch: the server's
    autopilot may look at any moment, and every moment must show the same picture (all
    of Alpha's conversions tracked but none of Gamma's would make Gamma fail)."""
    by_variant: dict[str, list[str]] = {v: [] for v in ids}
    for start in range(0, n, 50):
        subjects = [f"{key}-s{i}" for i in range(start, min(start + 50, n))]
        decisions = await api.assign_many(key, subjects)
        tracks = []
        for subject, decision in zip(subjects, decisions, strict=True):
            assert decision.reason == apb.ASSIGNMENT_REASON_NEW
            variant_id = decision.variant.id
            k = len(by_variant[variant_id])
            by_variant[variant_id].append(subject)
            if k % 25 == 0 if variant_id == ids[1] else k % 10 < 3:
                tracks.append(api.track(key, subject, variant_id, tpb.EVENT_TYPE_CONVERSION))
        await asyncio.gather(*tracks)
    assert min(len(members) for members in by_variant.values()) >= 100  # ~150 +- 10 each
    return by_variant


async def test_server_drops_a_failing_arm_new_subjects_never_get_it(
    api: Api, unique_key: str
) -> None:
    key = unique_key
    started = await api.create_and_start(three_arms(key, auto_stop=True))
    ids = [v.id for v in started.variants]
    by_variant = await drive_one_failing_arm(api, key, ids, 450)

    deadline = time.monotonic() + DEADLINE_SECONDS
    experiment = await api.get(key)
    while experiment.variants[1].state != epb.VARIANT_STATE_DROPPED:
        assert time.monotonic() < deadline, "auto-stop never dropped Beta"
        await asyncio.sleep(0.25)
        experiment = await api.get(key)
    assert experiment.status == epb.EXPERIMENT_STATUS_RUNNING  # Alpha and Gamma tie
    assert [v.state for v in experiment.variants] == [
        epb.VARIANT_STATE_ACTIVE,
        epb.VARIANT_STATE_DROPPED,
        epb.VARIANT_STATE_ACTIVE,
    ]
    assert experiment.variants[1].HasField("drop_time")

    audit = await api.audit_by_sira(key)
    assert [action for action, _ in audit] == ["variant_dropped"]
    details = audit[0][1]
    assert details["variant_id"] == ids[1]
    rows = {row["variant_id"]: row for row in details["variants"]}
    # The always-valid rule may act mid-drive, on insights cached up to a second earlier
    # (its drop reaches Assign a moment later): never more than were assigned.
    assert 100 <= rows[ids[1]]["samples"] <= len(by_variant[ids[1]])
    assert rows[ids[1]]["fails_fast"] is True
    assert rows[ids[1]]["e_value"] >= details["e_value_threshold"] == pytest.approx(3 / 0.05)
    assert rows[ids[1]]["prob_worse_than_best"] > 0.95

    # The catalog change reaches Assign at once (same process): new subjects never get Beta.
    fresh = await api.assign_many(key, [f"{key}-new{i}" for i in range(300)])
    assert all(d.reason == apb.ASSIGNMENT_REASON_NEW for d in fresh)
    got = {d.variant.id for d in fresh}
    assert ids[1] not in got
    assert got == {ids[0], ids[2]}
    # Beta's own subjects keep it, and their events still count.
    held = await api.assign_many(key, by_variant[ids[1]])
    assert all(d.reason == apb.ASSIGNMENT_REASON_STICKY for d in held)
    assert {d.variant.id for d in held} == {ids[1]}
    late = by_variant[ids[1]][1]  # k=1: had not converted
    reply = await api.track(key, late, ids[1], tpb.EVENT_TYPE_CONVERSION)
    assert reply.outcome == tpb.TRACK_OUTCOME_ACCEPTED


async def test_server_without_auto_stop_only_reports(api: Api, unique_key: str) -> None:
    key = unique_key
    started = await api.create_and_start(three_arms(key, auto_stop=False))
    ids = [v.id for v in started.variants]
    await drive_one_failing_arm(api, key, ids, 450)

    deadline = time.monotonic() + DEADLINE_SECONDS
    insights = await api.get_insights(key)
    while list(insights.failing_variant_ids) != [ids[1]]:
        assert time.monotonic() < deadline, "Beta never reported as failing"
        await asyncio.sleep(0.25)
        insights = await api.get_insights(key)
    assert insights.action == ipb.RECOMMENDED_ACTION_DROP_VARIANTS
    assert "Beta" in insights.recommendation
    assert insights.insights[1].fails_fast

    # Two full autopilot rounds later, nothing has changed.
    await asyncio.sleep(2 * AUTOPILOT_ROUND_SECONDS + 0.5)
    experiment = await api.get(key)
    assert experiment.status == epb.EXPERIMENT_STATUS_RUNNING
    assert all(v.state == epb.VARIANT_STATE_ACTIVE for v in experiment.variants)
    assert await api.audit_by_sira(key) == []
    # Beta still gets new subjects (P(none of 60 at 1/3 each) = (2/3)**60 ~ 3e-11).
    fresh = await api.assign_many(key, [f"{key}-new{i}" for i in range(60)])
    assert ids[1] in {d.variant.id for d in fresh}


async def wait_insights(
    api: Api, key: str, done: Callable[[ipb.GetInsightsResponse], bool]
) -> ipb.GetInsightsResponse:
    """Insights are cached for about a second: poll until they show what we expect."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        reply = await api.get_insights(key)
        if done(reply):
            return reply
        assert time.monotonic() < deadline, reply
        await asyncio.sleep(0.2)


async def test_refund_retracts_a_success_under_conversion_not_refunded(
    api: Api, unique_key: str
) -> None:
    key = unique_key
    experiment = epb.Experiment(
        key=key,
        name="Premium Pricing",
        allocation=epb.ALLOCATION_STRATEGY_FIXED_WEIGHTS,
        reward=epb.REWARD_DEFINITION_CONVERSION_NOT_REFUNDED,
        variants=[epb.Variant(name="Standard", is_control=True), epb.Variant(name="Premium")],
    )
    started = await api.create_and_start(experiment)
    assert started.reward == epb.REWARD_DEFINITION_CONVERSION_NOT_REFUNDED
    subjects = [f"{key}-s{i}" for i in range(4)]
    variant_of = {
        s: d.variant.id for s, d in zip(subjects, await api.assign_many(key, subjects), strict=True)
    }
    for s in subjects[:3]:
        await api.track(key, s, variant_of[s], tpb.EVENT_TYPE_CONVERSION)

    def conversions(reply: ipb.GetInsightsResponse) -> dict[str, int]:
        return {v.variant_id: v.conversions for v in reply.insights}

    before = conversions(await wait_insights(api, key, lambda r: sum(conversions(r).values()) == 3))
    refunded = subjects[0]
    reply = await api.track(key, refunded, variant_of[refunded], tpb.EVENT_TYPE_REFUND)
    assert reply.outcome == tpb.TRACK_OUTCOME_ACCEPTED
    after = conversions(await wait_insights(api, key, lambda r: sum(conversions(r).values()) == 2))
    expected = dict(before)
    expected[variant_of[refunded]] -= 1
    assert after == expected

    # A refund of a subject who never converted retracts nothing (it counts for the
    # refund guardrail only); the same refund event again is a duplicate.
    await api.track(key, subjects[3], variant_of[subjects[3]], tpb.EVENT_TYPE_REFUND)
    again = await api.track(key, refunded, variant_of[refunded], tpb.EVENT_TYPE_REFUND)
    assert again.outcome == tpb.TRACK_OUTCOME_DUPLICATE
    final = await wait_insights(
        api,
        key,
        lambda r: (
            sum(g.subjects for v in r.insights for g in v.guardrails if g.metric == "refund") == 2
        ),
    )
    assert conversions(final) == expected
