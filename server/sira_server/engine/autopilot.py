"""Fail-fast in the background: evaluate running auto-stop experiments and act.

Never on the Assign path. One replica acts per round (a Postgres advisory lock), so
two replicas cannot drop or conclude the same experiment twice; every step is a
lifecycle transaction with its audit row, and the catalog change reaches every process.

The lock is transaction-scoped (`pg_try_advisory_xact_lock`, held by a transaction open
for the round): it behaves the same through PgBouncer in transaction mode, where a
session lock could be taken on one server connection and "released" on another, and
leak. A replica whose catalog lags (the change event is on its way) may still plan a
step another replica took; the repository then finds the variant already dropped or the
experiment already stopped and writes nothing, so the audit log holds each step once.

The same lock-holding round records every running experiment's allocation and P(best)
once per history interval (GetInsightsHistory). The point's time is truncated to the
interval and written with ON CONFLICT DO NOTHING, so a replica taking the lock later in
the same interval adds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

import asyncpg

from sira_server.domain.autopilot import AUTOPILOT_ACTOR, Plan, plan
from sira_server.domain.experiment import Allocation, Experiment
from sira_server.domain.insights import ExperimentInsights
from sira_server.engine.catalog import ExperimentCatalog
from sira_server.engine.insights_book import InsightsBook
from sira_server.errors import SiraError
from sira_server.store.experiments import ExperimentRepository
from sira_server.store.insights_history import VariantPoint, record_point

log = logging.getLogger(__name__)

AUTOPILOT_LOCK = 0x51A4_0F00_FA57
"""Advisory lock key of the round (any 64-bit constant of ours)."""

RoundOutcome = Literal["acted", "idle", "locked"]
"""How a round ended: steps taken, nothing to do, or another replica held the lock."""


class FailFastAutopilot:
    def __init__(
        self,
        catalog: ExperimentCatalog,
        book: InsightsBook,
        repository: ExperimentRepository,
        pool: asyncpg.Pool,
        *,
        interval_seconds: float = 2.0,
        history_seconds: float = 60.0,
        on_round: Callable[[RoundOutcome], None] | None = None,
    ) -> None:
        self._catalog = catalog
        self._book = book
        self._repository = repository
        self._pool = pool
        # A round at least once per history interval, so no point is skipped.
        self._interval = min(interval_seconds, history_seconds)
        self._history_seconds = history_seconds
        self._last_history_slot: float | None = None
        self._on_round = on_round
        self._task: asyncio.Task[None] | None = None

    async def round(self) -> list[Plan]:
        """Evaluate once; the plans carried out (empty when another replica holds the lock)."""
        done: list[Plan] = []
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", AUTOPILOT_LOCK):
                self._report("locked")
                return done
            # The steps run on other connections, in their own transactions; this one
            # only holds the lock until the round ends (commit releases it).
            for live in self._catalog.running():
                experiment = live.experiment
                if not experiment.fail_fast.auto_stop:
                    continue
                cached = await self._book.compute(experiment)
                steps = plan(experiment, cached.insights)
                if not steps.empty:
                    await self._carry_out(experiment.id, steps)
                    done.append(steps)
            await self._record_history(conn)
        self._report("acted" if done else "idle")
        return done

    async def _record_history(self, conn: asyncpg.Connection) -> None:
        """One point per running experiment, once per history interval (on the lock's
        connection: committed with the round)."""
        slot = math.floor(time.time() / self._history_seconds) * self._history_seconds
        if slot == self._last_history_slot:
            return
        recorded_at = datetime.fromtimestamp(slot, tz=UTC)
        for live in self._catalog.running():
            experiment = live.experiment
            cached = await self._book.compute(experiment)
            try:
                async with conn.transaction():  # a savepoint: the others still commit
                    await record_point(
                        conn, experiment.id, recorded_at, history_rows(experiment, cached.insights)
                    )
            except asyncpg.ForeignKeyViolationError:
                # Deleted since this replica's catalog saw it running: nothing to record.
                log.info("history of %s skipped: experiment deleted", experiment.id)
        self._last_history_slot = slot

    def _report(self, outcome: RoundOutcome) -> None:
        if self._on_round is not None:
            self._on_round(outcome)

    async def _carry_out(self, experiment_id: str, steps: Plan) -> None:
        try:
            if steps.drop:
                await self._repository.drop_variants(
                    experiment_id, steps.drop, actor=AUTOPILOT_ACTOR, evidence=steps.evidence
                )
            if steps.winner is not None:
                await self._repository.stop(
                    experiment_id,
                    actor=AUTOPILOT_ACTOR,
                    winner=steps.winner,
                    reason=steps.reason,
                    evidence=steps.evidence,
                )
            log.info("auto-stop on %s: %s", experiment_id, steps.reason)
        except SiraError as exc:  # e.g. an operator stopped it meanwhile
            log.info("auto-stop on %s skipped: %s", experiment_id, exc.message)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fail-fast")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # next round tries again
                log.warning("fail-fast round failed: %s", exc)


def history_rows(experiment: Experiment, insights: ExperimentInsights) -> list[VariantPoint]:
    """The weights in force per variant: P(a new subject gets it). Thompson sampling
    assigns the variant whose posterior draw is highest, i.e. with probability P(best);
    fixed weights split over the active variants."""
    active_weight = sum(v.weight for v in experiment.variants if v.is_active)
    weights = {
        v.id: (v.weight / active_weight if v.is_active and active_weight > 0 else 0.0)
        for v in experiment.variants
    }
    thompson = experiment.allocation is Allocation.THOMPSON_SAMPLING
    return [
        VariantPoint(
            variant_id=v.variant_id,
            trials=v.samples,
            successes=v.conversions,
            prob_best=min(max(v.prob_best, 0.0), 1.0),
            allocation=min(
                max(v.prob_best if thompson else weights.get(v.variant_id, 0.0), 0.0), 1.0
            ),
        )
        for v in insights.insights
    ]
