"""InsightsService: what happened (GetResults) and what to do about it (GetInsights)."""

from __future__ import annotations

from typing import Any, TypeAlias

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
from sira_server.domain.validation import require_reference
from sira_server.engine.catalog import ExperimentCatalog
from sira_server.engine.insights_book import CachedInsights, InsightsBook
from sira_server.errors import FailedPrecondition, NotFound
from sira_server.store.experiments import ExperimentRepository
from sira_server.store.hot_state import HotState

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class InsightsServicer(insights_service_pb2_grpc.InsightsServiceServicer):
    def __init__(
        self,
        catalog: ExperimentCatalog,
        repository: ExperimentRepository,
        hot: HotState,
        book: InsightsBook,
    ) -> None:
        self._catalog = catalog
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
