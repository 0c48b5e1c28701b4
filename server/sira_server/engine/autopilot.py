"""Fail-fast in the background: evaluate running auto-stop experiments and act.

Never on the Assign path. One replica acts per round (a Postgres advisory lock), so
two replicas cannot drop or conclude the same experiment twice; every step is a
lifecycle transaction with its audit row, and the catalog change reaches every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from sira_server.domain.autopilot import AUTOPILOT_ACTOR, Plan, plan
from sira_server.engine.catalog import ExperimentCatalog
from sira_server.engine.insights_book import InsightsBook
from sira_server.errors import SiraError
from sira_server.store.experiments import ExperimentRepository

log = logging.getLogger(__name__)

AUTOPILOT_LOCK = 0x51A4_0F00_FA57
"""pg_advisory_lock key of the round (any 64-bit constant of ours)."""


class FailFastAutopilot:
    def __init__(
        self,
        catalog: ExperimentCatalog,
        book: InsightsBook,
        repository: ExperimentRepository,
        pool: asyncpg.Pool,
        *,
        interval_seconds: float = 2.0,
    ) -> None:
        self._catalog = catalog
        self._book = book
        self._repository = repository
        self._pool = pool
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    async def round(self) -> list[Plan]:
        """Evaluate once; the plans carried out (empty when another replica holds the lock)."""
        done: list[Plan] = []
        async with self._pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", AUTOPILOT_LOCK):
                return done
            try:
                for live in self._catalog.running():
                    experiment = live.experiment
                    if not experiment.fail_fast.auto_stop:
                        continue
                    cached = await self._book.compute(experiment)
                    steps = plan(experiment, cached.insights)
                    if not steps.empty:
                        await self._carry_out(experiment.id, steps)
                        done.append(steps)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", AUTOPILOT_LOCK)
        return done

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
