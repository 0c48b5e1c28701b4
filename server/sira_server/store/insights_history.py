"""Allocation and P(best) over time: the `insights_history` table.

Rows are written by the background round of one replica (engine/autopilot.py) at a
`recorded_at` truncated to the history interval, with ON CONFLICT DO NOTHING: a second
replica (or a retried round) recording the same point writes nothing. At most
`MAX_KEPT_POINTS` points are kept per experiment; older ones are pruned on write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

MAX_KEPT_POINTS = 1000
"""Points kept per experiment (the most GetInsightsHistory returns)."""


@dataclass(frozen=True, slots=True)
class VariantPoint:
    variant_id: str
    trials: int
    successes: int
    prob_best: float
    allocation: float


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    recorded_at: datetime
    variants: tuple[VariantPoint, ...]


async def record_point(
    conn: asyncpg.Connection,
    experiment_id: str,
    recorded_at: datetime,
    rows: Sequence[VariantPoint],
) -> None:
    """Write one point (a row per variant) unless it exists; prune the oldest."""
    await conn.executemany(
        """
        INSERT INTO insights_history
            (experiment_id, recorded_at, variant_id, trials, successes, p_best, allocation)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT DO NOTHING
        """,
        [
            (
                experiment_id,
                recorded_at,
                r.variant_id,
                r.trials,
                r.successes,
                r.prob_best,
                r.allocation,
            )
            for r in rows
        ],
    )
    await conn.execute(
        """
        DELETE FROM insights_history
        WHERE experiment_id = $1 AND recorded_at <= (
            SELECT DISTINCT recorded_at FROM insights_history WHERE experiment_id = $1
            ORDER BY recorded_at DESC OFFSET $2 LIMIT 1
        )
        """,
        experiment_id,
        MAX_KEPT_POINTS,
    )


async def read_points(
    conn: asyncpg.Connection | asyncpg.Pool,
    experiment_id: str,
    *,
    since: datetime | None,
    max_points: int,
) -> list[HistoryPoint]:
    """The latest `max_points` points after `since`, oldest first, variants in the
    experiment's order."""
    rows = await conn.fetch(
        """
        WITH chosen AS (
            SELECT DISTINCT recorded_at FROM insights_history
            WHERE experiment_id = $1 AND ($2::timestamptz IS NULL OR recorded_at > $2)
            ORDER BY recorded_at DESC LIMIT $3
        )
        SELECT h.recorded_at, h.variant_id::text AS variant_id, h.trials, h.successes,
               h.p_best, h.allocation
        FROM insights_history h
        JOIN chosen USING (recorded_at)
        LEFT JOIN experiment_variants v ON v.id = h.variant_id
        WHERE h.experiment_id = $1
        ORDER BY h.recorded_at, v.position NULLS LAST, h.variant_id
        """,
        experiment_id,
        since,
        max_points,
    )
    points: list[HistoryPoint] = []
    current: list[VariantPoint] = []
    at: datetime | None = None
    for row in rows:
        if row["recorded_at"] != at:
            if at is not None:
                points.append(HistoryPoint(at, tuple(current)))
            at, current = row["recorded_at"], []
        current.append(
            VariantPoint(
                row["variant_id"], row["trials"], row["successes"], row["p_best"], row["allocation"]
            )
        )
    if at is not None:
        points.append(HistoryPoint(at, tuple(current)))
    return points
