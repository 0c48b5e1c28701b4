"""Small Postgres reads that keep the in-process catalog and gauges fresh."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg


async def live_versions(pool: asyncpg.Pool, statuses: Sequence[str]) -> dict[str, int]:
    """Experiment id -> version for every experiment in one of `statuses`."""
    rows = await pool.fetch(
        "SELECT id::text AS id, version FROM experiments WHERE status = ANY($1::text[])",
        list(statuses),
    )
    return {row["id"]: row["version"] for row in rows}


async def status_counts(pool: asyncpg.Pool) -> dict[str, int]:
    """Status -> number of experiments (the experiments_total gauge)."""
    rows = await pool.fetch("SELECT status, count(*) AS n FROM experiments GROUP BY status")
    return {row["status"]: row["n"] for row in rows}
