"""Live experiments compiled for the decision path, kept fresh in every process.

Assign and Track read a dict; they never wait on Postgres for a known experiment.
Freshness: a change committed by any replica is published on a Redis channel and every
process reloads that experiment at once; a version check every few seconds is the safety
net for a missed message (Redis restarted, subscriber reconnecting).

Change events have ONE path to their listeners: a lifecycle commit calls the
repository's ``on_change`` -> `ExperimentCatalog.changed` (reload here, publish) ->
other processes' subscriber or version check -> `ExperimentCatalog.reload`, the only
place that calls the listeners, once per applied version, in registration order, with
the new `LiveExperiment` (None: no longer live). The composition root (app.py)
registers them: `engine.hot_prep.HotStatePreparer` (Redis state follows) and each
`engine.assigner.Assigner` (drops its cached variants and, once not live, its sticky
entries). A new per-process cache of experiment data registers here too.

Only running and stopped experiments live here. A reference to anything else is looked
up in Postgres and answered with an error (draft: FAILED_PRECONDITION; archived or
unknown: NOT_FOUND), remembered for a second so a flood of bad references cannot
overload Postgres. Those remembered misses are bounded in bytes (`MISS_CACHE_BYTES`,
oldest dropped first); callers without a token use `peek`, which never reaches
Postgres nor remembers anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import numpy as np
import numpy.typing as npt

from sira_server.domain.experiment import Experiment, ExperimentStatus
from sira_server.domain.targeting import TargetingPredicate, compile_targeting
from sira_server.errors import FailedPrecondition, NotFound, SiraError, Unavailable
from sira_server.store.experiments import ExperimentRepository
from sira_server.store.faults import bounded
from sira_server.store.live import live_versions, status_counts
from sira_server.store.redis_conn import RedisClient

log = logging.getLogger(__name__)

CHANGES_CHANNEL = "sira:experiments:changed"
LIVE_STATUSES = (ExperimentStatus.RUNNING, ExperimentStatus.STOPPED)
MISS_CACHE_BYTES = 1 << 20
"""Budget of remembered misses: reference characters plus `MISS_OVERHEAD_BYTES` each."""
MISS_OVERHEAD_BYTES = 200
DELETED_VERSION = 2**63 - 1
"""What a deleted experiment counts as in `_applied`: newer than any definition."""


@dataclass(frozen=True, slots=True)
class LiveExperiment:
    """An experiment plus what the decision path derives from it, computed once."""

    experiment: Experiment
    eligible: TargetingPredicate
    variant_ids: tuple[str, ...]
    index_of: dict[str, int]
    """Variant id and key -> position."""
    weights: npt.NDArray[np.float64]
    active: npt.NDArray[np.bool_]

    @property
    def id(self) -> str:
        return self.experiment.id

    @property
    def running(self) -> bool:
        return self.experiment.status is ExperimentStatus.RUNNING

    @classmethod
    def compile(cls, experiment: Experiment) -> LiveExperiment:
        variants = experiment.variants
        index_of = {v.id: i for i, v in enumerate(variants)}
        index_of.update({v.key: i for i, v in enumerate(variants)})
        return cls(
            experiment=experiment,
            eligible=compile_targeting(experiment.targeting),
            variant_ids=tuple(v.id for v in variants),
            index_of=index_of,
            weights=np.array([v.weight for v in variants], dtype=np.float64),
            active=np.array([v.is_active for v in variants], dtype=np.bool_),
        )


ChangeListener = Callable[[LiveExperiment | None, str], Awaitable[None]]
"""Called with (new definition or None when it left the catalog, experiment id)."""


class ExperimentCatalog:
    def __init__(
        self,
        repository: ExperimentRepository,
        pool: asyncpg.Pool,
        redis: RedisClient,
        *,
        version_check_seconds: float = 3.0,
        negative_ttl_seconds: float = 1.0,
        lookup_seconds: float | None = None,
    ) -> None:
        """`lookup_seconds`: how long `get` waits on Postgres for an experiment not
        cached (then Unavailable); None: the repository's own deadlines."""
        self._repository = repository
        self._pool = pool
        self._redis = redis
        self._version_check_seconds = version_check_seconds
        self._negative_ttl = negative_ttl_seconds
        self._lookup_seconds = lookup_seconds
        self._by_id: dict[str, LiveExperiment] = {}
        self._by_ref: dict[str, LiveExperiment] = {}
        self._misses: dict[str, tuple[float, SiraError]] = {}
        self._miss_bytes = 0
        self._applied: dict[str, int] = {}
        """Newest definition version applied per experiment (installed or removed). Reads
        of Postgres overlap (a reload per change, misses of `get`): one that finishes after
        a newer one must not bring back what it read, e.g. an experiment since archived."""
        self._listeners: list[ChangeListener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.status_counts: dict[str, int] = {}

    # --- reads (the hot path) ---

    def live(self) -> list[LiveExperiment]:
        return list(self._by_id.values())

    def running(self) -> list[LiveExperiment]:
        return [e for e in self._by_id.values() if e.running]

    def peek(self, ref: str) -> LiveExperiment | None:
        """The live experiment named by id or key if this process holds it; never waits,
        never queries Postgres, never remembers a miss (for unauthenticated callers)."""
        return self._by_ref.get(ref)

    async def get(self, ref: str) -> LiveExperiment:
        """The live experiment named by id or key; raises for any other state."""
        live = self._by_ref.get(ref)
        if live is not None:
            return live
        miss = self._misses.get(ref)
        if miss is not None and miss[0] > time.monotonic():
            raise miss[1]
        try:
            experiment = await bounded(self._repository.get(ref), self._lookup_seconds, "Postgres")
            if experiment.status is ExperimentStatus.DRAFT:
                raise FailedPrecondition(
                    f"experiment '{experiment.key}' is a draft; start it before assigning",
                    metadata={
                        "experiment": experiment.key,
                        "status": experiment.status.value,
                        "allowed_statuses": "running,stopped",
                    },
                )
            if experiment.status is ExperimentStatus.ARCHIVED:
                raise NotFound(
                    f"experiment '{experiment.key}' is archived",
                    metadata={"experiment": ref},
                )
        except (FailedPrecondition, NotFound) as exc:
            self._remember_miss(ref, exc)
            raise
        if self._is_stale(experiment.id, experiment.version):
            # A reload applied a newer definition while this read was in flight.
            live = self._by_id.get(experiment.id)
            if live is None:
                raise NotFound(
                    f"experiment '{experiment.key}' is no longer live",
                    metadata={"experiment": ref},
                )
            return live
        return self._install(experiment)

    def _remember_miss(self, ref: str, exc: SiraError) -> None:
        if ref in self._misses:
            self._forget_miss(ref)
        self._misses[ref] = (time.monotonic() + self._negative_ttl, exc)
        self._miss_bytes += _miss_size(ref, exc)
        while self._miss_bytes > MISS_CACHE_BYTES and self._misses:
            self._forget_miss(next(iter(self._misses)))  # oldest first (insertion order)

    def _forget_miss(self, ref: str) -> None:
        _, exc = self._misses.pop(ref)
        self._miss_bytes -= _miss_size(ref, exc)

    @property
    def miss_cache_bytes(self) -> int:
        """Approximate memory held by remembered misses."""
        return self._miss_bytes

    # --- changes ---

    def add_listener(self, listener: ChangeListener) -> None:
        """Called by `reload` after every applied change (see the module docstring)."""
        self._listeners.append(listener)

    async def changed(self, experiment_id: str) -> None:
        """A change committed here: reload now, and tell the other processes."""
        await self.reload(experiment_id)
        try:
            await self._redis.publish(CHANGES_CHANNEL, experiment_id)
        except Exception:  # the version check catches up; the change is committed
            log.warning("could not publish change of %s", experiment_id, exc_info=True)

    async def reload(self, experiment_id: str) -> None:
        self._misses.clear()
        self._miss_bytes = 0
        try:
            experiment = await self._repository.get(experiment_id)
        except NotFound:
            experiment = None
        version = DELETED_VERSION if experiment is None else experiment.version
        if self._is_stale(experiment_id, version):
            return  # a newer definition is in place; its listeners ran already
        self._applied[experiment_id] = version
        if experiment is not None and experiment.status in LIVE_STATUSES:
            live: LiveExperiment | None = self._install(experiment)
        else:
            live = None
            self._remove(experiment_id)
        for listener in self._listeners:
            await listener(live, experiment_id)

    def _is_stale(self, experiment_id: str, version: int) -> bool:
        return version < self._applied.get(experiment_id, 0)

    def _install(self, experiment: Experiment) -> LiveExperiment:
        self._applied[experiment.id] = max(experiment.version, self._applied.get(experiment.id, 0))
        live = LiveExperiment.compile(experiment)
        self._remove(experiment.id)
        self._by_id[experiment.id] = live
        self._by_ref[experiment.id] = live
        self._by_ref[experiment.key] = live
        return live

    def _remove(self, experiment_id: str) -> None:
        old = self._by_id.pop(experiment_id, None)
        if old is not None:
            self._by_ref.pop(old.id, None)
            self._by_ref.pop(old.experiment.key, None)

    # --- background ---

    async def start(self) -> None:
        await self.sync()
        self._tasks = [
            asyncio.create_task(self._listen(), name="catalog-listen"),
            asyncio.create_task(self._check_versions(), name="catalog-versions"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def sync(self) -> None:
        """Reload every live experiment whose version differs from ours; drop the gone."""
        try:
            versions = await live_versions(self._pool, [s.value for s in LIVE_STATUSES])
            self.status_counts = await status_counts(self._pool)
        except (OSError, asyncpg.PostgresError, Unavailable) as exc:
            log.warning("catalog version check failed: %s", exc)
            return
        for experiment_id in [i for i in self._by_id if i not in versions]:
            await self.reload(experiment_id)
        for experiment_id, version in versions.items():
            live = self._by_id.get(experiment_id)
            if live is None or live.experiment.version != version:
                await self.reload(experiment_id)

    async def _check_versions(self) -> None:
        while True:
            await asyncio.sleep(self._version_check_seconds)
            try:
                await self.sync()
            except Exception:  # never let the safety net die
                log.exception("catalog sync failed")

    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CHANGES_CHANNEL)
                    backoff = 0.5
                    while True:
                        # A bounded wait, not listen(): the loop wakes up regularly, so
                        # cancellation (shutdown) never waits on a silent socket.
                        message = await pubsub.get_message(timeout=1.0)
                        if message is None or message.get("type") != "message":
                            continue
                        data = message["data"]
                        experiment_id = data.decode() if isinstance(data, bytes) else str(data)
                        await self.reload(experiment_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("catalog change listener: %s; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)


def _miss_size(ref: str, exc: SiraError) -> int:
    return len(ref) + len(exc.message) + MISS_OVERHEAD_BYTES
