"""Every request of both clients, built once: one builder per RPC, no I/O.

A builder takes the public method's arguments (without `self`) and returns a
`Call`: the request, the stub method that sends it, whether a replay is safe,
the deadline and how to read the response. `Client` and `AsyncClient` turn
each builder into a method (`sira.client`, `sira.aio`), so the two differ only
in how they send a Call and sleep between attempts. Which calls are retried,
and why, is in the docstring of `sira.client`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeAlias, TypeVar

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from sira.experiments.v1 import (
    assignment_service_pb2,
    experiment_pb2,
    insights_service_pb2,
    lifecycle_service_pb2,
    tracking_service_pb2,
)

if TYPE_CHECKING:
    from sira._transport import Stubs

__all__ = [
    "Call",
    "ContextLike",
    "EventTypeValue",
    "ExperimentStatusValue",
    "Pages",
    "event_type_value",
    "experiment_status_value",
    "subject_context",
    "tracked_event",
]

T = TypeVar("T")

ExperimentStatusValue: TypeAlias = experiment_pb2.ExperimentStatus.ValueType
EventTypeValue: TypeAlias = tracking_service_pb2.EventType.ValueType
ContextLike: TypeAlias = assignment_service_pb2.SubjectContext | Mapping[str, Any] | None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One unary RPC, ready to send (and to send again, unchanged, on retry)."""

    rpc: Callable[[Stubs], Callable[..., Any]]
    """The stub method that sends `request`."""
    request: Message
    result: Callable[[Any], T]
    """What the caller gets from the response."""
    idempotent: bool
    """Whether a lost connection may be retried (see `sira.client`)."""
    timeout: float | None
    """Deadline of each attempt; None means the client's default."""


Pages: TypeAlias = Callable[[str], Call[tuple[Sequence[T], str]]]
"""A listing read page by page: the Call for the page at a token ("" is the first),
whose result is (items, next_page_token); an empty next_page_token is the end."""


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


PageT = TypeVar("PageT", bound=_Page)


def _pages(first: Call[PageT], items: Callable[[PageT], Sequence[T]]) -> Pages[T]:
    """Pages of a list RPC: `first` with each next page token, and the items of a page."""

    def read(response: Any) -> tuple[Sequence[T], str]:
        page = first.result(response)
        return items(page), page.next_page_token

    def page_at(token: str) -> Call[tuple[Sequence[T], str]]:
        # Only the token changes from page to page (a list request's own field).
        request: Any = type(first.request)()
        request.CopyFrom(first.request)
        request.page_token = token
        return Call(first.rpc, request, read, first.idempotent, first.timeout)

    return page_at


# -- values accepted in several spellings ----------------------------------------


def _enum_name(prefix: str, name: str) -> str:
    name = name.strip().upper()
    return name if name.startswith(prefix) else prefix + name


def experiment_status_value(status: ExperimentStatusValue | str | None) -> ExperimentStatusValue:
    """`"running"`, `"EXPERIMENT_STATUS_RUNNING"` or the enum value -> the enum value."""
    if status is None or status == "":
        return experiment_pb2.EXPERIMENT_STATUS_UNSPECIFIED
    if isinstance(status, str):
        return experiment_pb2.ExperimentStatus.Value(_enum_name("EXPERIMENT_STATUS_", status))
    return status


def event_type_value(event_type: EventTypeValue | str) -> EventTypeValue:
    """`"conversion"`, `"EVENT_TYPE_CONVERSION"` or the enum value -> the enum value."""
    if isinstance(event_type, str):
        return tracking_service_pb2.EventType.Value(_enum_name("EVENT_TYPE_", event_type))
    return event_type


def subject_context(context: ContextLike) -> assignment_service_pb2.SubjectContext | None:
    """A SubjectContext from itself or a mapping of its field names."""
    if context is None or isinstance(context, assignment_service_pb2.SubjectContext):
        return context
    return assignment_service_pb2.SubjectContext(**dict(context))


def tracked_event(
    *,
    experiment: str,
    subject_id: str,
    variant_id: str,
    event_type: EventTypeValue | str = tracking_service_pb2.EVENT_TYPE_CONVERSION,
    value: float = 0.0,
    currency: str = "",
    custom_event_name: str = "",
    client_event_id: str = "",
    occur_time: datetime | None = None,
    tracking_token: str = "",
) -> tracking_service_pb2.TrackedEvent:
    """Build a TrackedEvent from plain values. `tracking_token`: the Decision's, needed
    when tracking without a bearer token (from the subject's browser or app)."""
    event = tracking_service_pb2.TrackedEvent(
        experiment=experiment,
        subject_id=subject_id,
        variant_id=variant_id,
        event_type=event_type_value(event_type),
        custom_event_name=custom_event_name,
        value=value,
        currency=currency,
        client_event_id=client_event_id,
        tracking_token=tracking_token,
    )
    if occur_time is not None:
        event.occur_time.FromDatetime(occur_time)
    return event


def _with_event_id(event: tracking_service_pb2.TrackedEvent) -> tracking_service_pb2.TrackedEvent:
    """A copy carrying a client_event_id, so every retry is the same event."""
    if event.client_event_id:
        return event
    copy = tracking_service_pb2.TrackedEvent()
    copy.CopyFrom(event)
    copy.client_event_id = str(uuid.uuid4())
    return copy


# Call.idempotent, by name.
_IDEMPOTENT = True
_MUTATION = False


def _whole(response: T) -> T:
    return response


def _experiment(response: Any) -> experiment_pb2.Experiment:
    experiment: experiment_pb2.Experiment = response.experiment
    return experiment


# -- LifecycleService ------------------------------------------------------------
# Mutations are not idempotent: a replay after a lost connection could fail with
# ALREADY_EXISTS / FAILED_PRECONDITION / NOT_FOUND although the first one worked.

Experiment: TypeAlias = experiment_pb2.Experiment


def create_experiment(experiment: Experiment, *, timeout: float | None = None) -> Call[Experiment]:
    request = lifecycle_service_pb2.CreateExperimentRequest(experiment=experiment)
    return Call(lambda s: s.lifecycle.CreateExperiment, request, _experiment, _MUTATION, timeout)


def get_experiment(experiment: str, *, timeout: float | None = None) -> Call[Experiment]:
    """`experiment` is an id (UUID) or a key."""
    request = lifecycle_service_pb2.GetExperimentRequest(experiment=experiment)
    return Call(lambda s: s.lifecycle.GetExperiment, request, _experiment, _IDEMPOTENT, timeout)


def list_experiments(
    status: ExperimentStatusValue | str | None = None,
    *,
    page_size: int = 0,
    page_token: str = "",
    timeout: float | None = None,
) -> Call[lifecycle_service_pb2.ListExperimentsResponse]:
    """One page, newest first; `status` is e.g. "running" or an enum value."""
    request = lifecycle_service_pb2.ListExperimentsRequest(
        status=experiment_status_value(status), page_size=page_size, page_token=page_token
    )
    return Call(lambda s: s.lifecycle.ListExperiments, request, _whole, _IDEMPOTENT, timeout)


def iter_experiments(
    status: ExperimentStatusValue | str | None = None,
    *,
    page_size: int = 0,
    timeout: float | None = None,
) -> Pages[Experiment]:
    """Every experiment, following next_page_token."""
    first = list_experiments(status, page_size=page_size, timeout=timeout)
    return _pages(first, lambda page: page.experiments)


def update_experiment(
    experiment: Experiment,
    update_mask: Sequence[str] | None = None,
    *,
    timeout: float | None = None,
) -> Call[Experiment]:
    """`experiment.id` or `.key` names it; an empty mask replaces every field."""
    mask = field_mask_pb2.FieldMask(paths=list(update_mask or []))
    request = lifecycle_service_pb2.UpdateExperimentRequest(experiment=experiment, update_mask=mask)
    return Call(lambda s: s.lifecycle.UpdateExperiment, request, _experiment, _MUTATION, timeout)


def start_experiment(experiment: str, *, timeout: float | None = None) -> Call[Experiment]:
    request = lifecycle_service_pb2.StartExperimentRequest(experiment=experiment)
    return Call(lambda s: s.lifecycle.StartExperiment, request, _experiment, _MUTATION, timeout)


def stop_experiment(
    experiment: str,
    *,
    winner_variant: str = "",
    reason: str = "",
    timeout: float | None = None,
) -> Call[Experiment]:
    """`winner_variant` is a variant id or key; without it everyone gets the control."""
    request = lifecycle_service_pb2.StopExperimentRequest(
        experiment=experiment, winner_variant=winner_variant, reason=reason
    )
    return Call(lambda s: s.lifecycle.StopExperiment, request, _experiment, _MUTATION, timeout)


def archive_experiment(experiment: str, *, timeout: float | None = None) -> Call[Experiment]:
    request = lifecycle_service_pb2.ArchiveExperimentRequest(experiment=experiment)
    return Call(lambda s: s.lifecycle.ArchiveExperiment, request, _experiment, _MUTATION, timeout)


def archive_stale_experiments(
    older_than_days: int = 90, *, dry_run: bool = False, timeout: float | None = None
) -> Call[list[Experiment]]:
    """The experiments archived (or, with `dry_run`, that would be)."""
    request = lifecycle_service_pb2.ArchiveStaleExperimentsRequest(
        older_than_days=older_than_days, dry_run=dry_run
    )
    # Not a mutation for retries: archiving what is already archived is a no-op.
    return Call(
        lambda s: s.lifecycle.ArchiveStaleExperiments,
        request,
        lambda response: list(response.experiments),
        _IDEMPOTENT,
        timeout,
    )


def delete_experiment(experiment: str, *, timeout: float | None = None) -> Call[None]:
    request = lifecycle_service_pb2.DeleteExperimentRequest(experiment=experiment)
    return Call(lambda s: s.lifecycle.DeleteExperiment, request, lambda _: None, _MUTATION, timeout)


def list_audit_events(
    experiment: str = "",
    *,
    page_size: int = 0,
    page_token: str = "",
    timeout: float | None = None,
) -> Call[lifecycle_service_pb2.ListAuditEventsResponse]:
    """One page of audit events, newest first; empty `experiment` lists all."""
    request = lifecycle_service_pb2.ListAuditEventsRequest(
        experiment=experiment, page_size=page_size, page_token=page_token
    )
    return Call(lambda s: s.lifecycle.ListAuditEvents, request, _whole, _IDEMPOTENT, timeout)


def iter_audit_events(
    experiment: str = "", *, page_size: int = 0, timeout: float | None = None
) -> Pages[lifecycle_service_pb2.AuditEvent]:
    """Every audit event, following next_page_token."""
    first = list_audit_events(experiment, page_size=page_size, timeout=timeout)
    return _pages(first, lambda page: page.events)


# -- AssignmentService -----------------------------------------------------------
# Idempotent: the first decision is sticky, so a replay returns it.


def assign(
    experiment: str,
    subject_id: str,
    context: ContextLike = None,
    *,
    timeout: float | None = None,
) -> Call[assignment_service_pb2.Decision]:
    """The subject's variant; `context` is a SubjectContext or a dict of its fields."""
    request = assignment_service_pb2.AssignRequest(
        experiment=experiment, subject_id=subject_id, context=subject_context(context)
    )
    return Call(lambda s: s.assignment.Assign, request, lambda r: r.decision, _IDEMPOTENT, timeout)


def assign_all(
    subject_id: str, context: ContextLike = None, *, timeout: float | None = None
) -> Call[list[assignment_service_pb2.Decision]]:
    """The subject's decisions. An experiment that could not decide just now (its store
    unavailable; `AssignAllResponse.errors` on the wire) is absent, like one the subject
    is not in: show its default, and a later call decides it."""
    request = assignment_service_pb2.AssignAllRequest(
        subject_id=subject_id, context=subject_context(context)
    )
    return Call(
        lambda s: s.assignment.AssignAll, request, lambda r: list(r.decisions), _IDEMPOTENT, timeout
    )


# -- TrackingService -------------------------------------------------------------
# Idempotent: every event gets its client_event_id before the first attempt, so
# the server dedupes a replay.


def track(
    event: tracking_service_pb2.TrackedEvent | None = None,
    *,
    experiment: str = "",
    subject_id: str = "",
    variant_id: str = "",
    event_type: EventTypeValue | str = tracking_service_pb2.EVENT_TYPE_CONVERSION,
    value: float = 0.0,
    currency: str = "",
    custom_event_name: str = "",
    client_event_id: str = "",
    occur_time: datetime | None = None,
    tracking_token: str = "",
    timeout: float | None = None,
) -> Call[tracking_service_pb2.TrackResponse]:
    """Record one event, given as a TrackedEvent or as keyword fields."""
    # The default event type counts as "not given" when checking for both forms.
    default_type = event_type in (tracking_service_pb2.EVENT_TYPE_CONVERSION, "conversion")
    fields: dict[str, Any] = {
        "experiment": experiment,
        "subject_id": subject_id,
        "variant_id": variant_id,
        "event_type": None if default_type else event_type,
        "value": value,
        "currency": currency,
        "custom_event_name": custom_event_name,
        "client_event_id": client_event_id,
        "occur_time": occur_time,
        "tracking_token": tracking_token,
    }
    if event is None:
        if fields["event_type"] is None:
            fields["event_type"] = tracking_service_pb2.EVENT_TYPE_CONVERSION
        event = tracked_event(**fields)
    elif any(fields.values()):
        raise TypeError("track() takes either an event or keyword fields, not both")
    request = tracking_service_pb2.TrackRequest(event=_with_event_id(event))
    return Call(lambda s: s.tracking.Track, request, _whole, _IDEMPOTENT, timeout)


def track_batch(
    events: Iterable[tracking_service_pb2.TrackedEvent],
    *,
    timeout: float | None = None,
) -> Call[list[tracking_service_pb2.TrackBatchResult]]:
    """One result per event, in order (each accepted or rejected on its own)."""
    request = tracking_service_pb2.TrackBatchRequest(events=[_with_event_id(e) for e in events])
    return Call(
        lambda s: s.tracking.TrackBatch, request, lambda r: list(r.results), _IDEMPOTENT, timeout
    )


# -- InsightsService -------------------------------------------------------------


def get_results(
    experiment: str, *, timeout: float | None = None
) -> Call[insights_service_pb2.GetResultsResponse]:
    request = insights_service_pb2.GetResultsRequest(experiment=experiment)
    return Call(lambda s: s.insights.GetResults, request, _whole, _IDEMPOTENT, timeout)


def get_insights(
    experiment: str, *, timeout: float | None = None
) -> Call[insights_service_pb2.GetInsightsResponse]:
    request = insights_service_pb2.GetInsightsRequest(experiment=experiment)
    return Call(lambda s: s.insights.GetInsights, request, _whole, _IDEMPOTENT, timeout)
