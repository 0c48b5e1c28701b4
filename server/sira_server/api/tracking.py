"""TrackingService: what a subject did after its assignment.

Validation happens here; the state rules (assigned? same variant? seen this event id?)
are enforced atomically by the Track script in Redis, in ONE round trip, together with
the counters and the write-behind record.

Callable without a bearer token (from a subject's app), but then each event must carry
the tracking token of its Decision (`tracking_token`): checked first, against the
in-process catalog only, before anything else is looked at or stored. Every failure of
that proof, and any later "not assigned"/"other variant" answer, is the same
`no_proof()` error, so an unauthenticated caller learns nothing about who is enrolled
where. Such events are also capped per subject, type and experiment per hour.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from sira.experiments.v1 import tracking_service_pb2 as pb
from sira.experiments.v1 import tracking_service_pb2_grpc
from sira_server.api.assignment import MAX_SUBJECT_ID, validate_subject
from sira_server.api.context import current_principal
from sira_server.api.edge import check_message
from sira_server.domain import limits
from sira_server.engine.catalog import ExperimentCatalog, LiveExperiment
from sira_server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SiraError,
    Unauthenticated,
    excerpt,
)
from sira_server.metrics import Metrics
from sira_server.store.hot_state import (
    CAP_WINDOW_MS,
    HotState,
    TrackEvent,
    TrackOutcome,
    TrackStatus,
)
from sira_server.tracking_token import TrackingTokens

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

MAX_BATCH = limits.MAX_BATCH_EVENTS
MAX_EVENT_ID = limits.MAX_EVENT_ID_CHARS
MAX_FUTURE_SKEW_MS = limits.MAX_FUTURE_SKEW_MS
CUSTOM_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
CURRENCY = re.compile(r"[A-Z]{3}")
BUILTIN_TYPES = {
    pb.EVENT_TYPE_CONVERSION: "conversion",
    pb.EVENT_TYPE_REFUND: "refund",
    pb.EVENT_TYPE_CHURN: "churn",
}


def no_proof() -> Unauthenticated:
    """The one answer to any tracking failure of a caller without a bearer token."""
    return Unauthenticated(
        "tracking without a bearer token needs the tracking_token of the subject's "
        "Decision for exactly this experiment, subject and variant (not expired)",
        reason="ERROR_REASON_TOKEN_INVALID",
    )


def capped(cap: int, now_ms: int) -> ResourceExhausted:
    retry_ms = CAP_WINDOW_MS - now_ms % CAP_WINDOW_MS
    return ResourceExhausted(
        f"this subject reported {cap} events of this type in this experiment this hour, "
        "the most allowed without a bearer token",
        metadata={"limit": "subject_events"},
        retry_after_seconds=retry_ms / 1000,
    )


@dataclass(frozen=True, slots=True)
class ValidEvent:
    live: LiveExperiment
    event: TrackEvent  # variant_id canonical (the variant's id)
    variant_sent: str  # the variant as the caller named it: id or key


def _event_type(event: pb.TrackedEvent, violations: list[FieldViolation]) -> str:
    if event.event_type == pb.EVENT_TYPE_CUSTOM:
        name = event.custom_event_name
        if not CUSTOM_NAME.fullmatch(name):  # as the schema: no trailing "\n" either
            violations.append(
                FieldViolation(
                    "event.custom_event_name",
                    "required for EVENT_TYPE_CUSTOM: a lower-case slug "
                    "([a-z][a-z0-9_-]*, at most 64 characters)",
                )
            )
        elif name in BUILTIN_TYPES.values():
            violations.append(
                FieldViolation(
                    "event.custom_event_name",
                    f"'{name}' is a built-in type: use EVENT_TYPE_{name.upper()}",
                )
            )
        return name
    if event.event_type not in BUILTIN_TYPES:
        violations.append(
            FieldViolation(
                "event.event_type",
                "required: EVENT_TYPE_CONVERSION, EVENT_TYPE_REFUND, EVENT_TYPE_CHURN "
                "or EVENT_TYPE_CUSTOM with custom_event_name",
            )
        )
        return ""
    if event.custom_event_name:
        violations.append(
            FieldViolation("event.custom_event_name", "only allowed with EVENT_TYPE_CUSTOM")
        )
    return BUILTIN_TYPES[event.event_type]


def validate_event(
    event: pb.TrackedEvent, now_ms: int, max_value: float = limits.DEFAULT_MAX_EVENT_VALUE
) -> TrackEvent:
    """The event in domain form, or InvalidArgument listing every problem.

    ``max_value`` is the setting SIRA_MAX_EVENT_VALUE: no sum of accepted values can
    overflow to Infinity."""
    violations: list[FieldViolation] = []
    if not event.experiment:
        violations.append(FieldViolation("event.experiment", "required: id or key"))
    try:
        validate_subject(event.subject_id, "event.subject_id")
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    if not event.variant_id:
        violations.append(
            FieldViolation("event.variant_id", "required: the variant the subject was assigned")
        )
    event_type = _event_type(event, violations)
    if not math.isfinite(event.value) or event.value < 0:
        violations.append(
            FieldViolation("event.value", "must be a finite number >= 0 (refunds too)")
        )
    elif event.value > max_value:
        violations.append(FieldViolation("event.value", f"must be at most {max_value:g}"))
    if event.currency and not CURRENCY.fullmatch(event.currency):
        violations.append(
            FieldViolation("event.currency", "ISO 4217 code: three upper-case letters")
        )
    elif not event.currency and event.value > 0:
        violations.append(FieldViolation("event.currency", "required when value > 0"))
    if len(event.client_event_id) > MAX_EVENT_ID:
        violations.append(
            FieldViolation("event.client_event_id", f"at most {MAX_EVENT_ID} characters")
        )
    occurred_ms = now_ms
    if event.HasField("occur_time"):
        occurred_ms = event.occur_time.seconds * 1000 + event.occur_time.nanos // 1_000_000
        if occurred_ms <= 0 or occurred_ms > now_ms + MAX_FUTURE_SKEW_MS:
            violations.append(
                FieldViolation("event.occur_time", "must be after 1970 and not in the future")
            )
    if violations:
        raise InvalidArgument.from_violations(violations)
    return TrackEvent(
        subject_id=event.subject_id,
        variant_id=event.variant_id,
        event_type=event_type,
        event_id=event.client_event_id or str(uuid.uuid4()),
        occurred_ms=occurred_ms,
        value=event.value,
        currency=event.currency or None,
    )


def _named_like(live: LiveExperiment, variant_id: str, sent: str) -> str:
    """`variant_id` as the caller names variants: by key if it sent a key."""
    if sent in live.variant_ids or variant_id not in live.index_of:
        return variant_id
    return live.experiment.variants[live.index_of[variant_id]].key


def outcome_error(
    live: LiveExperiment, event: TrackEvent, outcome: TrackOutcome, variant_sent: str
) -> SiraError:
    """The error for a refused event, naming the variant as the caller sent it."""
    key = live.experiment.key
    if outcome.status is TrackStatus.NOT_ASSIGNED:
        return FailedPrecondition(
            f"subject '{excerpt(event.subject_id)}' was never assigned in experiment '{key}'; "
            "call Assign first",
            reason="ERROR_REASON_SUBJECT_NOT_ASSIGNED",
            metadata={"experiment": key, "subject_id": event.subject_id},
        )
    metadata = {"experiment": key, "subject_id": event.subject_id, "variant": variant_sent}
    if not current_principal().is_anonymous and outcome.assigned_variant_id:
        metadata["assigned_variant"] = _named_like(live, outcome.assigned_variant_id, variant_sent)
    return FailedPrecondition(
        f"subject '{excerpt(event.subject_id)}' is not assigned variant '{excerpt(variant_sent)}' "
        f"in experiment '{key}'",
        reason="ERROR_REASON_VARIANT_MISMATCH",
        metadata=metadata,
    )


def track_error(err: SiraError) -> pb.TrackError:
    field = err.violations[0].field if err.violations else ""
    return pb.TrackError(
        code=grpc.StatusCode[err.status_name].value[0],
        reason=err.reason,  # type: ignore[arg-type]  # enum accepts its value names
        message=err.message,
        field=field,
    )


class TrackingServicer(tracking_service_pb2_grpc.TrackingServiceServicer):
    def __init__(
        self,
        catalog: ExperimentCatalog,
        hot: HotState,
        metrics: Metrics,
        tokens: TrackingTokens,
        *,
        subject_events_per_hour: int = 0,
        max_event_value: float = limits.DEFAULT_MAX_EVENT_VALUE,
    ) -> None:
        self._catalog = catalog
        self._hot = hot
        self._metrics = metrics
        self._max_event_value = max_event_value
        self._tokens = tokens
        self._cap = subject_events_per_hour

    def _proven(self, event: pb.TrackedEvent, now_ms: int) -> LiveExperiment:
        """For a caller without a bearer token: the experiment, if the event carries a
        valid tracking token for it; `no_proof()` otherwise, whatever the cause."""
        live = self._catalog.peek(event.experiment)
        index = None if live is None else live.index_of.get(event.variant_id)
        if (
            live is None
            or len(event.subject_id) > MAX_SUBJECT_ID  # Assign never signed one: no HMAC work
            or index is None
            or not self._tokens.verify(
                event.tracking_token,
                live.id,
                event.subject_id,
                live.variant_ids[index],
                now_ms / 1000,
            )
        ):
            self._metrics.limited.labels("tracking_proof").inc()
            raise no_proof()
        return live

    async def _resolve(self, event: pb.TrackedEvent, now_ms: int) -> ValidEvent:
        anonymous = current_principal().is_anonymous
        if anonymous:
            live = self._proven(event, now_ms)
            valid = validate_event(event, now_ms, self._max_event_value)
        else:
            valid = validate_event(event, now_ms, self._max_event_value)
            live = await self._catalog.get(event.experiment)
        index = live.index_of.get(event.variant_id)
        if index is None:
            raise NotFound(
                f"experiment '{live.experiment.key}' has no variant '{event.variant_id}'",
                reason="ERROR_REASON_VARIANT_NOT_FOUND",
                metadata={"experiment": live.experiment.key, "variant": event.variant_id},
            )
        variant_id = live.variant_ids[index]
        cap = self._cap if anonymous else 0
        if variant_id == valid.variant_id and cap == valid.cap:
            return ValidEvent(live, valid, event.variant_id)  # already canonical
        canonical = TrackEvent(
            subject_id=valid.subject_id,
            variant_id=variant_id,
            event_type=valid.event_type,
            event_id=valid.event_id,
            occurred_ms=valid.occurred_ms,
            value=valid.value,
            currency=valid.currency,
            cap=cap,
        )
        return ValidEvent(live, canonical, event.variant_id)

    def _answer(self, valid: ValidEvent, outcome: TrackOutcome) -> pb.TrackResponse:
        return pb.TrackResponse(
            event_id=valid.event.event_id, outcome=self._outcome(valid, outcome)
        )

    def _outcome(self, valid: ValidEvent, outcome: TrackOutcome) -> pb.TrackOutcome.ValueType:
        """The answer's outcome for an event the store took or already had; raises the
        error of an event it refused."""
        if outcome.status is TrackStatus.ACCEPTED:
            return pb.TRACK_OUTCOME_ACCEPTED
        if outcome.status is TrackStatus.DUPLICATE:
            return pb.TRACK_OUTCOME_DUPLICATE
        if outcome.status is TrackStatus.CAPPED:
            self._metrics.limited.labels("subject_events").inc()
            raise capped(valid.event.cap, int(time.time() * 1000))
        if current_principal().is_anonymous:
            raise no_proof()
        raise outcome_error(valid.live, valid.event, outcome, valid.variant_sent)

    async def Track(self, request: pb.TrackRequest, context: Context) -> pb.TrackResponse:
        valid = await self._resolve(request.event, int(time.time() * 1000))
        outcome = await self._hot.track(valid.live.id, valid.event)
        return self._answer(valid, outcome)

    async def TrackBatch(
        self, request: pb.TrackBatchRequest, context: Context
    ) -> pb.TrackBatchResponse:
        if not request.events or len(request.events) > MAX_BATCH:
            raise InvalidArgument.from_violations(
                [FieldViolation("events", f"1..{MAX_BATCH} events per batch")]
            )
        now_ms = int(time.time() * 1000)
        resolved: list[ValidEvent | pb.TrackError] = []
        for event in request.events:  # in order, so the stores see them in order too
            try:
                check_message(event, "event")  # the edge leaves each item to this loop
                resolved.append(await self._resolve(event, now_ms))
            except SiraError as err:
                resolved.append(track_error(err))
        # Each event goes the way of a Track call: events of one experiment leave together,
        # with concurrent Track calls, in one round trip.
        valid = [item for item in resolved if isinstance(item, ValidEvent)]
        outcomes = iter(await self._hot.track_each([(v.live.id, v.event) for v in valid]))
        # Results are filled in place: building each as a message and passing it in copies
        # it twice (three times the CPU per event of a 100-event batch).
        response = pb.TrackBatchResponse()
        add_result = response.results.add
        for item in resolved:
            if isinstance(item, ValidEvent):
                self._fill_result(add_result(), item, next(outcomes))
            else:
                add_result().error.CopyFrom(item)
        return response

    def _fill_result(
        self,
        result: pb.TrackBatchResult,
        valid: ValidEvent,
        outcome: TrackOutcome | BaseException,
    ) -> None:
        """One event's answer: a refused event or a store that cannot take it now is its
        result, never the batch's (a bug still fails the call, logged by the guard)."""
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            code = self._outcome(valid, outcome)
        except SiraError as err:
            result.error.CopyFrom(track_error(err))
            return
        accepted = result.accepted
        accepted.event_id = valid.event.event_id
        accepted.outcome = code
