"""Sticky assignments read from Postgres: the fallback while Redis is unreachable."""

from __future__ import annotations

import asyncpg

from sira_server.errors import Unavailable
from sira_server.store.faults import bounded
from sira_server.store.hot_keys import Assignment


async def find_assignment(
    pool: asyncpg.Pool, experiment_id: str, subject_id: str, *, seconds: float = 1.0
) -> Assignment | None:
    """The subject's flushed assignment, if Postgres has it within `seconds`."""
    query = pool.fetchrow(
        """SELECT variant_id::text AS variant_id, propensity,
                  (extract(epoch FROM assigned_at) * 1000)::bigint AS assigned_ms
           FROM experiment_assignments WHERE experiment_id = $1 AND molam_id = $2""",
        experiment_id,
        subject_id,
        timeout=seconds,
    )
    try:
        row = await bounded(query, seconds, "Postgres")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, Unavailable) as exc:
        raise Unavailable(
            "neither Redis nor Postgres can serve assignments right now; retry",
            metadata={"store": "redis,postgres"},
        ) from exc
    if row is None:
        return None
    return Assignment(row["variant_id"], row["propensity"], row["assigned_ms"])
