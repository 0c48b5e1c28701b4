"""Test data for the store tests: experiments written with plain SQL (no code under test
involved), tracked events, and a transport that counts round trips."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from sira_server.store.hot_state import TrackEvent
from sira_server.store.lua_scripts import LuaScript
from sira_server.store.script_transport import ScriptCall, ScriptTransport


async def create_experiment(
    pool: asyncpg.Pool, *, variants: int = 2, reward: str = "conversion"
) -> tuple[str, list[str]]:
    """A running experiment with `variants` variants, by plain SQL; (id, variant ids)."""
    experiment_id = str(uuid.uuid4())
    variant_ids = [str(uuid.uuid4()) for _ in range(variants)]
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO experiments (id, key, name, status, started_at, reward, created_by)"
            " VALUES ($1, $2, 'Test', 'running', now(), $3, 'tester')",
            experiment_id,
            f"exp-{experiment_id[:8]}",
            reward,
        )
        for position, variant_id in enumerate(variant_ids):
            await conn.execute(
                "INSERT INTO experiment_variants"
                " (id, experiment_id, key, name, position, is_control)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                variant_id,
                experiment_id,
                f"v{position}",
                f"Variant {position}",
                position,
                position == 0,
            )
    return experiment_id, variant_ids


def event(
    subject: str,
    variant: str,
    event_type: str = "conversion",
    *,
    value: float = 0.0,
    currency: str | None = None,
    event_id: str | None = None,
) -> TrackEvent:
    return TrackEvent(
        subject_id=subject,
        variant_id=variant,
        event_type=event_type,
        event_id=event_id or uuid.uuid4().hex,
        occurred_ms=1_700_000_000_123,
        value=value,
        currency=currency,
    )


class CountingTransport:
    """A real transport that records how many calls each round trip carried."""

    def __init__(self, inner: ScriptTransport) -> None:
        self.inner = inner
        self.round_trips: list[int] = []

    async def run(self, script: LuaScript, calls: Sequence[ScriptCall]) -> list[Any]:
        self.round_trips.append(len(calls))
        return await self.inner.run(script, calls)

    async def aclose(self) -> None:
        await self.inner.aclose()
