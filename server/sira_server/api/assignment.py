"""AssignmentService: which variant a subject sees.

Per call: catalog lookup (in process) -> targeting -> exposure -> sticky LRU -> choice of
an arm -> ONE Redis round trip that makes the choice sticky unless another process got
there first (then its choice holds). Nothing here waits on Postgres in the normal case.

Redis down: subjects with an assignment are still answered (LRU, then Postgres); a new
subject gets UNAVAILABLE rather than an assignment that Redis would not know about.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from typing import Any, TypeAlias

import asyncpg
import grpc
from google.protobuf import timestamp_pb2

from sira.experiments.v1 import assignment_service_pb2 as pb
from sira.experiments.v1 import assignment_service_pb2_grpc
from sira_server.api.convert import json_to_struct
from sira_server.domain import limits
from sira_server.domain.bayes import new_rng_state
from sira_server.domain.exposure import is_exposed
from sira_server.domain.sticky_cache import StickyCache
from sira_server.domain.targeting import SubjectProfile
from sira_server.domain.validation import require_reference
from sira_server.engine.catalog import ExperimentCatalog, LiveExperiment
from sira_server.engine.decider import choose_new_arm, concluded_index, explore_share
from sira_server.engine.posteriors import PosteriorBook
from sira_server.errors import FieldViolation, InvalidArgument, Unavailable
from sira_server.metrics import Metrics
from sira_server.store.assignments import find_assignment
from sira_server.store.hot_keys import Assignment
from sira_server.store.hot_state import HotState
from sira_server.tracking_token import TrackingTokens

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

MAX_SUBJECT_ID = limits.MAX_SUBJECT_ID_CHARS
MAX_CONTEXT_VALUE = limits.MAX_CONTEXT_VALUE_CHARS
MAX_ATTRIBUTES = limits.MAX_CONTEXT_ATTRIBUTES


def validate_subject(subject_id: str, field: str = "subject_id") -> None:
    if not subject_id or len(subject_id) > MAX_SUBJECT_ID:
        raise InvalidArgument.from_violations(
            [FieldViolation(field, f"required, 1..{MAX_SUBJECT_ID} characters")]
        )


def profile_from_context(ctx: pb.SubjectContext) -> SubjectProfile:
    violations = []
    for name in ("country", "language", "device", "user_segment"):
        if len(getattr(ctx, name)) > MAX_CONTEXT_VALUE:
            violations.append(
                FieldViolation(f"context.{name}", f"at most {MAX_CONTEXT_VALUE} characters")
            )
    if ctx.HasField("transaction_count") and ctx.transaction_count < 0:
        violations.append(FieldViolation("context.transaction_count", "must be >= 0"))
    if len(ctx.attributes) > MAX_ATTRIBUTES:
        violations.append(FieldViolation("context.attributes", f"at most {MAX_ATTRIBUTES}"))
    elif _context_bytes(ctx) > limits.MAX_CONTEXT_BYTES:
        violations.append(
            FieldViolation(
                "context",
                f"its strings together must be at most {limits.MAX_CONTEXT_BYTES} bytes "
                "(it is stored with every assignment)",
            )
        )
    if violations:
        raise InvalidArgument.from_violations(violations)
    return SubjectProfile(
        country=ctx.country,
        language=ctx.language,
        device=ctx.device,
        user_segment=ctx.user_segment,
        transaction_count=ctx.transaction_count if ctx.HasField("transaction_count") else None,
        attributes=ctx.attributes,
    )


def _context_bytes(ctx: pb.SubjectContext) -> int:
    strings = [ctx.country, ctx.language, ctx.device, ctx.user_segment]
    for key, value in ctx.attributes.items():
        strings += (key, value)
    return sum(len(s.encode("utf-8")) for s in strings)


def context_json(ctx: pb.SubjectContext) -> str:
    """What the subject looked like when first assigned (kept with the assignment)."""
    data: dict[str, Any] = {
        k: v
        for k, v in (
            ("country", ctx.country),
            ("language", ctx.language),
            ("device", ctx.device),
            ("user_segment", ctx.user_segment),
        )
        if v
    }
    if ctx.HasField("transaction_count"):
        data["transaction_count"] = ctx.transaction_count
    if ctx.attributes:
        data["attributes"] = dict(ctx.attributes)
    return json.dumps(data, separators=(",", ":"))


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


class AssignmentServicer(assignment_service_pb2_grpc.AssignmentServiceServicer):
    def __init__(
        self,
        catalog: ExperimentCatalog,
        posteriors: PosteriorBook,
        hot: HotState,
        pool: asyncpg.Pool,
        metrics: Metrics,
        *,
        sticky_capacity: int = 200_000,
        tokens: TrackingTokens | None = None,
    ) -> None:
        """`tokens`: sign each decision that names a variant with a tracking token."""
        self._catalog = catalog
        self._posteriors = posteriors
        self._hot = hot
        self._pool = pool
        self._metrics = metrics
        self._sticky: StickyCache[Assignment] = StickyCache(sticky_capacity)
        self._rng_state = new_rng_state(secrets.randbits(62))
        self._rng = random.Random(secrets.randbits(64))
        self._variants: dict[tuple[str, int], tuple[pb.AssignedVariant, ...]] = {}
        self._tokens = tokens
        catalog.add_listener(self._on_change)

    def _sign(self, decision: pb.Decision, subject_id: str) -> None:
        if self._tokens is not None and decision.HasField("variant"):
            decision.tracking_token = self._tokens.issue(
                decision.experiment_id, subject_id, decision.variant.id, time.time()
            )

    async def _on_change(self, live: LiveExperiment | None, experiment_id: str) -> None:
        self._variants = {k: v for k, v in self._variants.items() if k[0] != experiment_id}
        if live is None:  # deleted or archived: its assignments are gone or unreachable
            self._sticky.invalidate_experiment(experiment_id)

    def _variant_messages(self, live: LiveExperiment) -> tuple[pb.AssignedVariant, ...]:
        key = (live.id, live.experiment.version)
        messages = self._variants.get(key)
        if messages is None:
            messages = tuple(
                pb.AssignedVariant(
                    id=v.id,
                    key=v.key,
                    name=v.name,
                    config=json_to_struct(v.config),
                    is_control=v.is_control,
                )
                for v in live.experiment.variants
            )
            self._variants[key] = messages
        return messages

    def _decision(
        self,
        live: LiveExperiment,
        reason: pb.AssignmentReason.ValueType,
        index: int | None = None,
        propensity: float = 0.0,
        assigned_ms: int | None = None,
    ) -> pb.Decision:
        decision = pb.Decision(
            experiment_id=live.id, experiment_key=live.experiment.key, reason=reason
        )
        if index is not None:
            decision.variant.CopyFrom(self._variant_messages(live)[index])
            decision.propensity = propensity
            if assigned_ms is not None:
                decision.assign_time.CopyFrom(_timestamp(assigned_ms))
        return decision

    async def decide(
        self, live: LiveExperiment, subject_id: str, profile: SubjectProfile, ctx: pb.SubjectContext
    ) -> pb.Decision:
        experiment = live.experiment
        if not live.eligible(profile):
            return self._decision(live, pb.ASSIGNMENT_REASON_NOT_ELIGIBLE)
        if not live.running:
            return self._decision(
                live, pb.ASSIGNMENT_REASON_CONCLUDED, concluded_index(experiment), 1.0
            )
        if not is_exposed(live.id, subject_id, experiment.exposure_percent):
            return self._decision(live, pb.ASSIGNMENT_REASON_NOT_EXPOSED)
        held = self._sticky.get(live.id, subject_id)
        if held is not None:
            return self._sticky_decision(live, held)
        choice = choose_new_arm(
            experiment.allocation,
            live.weights,
            live.active,
            self._posteriors.get(live),
            self._rng_state,
            self._rng,
            experiment.fail_fast.min_samples,
            explore_share(experiment),
        )
        try:
            outcome = await self._hot.assign(
                live.id,
                subject_id,
                live.variant_ids[choice.index],
                choice.propensity,
                context_json(ctx),
            )
        except Unavailable:
            held = await find_assignment(
                self._pool, live.id, subject_id, seconds=self._hot.timeouts.postgres_seconds
            )
            if held is None:
                raise
            self._sticky.put(live.id, subject_id, held)
            return self._sticky_decision(live, held)
        held = Assignment(outcome.variant_id, outcome.propensity, outcome.assigned_ms)
        self._sticky.put(live.id, subject_id, held)
        if not outcome.created:
            return self._sticky_decision(live, held)
        return self._decision(
            live, pb.ASSIGNMENT_REASON_NEW, choice.index, choice.propensity, outcome.assigned_ms
        )

    def _sticky_decision(self, live: LiveExperiment, held: Assignment) -> pb.Decision:
        index = live.index_of[held.variant_id]
        return self._decision(
            live, pb.ASSIGNMENT_REASON_STICKY, index, held.propensity, held.assigned_ms
        )

    async def Assign(self, request: pb.AssignRequest, context: Context) -> pb.AssignResponse:
        started = time.perf_counter()
        ref = require_reference(request.experiment)
        validate_subject(request.subject_id)
        profile = profile_from_context(request.context)
        live = await self._catalog.get(ref)
        decision = await self.decide(live, request.subject_id, profile, request.context)
        self._sign(decision, request.subject_id)
        self._metrics.decision_latency.observe(time.perf_counter() - started)
        return pb.AssignResponse(decision=decision)

    async def AssignAll(
        self, request: pb.AssignAllRequest, context: Context
    ) -> pb.AssignAllResponse:
        started = time.perf_counter()
        validate_subject(request.subject_id)
        profile = profile_from_context(request.context)
        every = await asyncio.gather(
            *(
                self.decide(live, request.subject_id, profile, request.context)
                for live in self._catalog.live()
            )
        )
        decisions = [decision for decision in every if decision.HasField("variant")]
        for decision in decisions:
            self._sign(decision, request.subject_id)
        self._metrics.decision_latency.observe(time.perf_counter() - started)
        return pb.AssignAllResponse(decisions=decisions)
