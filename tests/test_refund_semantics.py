"""Reward CONVERSION_NOT_REFUNDED: which refunds retract a success, through the real server,
and the same rule when the hot state is rebuilt from Postgres (`store.rebuild.HotImage`).

The contract (proto `REWARD_DEFINITION_CONVERSION_NOT_REFUNDED`, docs/statistics.md): a
subject is a success while it has a conversion and no refund at or after its latest
conversion, by occurrence time. So a refund before any conversion blocks nothing,
conversion -> refund -> conversion counts, and repeated refunds change nothing more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

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
from sira_server.store.rebuild import HotImage

CONV = tpb.EVENT_TYPE_CONVERSION
REFUND = tpb.EVENT_TYPE_REFUND
DEADLINE_SECONDS = 30.0

# subject -> events in the order they are tracked: (type, occurred second, event id suffix)
SCENARIOS: dict[str, tuple[list[tuple[int, int, str]], int]] = {
    "refund-then-conversion": ([(REFUND, 1, "r"), (CONV, 2, "c")], 1),
    "conversion-then-refund": ([(CONV, 1, "c"), (REFUND, 2, "r")], 0),
    "conversion-refund-conversion": ([(CONV, 1, "c1"), (REFUND, 2, "r"), (CONV, 3, "c2")], 1),
    "duplicate-refunds": ([(CONV, 1, "c"), (REFUND, 2, "r1"), (REFUND, 3, "r2")], 0),
    "refund-again-after-reconversion": (
        [(CONV, 1, "c1"), (REFUND, 2, "r1"), (CONV, 3, "c2"), (REFUND, 4, "r2")],
        0,
    ),
    "late-arriving-earlier-refund": ([(CONV, 2, "c"), (REFUND, 1, "r")], 1),
    "refund-only": ([(REFUND, 1, "r")], 0),
}
"""Each scenario with the number of successes it must leave (0 or 1)."""


@dataclass
class Api:
    lifecycle: lifecycle_service_pb2_grpc.LifecycleServiceStub
    assignment: assignment_service_pb2_grpc.AssignmentServiceStub
    tracking: tracking_service_pb2_grpc.TrackingServiceStub
    insights: insights_service_pb2_grpc.InsightsServiceStub
    admin: tuple[tuple[str, str], ...]


@pytest.fixture
async def api(sira_server: Any, token_for: Callable[..., str]) -> AsyncIterator[Api]:
    token = token_for(["ops_admin", "pay_module"], "alice")
    admin = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(sira_server.address) as channel:
        yield Api(
            lifecycle_service_pb2_grpc.LifecycleServiceStub(channel),
            assignment_service_pb2_grpc.AssignmentServiceStub(channel),
            tracking_service_pb2_grpc.TrackingServiceStub(channel),
            insights_service_pb2_grpc.InsightsServiceStub(channel),
            admin,
        )


def _at(base: float, second: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(int((base + second) * 1000))
    return stamp


async def _successes(api: Api, key: str, expected: dict[str, int]) -> dict[str, int]:
    """Successes per variant once they match ``expected`` (insights are cached ~1 s), or
    the last reading after the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        reply: ipb.GetInsightsResponse = await api.insights.GetInsights(
            ipb.GetInsightsRequest(experiment=key), metadata=api.admin
        )
        got = {v.variant_id: v.conversions for v in reply.insights}
        if got == expected or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.2)


async def test_every_ordering_through_the_server(api: Api, unique_key: str) -> None:
    key = unique_key
    experiment = epb.Experiment(
        key=key,
        name="Refund orderings",
        allocation=epb.ALLOCATION_STRATEGY_FIXED_WEIGHTS,
        reward=epb.REWARD_DEFINITION_CONVERSION_NOT_REFUNDED,
        variants=[epb.Variant(name="A", is_control=True), epb.Variant(name="B")],
    )
    await api.lifecycle.CreateExperiment(
        lpb.CreateExperimentRequest(experiment=experiment), metadata=api.admin
    )
    started = await api.lifecycle.StartExperiment(
        lpb.StartExperimentRequest(experiment=key), metadata=api.admin
    )
    expected = {v.id: 0 for v in started.experiment.variants}
    base = time.time() - 600
    for name, (events, successes) in SCENARIOS.items():
        subject = f"{key}-{name}"
        decision = (
            await api.assignment.Assign(
                apb.AssignRequest(experiment=key, subject_id=subject), metadata=api.admin
            )
        ).decision
        variant = decision.variant.id
        expected[variant] += successes
        for event_type, second, suffix in events:
            event = tpb.TrackedEvent(
                experiment=key,
                subject_id=subject,
                variant_id=variant,
                event_type=event_type,
                client_event_id=f"{subject}-{suffix}",
                occur_time=_at(base, second),
            )
            reply = await api.tracking.Track(tpb.TrackRequest(event=event), metadata=api.admin)
            assert reply.outcome == tpb.TRACK_OUTCOME_ACCEPTED, (name, suffix)
        # The same refund event again is a duplicate and changes nothing.
        refund = next(e for e in events if e[0] == REFUND)
        again = tpb.TrackedEvent(
            experiment=key,
            subject_id=subject,
            variant_id=variant,
            event_type=REFUND,
            client_event_id=f"{subject}-{refund[2]}",
            occur_time=_at(base, refund[1]),
        )
        reply = await api.tracking.Track(tpb.TrackRequest(event=again), metadata=api.admin)
        assert reply.outcome == tpb.TRACK_OUTCOME_DUPLICATE
    assert await _successes(api, key, expected) == expected
    assert sum(expected.values()) == sum(s for _, s in SCENARIOS.values())


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_rebuild_applies_the_same_rule_in_any_row_order(name: str) -> None:
    """Postgres returns metric rows in no particular order: the result must not care."""
    events, successes = SCENARIOS[name]
    for order in (events, events[::-1]):
        image = HotImage(["a", "b"], "conversion_not_refunded")
        image.add_assignment("s", "a", 0.5, 1)
        for event_type, second, suffix in order:
            kind = "conversion" if event_type == CONV else "refund"
            image.add_metric("s", "a", kind, 0.0, None, suffix, 1000 * second)
        assert image.successes()["a"] == successes, (name, order)
        converted = 1 if any(e[0] == CONV for e in events) else 0
        assert image.counters.get("a|converted_subjects", 0) == converted


def test_rebuild_under_plain_conversion_ignores_refunds() -> None:
    image = HotImage(["a"], "conversion")
    image.add_assignment("s", "a", 1.0, 1)
    image.add_metric("s", "a", "conversion", 0.0, None, "c", 1000)
    image.add_metric("s", "a", "refund", 0.0, None, "r", 2000)
    assert image.successes()["a"] == 1
    assert image.outcome == {}
