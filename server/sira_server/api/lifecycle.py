"""LifecycleService: create, read, transition, delete experiments; list the audit trail.

Thin by design: validate the request (`domain.validation`), call the repository with
the caller as actor, translate the result (`api.convert`). Errors are `SiraError`s that
the error guard (`api.guards`) maps to gRPC statuses; nothing is caught here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, TypeVar

import grpc

from sira.experiments.v1 import lifecycle_service_pb2 as pb
from sira.experiments.v1 import lifecycle_service_pb2_grpc
from sira_server.api.context import current_principal
from sira_server.api.convert import (
    audit_event_to_proto,
    experiment_input_from_proto,
    experiment_to_proto,
    status_from_proto,
)
from sira_server.domain.experiment import Experiment, ExperimentSpec
from sira_server.domain.validation import (
    merge_update,
    require_reference,
    validate_experiment,
    validate_older_than_days,
    validate_page_size,
    validate_stop_reason,
    validate_update_mask,
)
from sira_server.store.experiments import ExperimentRepository

__all__ = ["LifecycleServicer"]

DEFAULT_PAGE_SIZE = 50
DEFAULT_AUDIT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 100
"""Largest page returned; a larger page_size (accepted up to 1000) is coerced to it
(AIP-158), which bounds the work and the response of one List call."""
THREAD_CONVERSION_ITEMS = 20
"""Pages longer than this are converted to protobuf off the event loop."""

T = TypeVar("T")
M = TypeVar("M")


def _page_size(value: int, default: int) -> int:
    return min(validate_page_size(value, default=default), MAX_PAGE_SIZE)


async def _convert(items: Sequence[T], to_proto: Callable[[T], M]) -> list[M]:
    """Long pages are converted in a worker thread, so the loop keeps serving Assign."""
    if len(items) <= THREAD_CONVERSION_ITEMS:
        return [to_proto(item) for item in items]
    return await asyncio.to_thread(lambda: [to_proto(item) for item in items])


Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _actor() -> str:
    return current_principal().subject


class LifecycleServicer(lifecycle_service_pb2_grpc.LifecycleServiceServicer):
    def __init__(self, repository: ExperimentRepository) -> None:
        self._repository = repository

    async def CreateExperiment(
        self, request: pb.CreateExperimentRequest, context: Context
    ) -> pb.CreateExperimentResponse:
        spec = validate_experiment(experiment_input_from_proto(request.experiment))
        experiment = await self._repository.create(spec, actor=_actor())
        return pb.CreateExperimentResponse(experiment=experiment_to_proto(experiment))

    async def GetExperiment(
        self, request: pb.GetExperimentRequest, context: Context
    ) -> pb.GetExperimentResponse:
        experiment = await self._repository.get(require_reference(request.experiment))
        return pb.GetExperimentResponse(experiment=experiment_to_proto(experiment))

    async def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: Context
    ) -> pb.ListExperimentsResponse:
        page = await self._repository.list_experiments(
            status=status_from_proto(request.status),
            page_size=_page_size(request.page_size, DEFAULT_PAGE_SIZE),
            page_token=request.page_token,
        )
        return pb.ListExperimentsResponse(
            experiments=await _convert(page.items, experiment_to_proto),
            next_page_token=page.next_page_token,
        )

    async def UpdateExperiment(
        self, request: pb.UpdateExperimentRequest, context: Context
    ) -> pb.UpdateExperimentResponse:
        ref = require_reference(
            request.experiment.id or request.experiment.key, field="experiment.id"
        )
        fields = validate_update_mask(list(request.update_mask.paths))
        patch = experiment_input_from_proto(request.experiment)

        def change(current: Experiment) -> ExperimentSpec:
            return merge_update(current.spec(), patch, fields)

        experiment = await self._repository.update(ref, change, actor=_actor())
        return pb.UpdateExperimentResponse(experiment=experiment_to_proto(experiment))

    async def StartExperiment(
        self, request: pb.StartExperimentRequest, context: Context
    ) -> pb.StartExperimentResponse:
        experiment = await self._repository.start(
            require_reference(request.experiment), actor=_actor()
        )
        return pb.StartExperimentResponse(experiment=experiment_to_proto(experiment))

    async def StopExperiment(
        self, request: pb.StopExperimentRequest, context: Context
    ) -> pb.StopExperimentResponse:
        ref = require_reference(request.experiment)
        reason = validate_stop_reason(request.reason)
        experiment = await self._repository.stop(
            ref, actor=_actor(), winner=request.winner_variant.strip() or None, reason=reason
        )
        return pb.StopExperimentResponse(experiment=experiment_to_proto(experiment))

    async def ArchiveExperiment(
        self, request: pb.ArchiveExperimentRequest, context: Context
    ) -> pb.ArchiveExperimentResponse:
        experiment = await self._repository.archive(
            require_reference(request.experiment), actor=_actor()
        )
        return pb.ArchiveExperimentResponse(experiment=experiment_to_proto(experiment))

    async def ArchiveStaleExperiments(
        self, request: pb.ArchiveStaleExperimentsRequest, context: Context
    ) -> pb.ArchiveStaleExperimentsResponse:
        experiments = await self._repository.archive_stale(
            older_than_days=validate_older_than_days(request.older_than_days),
            actor=_actor(),
            dry_run=request.dry_run,
        )
        return pb.ArchiveStaleExperimentsResponse(
            experiments=[experiment_to_proto(e) for e in experiments]
        )

    async def DeleteExperiment(
        self, request: pb.DeleteExperimentRequest, context: Context
    ) -> pb.DeleteExperimentResponse:
        await self._repository.delete(require_reference(request.experiment), actor=_actor())
        return pb.DeleteExperimentResponse()

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        page = await self._repository.list_audit_events(
            experiment=request.experiment.strip() or None,
            page_size=_page_size(request.page_size, DEFAULT_AUDIT_PAGE_SIZE),
            page_token=request.page_token,
        )
        return pb.ListAuditEventsResponse(
            events=await _convert(page.items, audit_event_to_proto),
            next_page_token=page.next_page_token,
        )
