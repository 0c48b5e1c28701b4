"""Beta posteriors of every running bandit experiment, refreshed from Redis in the background.

Thompson sampling on a posterior that is ~200 ms old is batched Thompson sampling: the
regret cost is negligible at any realistic traffic, and Assign never waits for the
counters. Each refresh whose counts changed also computes, by exact quadrature
(`domain.propensity`), the probability that Thompson sampling picks each arm: the
propensity logged with a new assignment (with the warm-up and exploration shares mixed
in by `engine.decider`). Never on the Assign path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np

from sira_server.domain.experiment import Allocation
from sira_server.domain.propensity import thompson_propensities
from sira_server.engine.catalog import ExperimentCatalog, LiveExperiment
from sira_server.engine.decider import Posterior
from sira_server.store.hot_state import HotState

log = logging.getLogger(__name__)


def posterior_from_counts(live: LiveExperiment, counts: dict[str, tuple[int, int]]) -> Posterior:
    """alpha = 1 + successes, beta = 1 + trials - successes, in the catalog's arm order,
    with the exact probability that a Thompson draw picks each active arm."""
    trials = np.array([counts.get(v, (0, 0))[0] for v in live.variant_ids], dtype=np.float64)
    successes = np.array([counts.get(v, (0, 0))[1] for v in live.variant_ids], dtype=np.float64)
    successes = np.minimum(successes, trials)
    alpha = 1.0 + successes
    beta = 1.0 + trials - successes
    return Posterior(alpha, beta, thompson_propensities(alpha, beta, live.active))


def _fingerprint(counts: dict[str, tuple[int, int]]) -> tuple[tuple[str, int, int], ...]:
    return tuple(sorted((variant, n, s) for variant, (n, s) in counts.items()))


class PosteriorBook:
    def __init__(
        self,
        catalog: ExperimentCatalog,
        hot: HotState,
        *,
        interval_seconds: float = 0.2,
    ) -> None:
        self._catalog = catalog
        self._hot = hot
        self._interval = interval_seconds
        self._snapshot: dict[str, tuple[int, Posterior]] = {}
        self._keys: dict[str, tuple[int, tuple[tuple[str, int, int], ...]]] = {}
        self._task: asyncio.Task[None] | None = None

    def get(self, live: LiveExperiment) -> Posterior:
        """The latest posterior, or the uniform prior before the first refresh (or after
        the experiment's definition changed, e.g. a variant was dropped)."""
        entry = self._snapshot.get(live.id)
        if entry is None or entry[0] != live.experiment.version:
            return Posterior.uniform(live.active)
        return entry[1]

    async def refresh(self) -> None:
        bandits = [
            live
            for live in self._catalog.running()
            if live.experiment.allocation is Allocation.THOMPSON_SAMPLING
        ]
        if not bandits:
            self._snapshot.clear()
            return
        counts = await self._hot.posteriors([live.id for live in bandits])
        fresh: dict[str, tuple[int, Posterior]] = {}
        stale: list[tuple[LiveExperiment, dict[str, tuple[int, int]]]] = []
        for live in bandits:
            if live.id not in counts:
                continue
            key = (live.experiment.version, _fingerprint(counts[live.id]))
            if self._keys.get(live.id) == key and live.id in self._snapshot:
                fresh[live.id] = self._snapshot[live.id]  # nothing changed: no new pass
            else:
                stale.append((live, counts[live.id]))
                self._keys[live.id] = key
        if stale:
            # Quadrature (scipy, GIL released in its kernels): off the event loop, in one hop.
            computed = await asyncio.to_thread(self._compute, stale)
            fresh.update(computed)
        self._snapshot = fresh
        self._keys = {k: v for k, v in self._keys.items() if k in fresh}

    def _compute(
        self, stale: list[tuple[LiveExperiment, dict[str, tuple[int, int]]]]
    ) -> dict[str, tuple[int, Posterior]]:
        return {
            live.id: (live.experiment.version, posterior_from_counts(live, counts))
            for live, counts in stale
        }

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="posterior-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the last snapshot; decisions go on
                log.warning("posterior refresh failed: %s", exc)
            await asyncio.sleep(self._interval)
