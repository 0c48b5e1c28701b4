"""Redis state follows the catalog: a catalog change listener.

A running experiment needs its Redis state (counters, stream) before traffic; a deleted
one leaves nothing behind in Redis. An archived experiment keeps its state (its row still
exists: its results stay readable).
"""

from __future__ import annotations

from sira_server.engine.catalog import LiveExperiment
from sira_server.store.experiments import ExperimentRepository
from sira_server.store.hot_state import HotState


class HotStatePreparer:
    """Register with `ExperimentCatalog.add_listener`."""

    def __init__(self, hot: HotState, repository: ExperimentRepository) -> None:
        self._hot = hot
        self._repository = repository

    async def __call__(self, live: LiveExperiment | None, experiment_id: str) -> None:
        if live is not None and live.running:
            await self._hot.init_experiment(live.id, live.variant_ids, live.experiment.reward.value)
        elif live is None and not await self._repository.exists(experiment_id):
            await self._hot.drop_experiment(experiment_id)
