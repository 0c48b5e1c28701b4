"""Insights per experiment, computed from the hot counters and kept for about a second.

A Monte Carlo pass over 100,000 draws costs tens of milliseconds, far too much per
request; operators and the fail-fast autopilot read the same numbers, so both share
this cache. An entry is reused while it is younger than `max_age_seconds` and the
experiment's definition (version) is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sira_server.domain.experiment import Experiment, ExperimentStatus, Reward
from sira_server.domain.insights import ArmCounts, ExperimentInsights, compute_insights
from sira_server.store.hot_state import HotState, VariantCounters

log = logging.getLogger(__name__)


def arm_counts(experiment: Experiment, counters: Mapping[str, VariantCounters]) -> list[ArmCounts]:
    """The store's counters in the shape the statistics take, in variant order."""
    arms = []
    for variant in experiment.variants:
        c = counters.get(variant.id) or VariantCounters()
        refunded_converted = 0
        if experiment.reward is Reward.CONVERSION_NOT_REFUNDED:
            # The hot successes already exclude refunded converted subjects.
            refunded_converted = max(c.converted_subjects - c.successes, 0)
        arms.append(
            ArmCounts.from_variant(
                variant,
                assigned_subjects=c.assigned_subjects,
                converted_subjects=min(c.converted_subjects, c.assigned_subjects),
                refunded_converted_subjects=refunded_converted,
                refunded_subjects=min(c.refunded_subjects, c.assigned_subjects),
                churned_subjects=min(c.churned_subjects, c.assigned_subjects),
            )
        )
    return arms


@dataclass(frozen=True, slots=True)
class CachedInsights:
    version: int
    computed_at: float
    """time.time() of the computation."""
    monotonic: float
    insights: ExperimentInsights
    arms: tuple[ArmCounts, ...]
    """The counts the insights were computed from."""


class InsightsBook:
    """Cache of insights; experiments read in the last `keep_warm_seconds` are recomputed
    in the background before their entry expires, so readers almost never wait."""

    def __init__(
        self,
        hot: HotState,
        *,
        max_age_seconds: float = 1.0,
        keep_warm_seconds: float = 60.0,
    ) -> None:
        self._hot = hot
        self._max_age = max_age_seconds
        self._keep_warm = keep_warm_seconds
        self._cache: dict[str, CachedInsights] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._readers: dict[str, tuple[float, Experiment]] = {}
        self._task: asyncio.Task[None] | None = None

    async def get(self, experiment: Experiment) -> CachedInsights:
        """Fresh enough insights; concurrent callers share one computation."""
        self._readers[experiment.id] = (time.monotonic(), experiment)
        cached = self._fresh(experiment)
        if cached is not None:
            return cached
        lock = self._locks.setdefault(experiment.id, asyncio.Lock())
        async with lock:
            cached = self._fresh(experiment)
            if cached is not None:
                return cached
            return await self.compute(experiment)

    async def compute(self, experiment: Experiment) -> CachedInsights:
        """Insights on the current counters. The statistics are a pure function of the
        counts and the definition (fixed seed), so unchanged counts reuse the last
        result: an idle experiment costs one Redis read, not a Monte Carlo pass."""
        draft = experiment.status is ExperimentStatus.DRAFT
        counters = {} if draft else await self._hot.counters(experiment.id)
        arms = arm_counts(experiment, counters)
        previous = self._cache.get(experiment.id)
        if previous is not None and (previous.version, previous.arms) == (
            experiment.version,
            tuple(arms),
        ):
            insights = previous.insights
        else:
            # ~10-50 ms of numba work that releases the GIL: keep the event loop answering.
            insights = await asyncio.to_thread(
                compute_insights,
                arms,
                experiment.fail_fast,
                reward=experiment.reward,
                allocation=experiment.allocation,
                status=experiment.status,
            )
        cached = CachedInsights(
            experiment.version, time.time(), time.monotonic(), insights, tuple(arms)
        )
        self._cache[experiment.id] = cached
        return cached

    def _fresh(self, experiment: Experiment) -> CachedInsights | None:
        cached = self._cache.get(experiment.id)
        if (
            cached is not None
            and cached.version == experiment.version
            and time.monotonic() - cached.monotonic < self._max_age
        ):
            return cached
        return None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._keep_warm_loop(), name="insights-warm")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _keep_warm_loop(self) -> None:
        while True:
            await asyncio.sleep(self._max_age / 2)
            now = time.monotonic()
            for experiment_id, (read_at, experiment) in list(self._readers.items()):
                if now - read_at > self._keep_warm:
                    del self._readers[experiment_id]
                    self._cache.pop(experiment_id, None)
                    continue
                try:
                    await self.compute(experiment)
                except Exception as exc:  # readers recompute on demand
                    log.debug("insights warm-up of %s failed: %s", experiment_id, exc)
