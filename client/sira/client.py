"""Hand-written clients over the generated stubs: `Client` (sync) and `AsyncClient`.

Both have the same methods, one per RPC of the four services, and the same
behaviour:

- every call gets a deadline (`timeout`, 5 s by default, per attempt);
- the bearer token goes in the `authorization: Bearer <token>` metadata;
- failures raise the typed errors of `sira.errors` (never a bare RpcError);
- UNAVAILABLE is retried with exponential backoff and full jitter
  (`RetryPolicy`, 3 attempts by default), but only where a second attempt
  cannot do something twice:

  * always: reads (get/list/audit/results/insights), `assign`/`assign_all`
    (the first decision is sticky, so a replay returns it), `track` and
    `track_batch` (the client fills an empty `client_event_id` with a uuid4
    before the first attempt, so the server dedupes a replay), and
    `archive_stale_experiments` (archiving what is already archived is a no-op);
  * only when the server itself answered UNAVAILABLE with reason
    ERROR_REASON_STORE_UNAVAILABLE (its transaction was not committed):
    create, update, start, stop, archive and delete. A connection lost after
    the request was sent may have applied it, and a replay would then fail
    with ALREADY_EXISTS / FAILED_PRECONDITION / NOT_FOUND, so those surface
    to the caller instead.
"""

# `timeout` on the async methods is the gRPC deadline, not an asyncio timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeAlias

import grpc
from google.protobuf import field_mask_pb2

from sira.errors import SiraError, from_rpc_error
from sira.experiments.v1 import (
    assignment_service_pb2,
    assignment_service_pb2_grpc,
    experiment_pb2,
    insights_service_pb2,
    insights_service_pb2_grpc,
    lifecycle_service_pb2,
    lifecycle_service_pb2_grpc,
    tracking_service_pb2,
    tracking_service_pb2_grpc,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "Client",
    "RetryPolicy",
    "event_type_value",
    "experiment_status_value",
    "subject_context",
    "tracked_event",
]

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_TIMEOUT = 5.0
_USER_AGENT = "sira-python"

ExperimentStatusValue: TypeAlias = experiment_pb2.ExperimentStatus.ValueType
EventTypeValue: TypeAlias = tracking_service_pb2.EventType.ValueType
ContextLike: TypeAlias = assignment_service_pb2.SubjectContext | Mapping[str, Any] | None


@dataclass(frozen=True)
class RetryPolicy:
    """How UNAVAILABLE is retried (see the module docstring for which calls)."""

    attempts: int = 3
    """Total attempts, the first included; 1 disables retries."""
    initial_backoff: float = 0.1
    """Upper bound of the first pause, in seconds."""
    max_backoff: float = 2.0
    """Upper bound of any pause, in seconds."""
    multiplier: float = 2.0
    """Growth of the bound from one pause to the next."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")

    def backoff(self, retry: int) -> float:
        """Pause before retry number `retry` (1-based): full jitter under the bound."""
        bound = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return random.uniform(0.0, bound)


def _retryable(error: SiraError, idempotent: bool) -> bool:
    if error.code != grpc.StatusCode.UNAVAILABLE:
        return False
    return idempotent or error.reason == "ERROR_REASON_STORE_UNAVAILABLE"


# -- request helpers shared by both clients ---------------------------------


def experiment_status_value(status: ExperimentStatusValue | str | None) -> ExperimentStatusValue:
    """`"running"`, `"EXPERIMENT_STATUS_RUNNING"` or the enum value -> the enum value."""
    if status is None or status == "":
        return experiment_pb2.EXPERIMENT_STATUS_UNSPECIFIED
    if isinstance(status, str):
        name = status.strip().upper()
        if not name.startswith("EXPERIMENT_STATUS_"):
            name = "EXPERIMENT_STATUS_" + name
        return experiment_pb2.ExperimentStatus.Value(name)
    return status


def event_type_value(event_type: EventTypeValue | str) -> EventTypeValue:
    """`"conversion"`, `"EVENT_TYPE_CONVERSION"` or the enum value -> the enum value."""
    if isinstance(event_type, str):
        name = event_type.strip().upper()
        if not name.startswith("EVENT_TYPE_"):
            name = "EVENT_TYPE_" + name
        return tracking_service_pb2.EventType.Value(name)
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
) -> tracking_service_pb2.TrackedEvent:
    """Build a TrackedEvent from plain values."""
    event = tracking_service_pb2.TrackedEvent(
        experiment=experiment,
        subject_id=subject_id,
        variant_id=variant_id,
        event_type=event_type_value(event_type),
        custom_event_name=custom_event_name,
        value=value,
        currency=currency,
        client_event_id=client_event_id,
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


def _track_request(
    event: tracking_service_pb2.TrackedEvent | None, fields: dict[str, Any]
) -> tracking_service_pb2.TrackRequest:
    if event is None:
        if fields["event_type"] is None:
            fields["event_type"] = tracking_service_pb2.EVENT_TYPE_CONVERSION
        event = tracked_event(**fields)
    elif any(fields.values()):
        raise TypeError("track() takes either an event or keyword fields, not both")
    return tracking_service_pb2.TrackRequest(event=_with_event_id(event))


def _update_request(
    experiment: experiment_pb2.Experiment, update_mask: Sequence[str] | None
) -> lifecycle_service_pb2.UpdateExperimentRequest:
    return lifecycle_service_pb2.UpdateExperimentRequest(
        experiment=experiment,
        update_mask=field_mask_pb2.FieldMask(paths=list(update_mask or [])),
    )


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _channel_options(options: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    return [("grpc.primary_user_agent", _USER_AGENT), *(options or [])]


class _Settings:
    """What both clients keep besides their channel."""

    def __init__(self, token: str | None, timeout: float, retry: RetryPolicy | None) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.token = token
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    def call_timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


# -- sync ---------------------------------------------------------------------


class Client:
    """Blocking client. Use as a context manager or call `close()`.

    >>> with Client("localhost:50051", token=token) as sira:
    ...     decision = sira.assign("checkout-button-color", "user-123")
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        """`credentials` (e.g. `grpc.ssl_channel_credentials()`) selects TLS."""
        self.address = address
        self._settings = _Settings(token, timeout, retry)
        opts = _channel_options(options)
        self._channel = (
            grpc.secure_channel(address, credentials, options=opts)
            if credentials is not None
            else grpc.insecure_channel(address, options=opts)
        )
        self._lifecycle = lifecycle_service_pb2_grpc.LifecycleServiceStub(self._channel)
        self._assignment = assignment_service_pb2_grpc.AssignmentServiceStub(self._channel)
        self._tracking = tracking_service_pb2_grpc.TrackingServiceStub(self._channel)
        self._insights = insights_service_pb2_grpc.InsightsServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self, rpc: Callable[..., Any], request: Any, *, idempotent: bool, timeout: float | None
    ) -> Any:
        settings = self._settings
        metadata = _metadata(settings.token)
        attempt = 1
        while True:
            try:
                return rpc(request, timeout=settings.call_timeout(timeout), metadata=metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if attempt >= settings.retry.attempts or not _retryable(error, idempotent):
                    raise error from None
            time.sleep(settings.retry.backoff(attempt))
            attempt += 1

    # LifecycleService

    def create_experiment(
        self, experiment: experiment_pb2.Experiment, *, timeout: float | None = None
    ) -> experiment_pb2.Experiment:
        request = lifecycle_service_pb2.CreateExperimentRequest(experiment=experiment)
        response: lifecycle_service_pb2.CreateExperimentResponse = self._call(
            self._lifecycle.CreateExperiment, request, idempotent=False, timeout=timeout
        )
        return response.experiment

    def get_experiment(
        self, experiment: str, *, timeout: float | None = None
    ) -> experiment_pb2.Experiment:
        """`experiment` is an id (UUID) or a key."""
        request = lifecycle_service_pb2.GetExperimentRequest(experiment=experiment)
        response: lifecycle_service_pb2.GetExperimentResponse = self._call(
            self._lifecycle.GetExperiment, request, idempotent=True, timeout=timeout
        )
        return response.experiment

    def list_experiments(
        self,
        status: ExperimentStatusValue | str | None = None,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> lifecycle_service_pb2.ListExperimentsResponse:
        """One page, newest first; `status` is e.g. "running" or an enum value."""
        request = lifecycle_service_pb2.ListExperimentsRequest(
            status=experiment_status_value(status), page_size=page_size, page_token=page_token
        )
        response: lifecycle_service_pb2.ListExperimentsResponse = self._call(
            self._lifecycle.ListExperiments, request, idempotent=True, timeout=timeout
        )
        return response

    def iter_experiments(
        self,
        status: ExperimentStatusValue | str | None = None,
        *,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[experiment_pb2.Experiment]:
        """Every experiment, following next_page_token."""
        token = ""
        while True:
            page = self.list_experiments(
                status, page_size=page_size, page_token=token, timeout=timeout
            )
            yield from page.experiments
            token = page.next_page_token
            if not token:
                return

    def update_experiment(
        self,
        experiment: experiment_pb2.Experiment,
        update_mask: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> experiment_pb2.Experiment:
        """`experiment.id` or `.key` names it; an empty mask replaces every field."""
        response: lifecycle_service_pb2.UpdateExperimentResponse = self._call(
            self._lifecycle.UpdateExperiment,
            _update_request(experiment, update_mask),
            idempotent=False,
            timeout=timeout,
        )
        return response.experiment

    def start_experiment(
        self, experiment: str, *, timeout: float | None = None
    ) -> experiment_pb2.Experiment:
        request = lifecycle_service_pb2.StartExperimentRequest(experiment=experiment)
        response: lifecycle_service_pb2.StartExperimentResponse = self._call(
            self._lifecycle.StartExperiment, request, idempotent=False, timeout=timeout
        )
        return response.experiment

    def stop_experiment(
        self,
        experiment: str,
        *,
        winner_variant: str = "",
        reason: str = "",
        timeout: float | None = None,
    ) -> experiment_pb2.Experiment:
        """`winner_variant` is a variant id or key; without it everyone gets the control."""
        request = lifecycle_service_pb2.StopExperimentRequest(
            experiment=experiment, winner_variant=winner_variant, reason=reason
        )
        response: lifecycle_service_pb2.StopExperimentResponse = self._call(
            self._lifecycle.StopExperiment, request, idempotent=False, timeout=timeout
        )
        return response.experiment

    def archive_experiment(
        self, experiment: str, *, timeout: float | None = None
    ) -> experiment_pb2.Experiment:
        request = lifecycle_service_pb2.ArchiveExperimentRequest(experiment=experiment)
        response: lifecycle_service_pb2.ArchiveExperimentResponse = self._call(
            self._lifecycle.ArchiveExperiment, request, idempotent=False, timeout=timeout
        )
        return response.experiment

    def archive_stale_experiments(
        self, older_than_days: int = 90, *, dry_run: bool = False, timeout: float | None = None
    ) -> list[experiment_pb2.Experiment]:
        """The experiments archived (or, with `dry_run`, that would be)."""
        request = lifecycle_service_pb2.ArchiveStaleExperimentsRequest(
            older_than_days=older_than_days, dry_run=dry_run
        )
        response: lifecycle_service_pb2.ArchiveStaleExperimentsResponse = self._call(
            self._lifecycle.ArchiveStaleExperiments, request, idempotent=True, timeout=timeout
        )
        return list(response.experiments)

    def delete_experiment(self, experiment: str, *, timeout: float | None = None) -> None:
        request = lifecycle_service_pb2.DeleteExperimentRequest(experiment=experiment)
        self._call(self._lifecycle.DeleteExperiment, request, idempotent=False, timeout=timeout)

    def list_audit_events(
        self,
        experiment: str = "",
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> lifecycle_service_pb2.ListAuditEventsResponse:
        """One page of audit events, newest first; empty `experiment` lists all."""
        request = lifecycle_service_pb2.ListAuditEventsRequest(
            experiment=experiment, page_size=page_size, page_token=page_token
        )
        response: lifecycle_service_pb2.ListAuditEventsResponse = self._call(
            self._lifecycle.ListAuditEvents, request, idempotent=True, timeout=timeout
        )
        return response

    def iter_audit_events(
        self, experiment: str = "", *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[lifecycle_service_pb2.AuditEvent]:
        token = ""
        while True:
            page = self.list_audit_events(
                experiment, page_size=page_size, page_token=token, timeout=timeout
            )
            yield from page.events
            token = page.next_page_token
            if not token:
                return

    # AssignmentService

    def assign(
        self,
        experiment: str,
        subject_id: str,
        context: ContextLike = None,
        *,
        timeout: float | None = None,
    ) -> assignment_service_pb2.Decision:
        """The subject's variant; `context` is a SubjectContext or a dict of its fields."""
        request = assignment_service_pb2.AssignRequest(
            experiment=experiment, subject_id=subject_id, context=subject_context(context)
        )
        response: assignment_service_pb2.AssignResponse = self._call(
            self._assignment.Assign, request, idempotent=True, timeout=timeout
        )
        return response.decision

    def assign_all(
        self, subject_id: str, context: ContextLike = None, *, timeout: float | None = None
    ) -> list[assignment_service_pb2.Decision]:
        request = assignment_service_pb2.AssignAllRequest(
            subject_id=subject_id, context=subject_context(context)
        )
        response: assignment_service_pb2.AssignAllResponse = self._call(
            self._assignment.AssignAll, request, idempotent=True, timeout=timeout
        )
        return list(response.decisions)

    # TrackingService

    def track(
        self,
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
        timeout: float | None = None,
    ) -> tracking_service_pb2.TrackResponse:
        """Record one event, given as a TrackedEvent or as keyword fields."""
        fields = _event_fields(
            experiment,
            subject_id,
            variant_id,
            event_type,
            value,
            currency,
            custom_event_name,
            client_event_id,
            occur_time,
        )
        response: tracking_service_pb2.TrackResponse = self._call(
            self._tracking.Track, _track_request(event, fields), idempotent=True, timeout=timeout
        )
        return response

    def track_batch(
        self,
        events: Iterable[tracking_service_pb2.TrackedEvent],
        *,
        timeout: float | None = None,
    ) -> list[tracking_service_pb2.TrackBatchResult]:
        """One result per event, in order (each accepted or rejected on its own)."""
        request = tracking_service_pb2.TrackBatchRequest(events=[_with_event_id(e) for e in events])
        response: tracking_service_pb2.TrackBatchResponse = self._call(
            self._tracking.TrackBatch, request, idempotent=True, timeout=timeout
        )
        return list(response.results)

    # InsightsService

    def get_results(
        self, experiment: str, *, timeout: float | None = None
    ) -> insights_service_pb2.GetResultsResponse:
        request = insights_service_pb2.GetResultsRequest(experiment=experiment)
        response: insights_service_pb2.GetResultsResponse = self._call(
            self._insights.GetResults, request, idempotent=True, timeout=timeout
        )
        return response

    def get_insights(
        self, experiment: str, *, timeout: float | None = None
    ) -> insights_service_pb2.GetInsightsResponse:
        request = insights_service_pb2.GetInsightsRequest(experiment=experiment)
        response: insights_service_pb2.GetInsightsResponse = self._call(
            self._insights.GetInsights, request, idempotent=True, timeout=timeout
        )
        return response


def _event_fields(
    experiment: str,
    subject_id: str,
    variant_id: str,
    event_type: EventTypeValue | str,
    value: float,
    currency: str,
    custom_event_name: str,
    client_event_id: str,
    occur_time: datetime | None,
) -> dict[str, Any]:
    """Keyword fields of track(); the default event type counts as "not given"."""
    default_type = event_type in (tracking_service_pb2.EVENT_TYPE_CONVERSION, "conversion")
    return {
        "experiment": experiment,
        "subject_id": subject_id,
        "variant_id": variant_id,
        "event_type": None if default_type else event_type,
        "value": value,
        "currency": currency,
        "custom_event_name": custom_event_name,
        "client_event_id": client_event_id,
        "occur_time": occur_time,
    }


# -- async --------------------------------------------------------------------


class AsyncClient:
    """grpc.aio client with the same methods as `Client`, as coroutines.

    >>> async with AsyncClient("localhost:50051", token=token) as sira:
    ...     decision = await sira.assign("checkout-button-color", "user-123")
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        self.address = address
        self._settings = _Settings(token, timeout, retry)
        opts = _channel_options(options)
        self._channel = (
            grpc.aio.secure_channel(address, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(address, options=opts)
        )
        self._lifecycle = lifecycle_service_pb2_grpc.LifecycleServiceStub(self._channel)
        self._assignment = assignment_service_pb2_grpc.AssignmentServiceStub(self._channel)
        self._tracking = tracking_service_pb2_grpc.TrackingServiceStub(self._channel)
        self._insights = insights_service_pb2_grpc.InsightsServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(
        self, rpc: Callable[..., Any], request: Any, *, idempotent: bool, timeout: float | None
    ) -> Any:
        settings = self._settings
        metadata = _metadata(settings.token)
        attempt = 1
        while True:
            try:
                return await rpc(request, timeout=settings.call_timeout(timeout), metadata=metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if attempt >= settings.retry.attempts or not _retryable(error, idempotent):
                    raise error from None
            await asyncio.sleep(settings.retry.backoff(attempt))
            attempt += 1

    # LifecycleService

    async def create_experiment(
        self, experiment: experiment_pb2.Experiment, *, timeout: float | None = None
    ) -> experiment_pb2.Experiment:
        request = lifecycle_service_pb2.CreateExperimentRequest(experiment=experiment)
        response: lifecycle_service_pb2.CreateExperimentResponse = await self._call(
            self._lifecycle.CreateExperiment, request, idempotent=False, timeout=timeout
        )
        return response.experiment

    async def get_experiment(
        self, experiment: str, *, timeout: float | None = None
    ) -> experiment_pb2.Experiment:
        request = lifecycle_service_pb2.GetExperimentRequest(experiment=experiment)
        response: lifecycle_service_pb2.GetExperimentResponse = await self._call(
            self._lifecycle.GetExperiment, request, idempotent=True, timeout=timeout
        )
        return response.experiment

    async def list_experiments(
        self,
        status: ExperimentStatusValue | str | None = None,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> lifecycle_service_pb2.ListExperimentsResponse:
        request = lifecycle_service_pb2.ListExperimentsRequest(
            status=experiment_status_value(status), page_size=page_size, page_token=page_token
        )
        response: lifecycle_service_pb2.ListExperimentsResponse = await self._call(
            self._lifecycle.ListExperiments, request, idempotent=True, timeout=timeout
        )
        return response

    async def iter_experiments(
        self,
        status: ExperimentStatusValue | str | None = None,
        *,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[experiment_pb2.Experiment]:
        token = ""
        while True:
            page = await self.list_experiments(
                status, page_size=page_size, page_token=token, timeout=timeout
            )
            for experiment in page.experiments:
                yield experiment
            token = page.next_page_token
            if not token:
                return

    async def update_experiment(
        self,
        experiment: experiment_pb2.Experiment,
        update_mask: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> experiment_pb2.Experiment:
        response: lifecycle_service_pb2.UpdateExperimentResponse = await self._call(
            self._lifecycle.UpdateExperiment,
            _update_request(experiment, update_mask),
            idempotent=False,
            timeout=timeout,
        )
        return response.experiment

    async def start_experiment(
        self, experiment: str, *, timeout: float | None = None
    ) -> experiment_pb2.Experiment:
        request = lifecycle_service_pb2.StartExperimentRequest(experiment=experiment)
        response: lifecycle_service_pb2.StartExperimentResponse = await self._call(
            self._lifecycle.StartExperiment, request, idempotent=False, timeout=timeout
        )
        return response.experiment

    async def stop_experiment(
        self,
        experiment: str,
        *,
        winner_variant: str = "",
        reason: str = "",
        timeout: float | None = None,
    ) -> experiment_pb2.Experiment:
        request = lifecycle_service_pb2.StopExperimentRequest(
            experiment=experiment, winner_variant=winner_variant, reason=reason
        )
        response: lifecycle_service_pb2.StopExperimentResponse = await self._call(
            self._lifecycle.StopExperiment, request, idempotent=False, timeout=timeout
        )
        return response.experiment

    async def archive_experiment(
        self, experiment: str, *, timeout: float | None = None
    ) -> experiment_pb2.Experiment:
        request = lifecycle_service_pb2.ArchiveExperimentRequest(experiment=experiment)
        response: lifecycle_service_pb2.ArchiveExperimentResponse = await self._call(
            self._lifecycle.ArchiveExperiment, request, idempotent=False, timeout=timeout
        )
        return response.experiment

    async def archive_stale_experiments(
        self, older_than_days: int = 90, *, dry_run: bool = False, timeout: float | None = None
    ) -> list[experiment_pb2.Experiment]:
        request = lifecycle_service_pb2.ArchiveStaleExperimentsRequest(
            older_than_days=older_than_days, dry_run=dry_run
        )
        response: lifecycle_service_pb2.ArchiveStaleExperimentsResponse = await self._call(
            self._lifecycle.ArchiveStaleExperiments, request, idempotent=True, timeout=timeout
        )
        return list(response.experiments)

    async def delete_experiment(self, experiment: str, *, timeout: float | None = None) -> None:
        request = lifecycle_service_pb2.DeleteExperimentRequest(experiment=experiment)
        await self._call(
            self._lifecycle.DeleteExperiment, request, idempotent=False, timeout=timeout
        )

    async def list_audit_events(
        self,
        experiment: str = "",
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> lifecycle_service_pb2.ListAuditEventsResponse:
        request = lifecycle_service_pb2.ListAuditEventsRequest(
            experiment=experiment, page_size=page_size, page_token=page_token
        )
        response: lifecycle_service_pb2.ListAuditEventsResponse = await self._call(
            self._lifecycle.ListAuditEvents, request, idempotent=True, timeout=timeout
        )
        return response

    async def iter_audit_events(
        self, experiment: str = "", *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[lifecycle_service_pb2.AuditEvent]:
        token = ""
        while True:
            page = await self.list_audit_events(
                experiment, page_size=page_size, page_token=token, timeout=timeout
            )
            for event in page.events:
                yield event
            token = page.next_page_token
            if not token:
                return

    # AssignmentService

    async def assign(
        self,
        experiment: str,
        subject_id: str,
        context: ContextLike = None,
        *,
        timeout: float | None = None,
    ) -> assignment_service_pb2.Decision:
        request = assignment_service_pb2.AssignRequest(
            experiment=experiment, subject_id=subject_id, context=subject_context(context)
        )
        response: assignment_service_pb2.AssignResponse = await self._call(
            self._assignment.Assign, request, idempotent=True, timeout=timeout
        )
        return response.decision

    async def assign_all(
        self, subject_id: str, context: ContextLike = None, *, timeout: float | None = None
    ) -> list[assignment_service_pb2.Decision]:
        request = assignment_service_pb2.AssignAllRequest(
            subject_id=subject_id, context=subject_context(context)
        )
        response: assignment_service_pb2.AssignAllResponse = await self._call(
            self._assignment.AssignAll, request, idempotent=True, timeout=timeout
        )
        return list(response.decisions)

    # TrackingService

    async def track(
        self,
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
        timeout: float | None = None,
    ) -> tracking_service_pb2.TrackResponse:
        fields = _event_fields(
            experiment,
            subject_id,
            variant_id,
            event_type,
            value,
            currency,
            custom_event_name,
            client_event_id,
            occur_time,
        )
        response: tracking_service_pb2.TrackResponse = await self._call(
            self._tracking.Track, _track_request(event, fields), idempotent=True, timeout=timeout
        )
        return response

    async def track_batch(
        self,
        events: Iterable[tracking_service_pb2.TrackedEvent],
        *,
        timeout: float | None = None,
    ) -> list[tracking_service_pb2.TrackBatchResult]:
        request = tracking_service_pb2.TrackBatchRequest(events=[_with_event_id(e) for e in events])
        response: tracking_service_pb2.TrackBatchResponse = await self._call(
            self._tracking.TrackBatch, request, idempotent=True, timeout=timeout
        )
        return list(response.results)

    # InsightsService

    async def get_results(
        self, experiment: str, *, timeout: float | None = None
    ) -> insights_service_pb2.GetResultsResponse:
        request = insights_service_pb2.GetResultsRequest(experiment=experiment)
        response: insights_service_pb2.GetResultsResponse = await self._call(
            self._insights.GetResults, request, idempotent=True, timeout=timeout
        )
        return response

    async def get_insights(
        self, experiment: str, *, timeout: float | None = None
    ) -> insights_service_pb2.GetInsightsResponse:
        request = insights_service_pb2.GetInsightsRequest(experiment=experiment)
        response: insights_service_pb2.GetInsightsResponse = await self._call(
            self._insights.GetInsights, request, idempotent=True, timeout=timeout
        )
        return response
