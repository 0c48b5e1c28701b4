"""The whole decision for one subject and one live experiment.

targeting -> concluded? -> exposure -> sticky LRU -> choice of an arm (`engine.decider`)
-> ONE Redis round trip that makes the choice sticky unless another process got there
first (then its choice holds). Nothing here waits on Postgres in the normal case.

Redis down: subjects with an assignment are still answered (LRU, then Postgres); a new
subject gets UNAVAILABLE rather than an assignment that Redis would not know about.

The `Assigner` owns the state of that path in this process: the sticky LRU, the random
state, and each live experiment's variants rendered once by the caller's ``render``
(the servicer's protobuf messages), dropped when the catalog reloads the experiment.
It knows nothing of gRPC: the servicer validates, calls `Assigner.decide`, and
translates the `Decision`.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from enum import Enum
from typing import Generic, NamedTuple, TypeVar

import asyncpg

from sira_server.domain.bayes import new_rng_state
from sira_server.domain.experiment import Variant
from sira_server.domain.exposure import is_exposed
from sira_server.domain.sticky_cache import StickyCache
from sira_server.domain.targeting import SubjectProfile
from sira_server.engine.catalog import ExperimentCatalog, LiveExperiment
from sira_server.engine.decider import choose_new_arm, concluded_index, explore_share
from sira_server.engine.posteriors import PosteriorBook
from sira_server.errors import Unavailable
from sira_server.store.assignments import find_assignment
from sira_server.store.hot_keys import Assignment
from sira_server.store.hot_state import HotState

V = TypeVar("V")

DEFAULT_STICKY_CAPACITY = 200_000


class Reason(Enum):
    """Why a decision is what it is (the servicer maps it onto ``AssignmentReason``)."""

    NEW = "new"
    STICKY = "sticky"
    NOT_ELIGIBLE = "not_eligible"
    NOT_EXPOSED = "not_exposed"
    CONCLUDED = "concluded"


class Decision(NamedTuple, Generic[V]):
    """An immutable value (a NamedTuple: built on every call, cheaper than a frozen
    dataclass)."""

    live: LiveExperiment
    reason: Reason
    variant: V | None = None
    """The rendered variant the subject sees; None when it sees none."""
    propensity: float = 0.0
    assigned_ms: int | None = None
    """When the subject was first assigned (None for a concluded experiment's answer)."""


class Assigner(Generic[V]):
    def __init__(
        self,
        catalog: ExperimentCatalog,
        posteriors: PosteriorBook,
        hot: HotState,
        pool: asyncpg.Pool,
        render: Callable[[Variant], V],
        *,
        sticky_capacity: int = DEFAULT_STICKY_CAPACITY,
    ) -> None:
        """``render``: what a decision carries per variant, built once per definition."""
        self._posteriors = posteriors
        self._hot = hot
        self._pool = pool
        self._render = render
        self._sticky: StickyCache[Assignment] = StickyCache(sticky_capacity)
        self._rng_state = new_rng_state(secrets.randbits(62))
        self._rng = random.Random(secrets.randbits(64))
        self._rendered: dict[tuple[str, int], tuple[V, ...]] = {}
        catalog.add_listener(self._on_change)

    async def _on_change(self, live: LiveExperiment | None, experiment_id: str) -> None:
        self._rendered = {k: v for k, v in self._rendered.items() if k[0] != experiment_id}
        if live is None:  # deleted or archived: its assignments are gone or unreachable
            self._sticky.invalidate_experiment(experiment_id)

    def _variants(self, live: LiveExperiment) -> tuple[V, ...]:
        key = (live.id, live.experiment.version)
        rendered = self._rendered.get(key)
        if rendered is None:
            rendered = tuple(self._render(v) for v in live.experiment.variants)
            self._rendered[key] = rendered
        return rendered

    def _decision(
        self,
        live: LiveExperiment,
        reason: Reason,
        index: int | None = None,
        propensity: float = 0.0,
        assigned_ms: int | None = None,
    ) -> Decision[V]:
        if index is None:
            return Decision(live, reason)
        return Decision(live, reason, self._variants(live)[index], propensity, assigned_ms)

    def _sticky_decision(self, live: LiveExperiment, held: Assignment) -> Decision[V]:
        index = live.index_of[held.variant_id]
        return self._decision(live, Reason.STICKY, index, held.propensity, held.assigned_ms)

    async def decide(
        self,
        live: LiveExperiment,
        subject_id: str,
        profile: SubjectProfile,
        context: Callable[[], str],
    ) -> Decision[V]:
        """``context``: the subject's context as stored with a new assignment (only
        called when one is made)."""
        experiment = live.experiment
        if not live.eligible(profile):
            return self._decision(live, Reason.NOT_ELIGIBLE)
        if not live.running:
            return self._decision(live, Reason.CONCLUDED, concluded_index(experiment), 1.0)
        if not is_exposed(live.id, subject_id, experiment.exposure_percent):
            return self._decision(live, Reason.NOT_EXPOSED)
        held = self._sticky.get(live.id, subject_id)
        if held is not None:
            return self._sticky_decision(live, held)
        choice = choose_new_arm(
            experiment.allocation,
            live.weights,
            live.active,
            self._posteriors.get(live),
            self._rng_state,
            self._rng,
            experiment.fail_fast.min_samples,
            explore_share(experiment),
        )
        try:
            outcome = await self._hot.assign(
                live.id,
                subject_id,
                live.variant_ids[choice.index],
                choice.propensity,
                context(),
            )
        except Unavailable:
            held = await find_assignment(
                self._pool, live.id, subject_id, seconds=self._hot.timeouts.postgres_seconds
            )
            if held is None:
                raise
            self._sticky.put(live.id, subject_id, held)
            return self._sticky_decision(live, held)
        held = Assignment(outcome.variant_id, outcome.propensity, outcome.assigned_ms)
        self._sticky.put(live.id, subject_id, held)
        if not outcome.created:
            return self._sticky_decision(live, held)
        return self._decision(
            live, Reason.NEW, choice.index, choice.propensity, outcome.assigned_ms
        )
