"""InsightsService: what happened (GetResults), what to do about it (GetInsights) and
how allocation and P(best) moved (GetInsightsHistory)."""

from __future__ import annotations

from datetime import UTC
from typing import Any, TypeAlias

import asyncpg
import grpc
from google.protobuf import timestamp_pb2

from sira.experiments.v1 import insights_service_pb2 as pb
from sira.experiments.v1 import insights_service_pb2_grpc
from sira_server.api.results import (
    counters_for,
    insights_response,
    results_response,
    variant_results,
)
from sira_server.domain.experiment import Experiment, ExperimentStatus
from sira_server.domain.validation import require_reference, validate_page_size
from sira_server.engine.catalog import ExperimentCatalog
from sira_server.engine.insights_book import CachedInsights, InsightsBook
from sira_server.errors import FailedPrecondition, NotFound
from sira_server.store.experiments import ExperimentRepository
from sira_server.store.hot_state import HotState
from sira_server.store.insights_history import read_points

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

DEFAULT_HISTORY_POINTS = 500
"""GetInsightsHistory's max_points when unset (the proto says so)."""


class InsightsServicer(insights_service_pb2_grpc.InsightsServiceServicer):
    def __init__(
        self,
        catalog: ExperimentCatalog,
        repository: ExperimentRepository,
        hot: HotState,
        book: InsightsBook,
        pool: asyncpg.Pool,
        *,
        history_seconds: float = 60.0,
    ) -> None:
        self._catalog = catalog
        self._pool = pool
        self._history_seconds = history_seconds
        self._repository = repository
        self._hot = hot
        self._book = book
        self._responses: dict[str, tuple[CachedInsights, pb.GetInsightsResponse]] = {}

    async def _experiment(self, ref: str) -> Experiment:
        """Live experiments from the catalog; archived ones (still readable) from Postgres."""
        ref = require_reference(ref)
        try:
            return (await self._catalog.get(ref)).experiment
        except (NotFound, FailedPrecondition):
            return await self._repository.get(ref)

    async def GetResults(
        self, request: pb.GetResultsRequest, context: Context
    ) -> pb.GetResultsResponse:
        experiment = await self._experiment(request.experiment)
        draft = experiment.status is ExperimentStatus.DRAFT
        counters = {} if draft else await self._hot.counters(experiment.id)
        computed = timestamp_pb2.Timestamp()
        computed.GetCurrentTime()
        rows = [
            variant_results(
                v.id, v.key, v.name, v.is_control, v.state, counters_for(counters, v.id)
            )
            for v in experiment.variants
        ]
        return results_response(experiment.id, experiment.status, rows, computed)

    async def GetInsights(
        self, request: pb.GetInsightsRequest, context: Context
    ) -> pb.GetInsightsResponse:
        experiment = await self._experiment(request.experiment)
        cached = await self._book.get(experiment)
        # Readers of one experiment share the cache entry: translate it once, not per call.
        built = self._responses.get(experiment.id)
        if built is None or built[0] is not cached:
            response = insights_response(
                experiment.id, experiment.status, cached.insights, cached.computed_at
            )
            self._responses[experiment.id] = built = (cached, response)
        return built[1]

    async def GetInsightsHistory(
        self, request: pb.GetInsightsHistoryRequest, context: Context
    ) -> pb.GetInsightsHistoryResponse:
        max_points = validate_page_size(
            request.max_points, default=DEFAULT_HISTORY_POINTS, field="max_points"
        )
        since = request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None
        experiment = await self._experiment(request.experiment)
        points = await read_points(self._pool, experiment.id, since=since, max_points=max_points)
        response = pb.GetInsightsHistoryResponse(
            experiment_id=experiment.id, interval_seconds=self._history_seconds
        )
        for point in points:
            out = response.points.add()
            out.recorded_at.FromDatetime(point.recorded_at)
            for v in point.variants:
                out.variants.add(
                    variant_id=v.variant_id,
                    trials=v.trials,
                    successes=v.successes,
                    prob_best=v.prob_best,
                    allocation=v.allocation,
                )
        return response
