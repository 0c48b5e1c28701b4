"""AssignmentService: which variant a subject sees.

Per call: validate the request, look the experiment up in the catalog (in process), let
the engine decide (`engine.assigner`: targeting, exposure, sticky LRU, arm choice, the
Redis round trip, the Postgres fallback), then translate the decision into protobuf and
sign it with a tracking token.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, TypeAlias

import asyncpg
import grpc

from sira.experiments.v1 import assignment_service_pb2 as pb
from sira.experiments.v1 import assignment_service_pb2_grpc
from sira_server.api.convert import json_to_struct
from sira_server.domain import limits
from sira_server.domain.experiment import Variant
from sira_server.domain.targeting import SubjectProfile
from sira_server.domain.validation import require_reference
from sira_server.engine.assigner import DEFAULT_STICKY_CAPACITY, Assigner, Decision, Reason
from sira_server.engine.catalog import ExperimentCatalog, LiveExperiment
from sira_server.engine.posteriors import PosteriorBook
from sira_server.errors import FieldViolation, InvalidArgument, Unavailable
from sira_server.metrics import Metrics
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


NO_PROFILE = SubjectProfile()
"""The profile of a request without `context` (most calls): built once."""
NO_CONTEXT_JSON = "{}"


def _no_context() -> str:
    return NO_CONTEXT_JSON


_REASONS: dict[Reason, pb.AssignmentReason.ValueType] = {
    Reason.NEW: pb.ASSIGNMENT_REASON_NEW,
    Reason.STICKY: pb.ASSIGNMENT_REASON_STICKY,
    Reason.NOT_ELIGIBLE: pb.ASSIGNMENT_REASON_NOT_ELIGIBLE,
    Reason.NOT_EXPOSED: pb.ASSIGNMENT_REASON_NOT_EXPOSED,
    Reason.CONCLUDED: pb.ASSIGNMENT_REASON_CONCLUDED,
}


def variant_message(variant: Variant) -> pb.AssignedVariant:
    """Built once per experiment version (the `Assigner` keeps them)."""
    return pb.AssignedVariant(
        id=variant.id,
        key=variant.key,
        name=variant.name,
        config=json_to_struct(variant.config),
        is_control=variant.is_control,
    )


def new_assigner(
    catalog: ExperimentCatalog,
    posteriors: PosteriorBook,
    hot: HotState,
    pool: asyncpg.Pool,
    *,
    sticky_capacity: int = DEFAULT_STICKY_CAPACITY,
) -> Assigner[pb.AssignedVariant]:
    """The engine's `Assigner`, rendering variants as this API's messages."""
    return Assigner(
        catalog, posteriors, hot, pool, variant_message, sticky_capacity=sticky_capacity
    )


def decision_message(
    decided: Decision[pb.AssignedVariant], decision: pb.Decision | None = None
) -> pb.Decision:
    """The decision as the API's message, written into `decision` when given (a field of
    the response: no copy)."""
    live = decided.live
    if decision is None:
        decision = pb.Decision()
    decision.experiment_id = live.id
    decision.experiment_key = live.experiment.key
    decision.reason = _REASONS[decided.reason]
    if decided.variant is not None:
        decision.variant.CopyFrom(decided.variant)
        decision.propensity = decided.propensity
        if decided.assigned_ms is not None:
            assign_time = decision.assign_time
            assign_time.seconds, ms = divmod(decided.assigned_ms, 1000)
            assign_time.nanos = ms * 1_000_000
    return decision


class AssignmentServicer(assignment_service_pb2_grpc.AssignmentServiceServicer):
    """Validates, asks the engine's `Assigner`, and translates its decisions."""

    def __init__(
        self,
        catalog: ExperimentCatalog,
        assigner: Assigner[pb.AssignedVariant],
        metrics: Metrics,
        *,
        tokens: TrackingTokens | None = None,
    ) -> None:
        """`tokens`: sign each decision that names a variant with a tracking token."""
        self._catalog = catalog
        self._assigner = assigner
        self._metrics = metrics
        self._tokens = tokens

    def _sign(self, decision: pb.Decision, subject_id: str) -> None:
        if self._tokens is not None and decision.HasField("variant"):
            decision.tracking_token = self._tokens.issue(
                decision.experiment_id, subject_id, decision.variant.id, time.time()
            )

    async def Assign(self, request: pb.AssignRequest, context: Context) -> pb.AssignResponse:
        started = time.perf_counter()
        ref = require_reference(request.experiment)
        validate_subject(request.subject_id)
        if request.HasField("context"):
            profile = profile_from_context(request.context)
            stored_context = lambda: context_json(request.context)  # noqa: E731
        else:
            profile, stored_context = NO_PROFILE, _no_context
        live = await self._catalog.get(ref)
        decided = await self._assigner.decide(live, request.subject_id, profile, stored_context)
        response = pb.AssignResponse()
        self._sign(decision_message(decided, response.decision), request.subject_id)
        self._metrics.decision_latency.observe(time.perf_counter() - started)
        return response

    async def AssignAll(
        self, request: pb.AssignAllRequest, context: Context
    ) -> pb.AssignAllResponse:
        started = time.perf_counter()
        validate_subject(request.subject_id)
        profile = profile_from_context(request.context)
        ctx = request.context
        lives = list(self._catalog.live())
        every = await asyncio.gather(
            *(
                self._assigner.decide(live, request.subject_id, profile, lambda: context_json(ctx))
                for live in lives
            ),
            return_exceptions=True,
        )
        decisions: list[pb.Decision] = []
        errors: list[pb.AssignAllError] = []
        for live, outcome in zip(lives, every, strict=True):
            if isinstance(outcome, Unavailable):  # this experiment only; the others stand
                errors.append(assign_all_error(live, outcome))
            elif isinstance(outcome, BaseException):
                raise outcome
            elif outcome.variant is not None:
                decisions.append(decision_message(outcome))
        if errors and len(errors) == len(lives):
            raise next(o for o in every if isinstance(o, Unavailable))
        for decision in decisions:
            self._sign(decision, request.subject_id)
        self._metrics.decision_latency.observe(time.perf_counter() - started)
        return pb.AssignAllResponse(decisions=decisions, errors=errors)


def assign_all_error(live: LiveExperiment, err: Unavailable) -> pb.AssignAllError:
    return pb.AssignAllError(
        experiment_id=live.id,
        experiment_key=live.experiment.key,
        code=grpc.StatusCode[err.status_name].value[0],
        reason=err.reason,  # type: ignore[arg-type]  # enum accepts its value names
        message=err.message,
    )
