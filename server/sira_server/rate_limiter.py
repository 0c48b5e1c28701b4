"""Per-principal token buckets and concurrency counts, in memory, for one process.

Pure and synchronous: the caller passes the clock, nothing waits. A call is admitted
or refused at once (load is shed, never queued), and a refusal says how long to wait.
See docs/design.md for why this is not a library (the asyncio limiters available
wait for capacity instead of refusing, and keep no per-key table).

The table of principals is bounded: past `max_keys`, idle principals are dropped
oldest first (a dropped principal starts again with a full bucket).
"""

from __future__ import annotations

from dataclasses import dataclass

from sira_server.limit_settings import RoleLimit

__all__ = ["RateLimiter", "Refusal"]

CONCURRENCY_RETRY_SECONDS = 0.05
"""What a caller refused for concurrency is told to wait: in-flight calls end fast."""


@dataclass(frozen=True, slots=True)
class Refusal:
    limit: str
    """``rate`` or ``concurrency``."""
    retry_after_seconds: float


@dataclass(slots=True)
class _Principal:
    tokens: float
    stamp: float
    in_flight: int = 0


class RateLimiter:
    def __init__(self, max_keys: int = 100_000) -> None:
        self._max_keys = max_keys
        self._table: dict[str, _Principal] = {}

    def __len__(self) -> int:
        return len(self._table)

    def acquire(self, key: str, limit: RoleLimit, now: float) -> Refusal | None:
        """Admit one call of `key` (then `release` it when done) or say why not."""
        state = self._table.get(key)
        if state is None:
            self._make_room()
            state = self._table[key] = _Principal(tokens=float(limit.burst), stamp=now)
        else:
            elapsed = max(0.0, now - state.stamp)
            state.tokens = min(float(limit.burst), state.tokens + elapsed * limit.rate)
            state.stamp = now
        if state.in_flight >= limit.concurrency:
            return Refusal("concurrency", CONCURRENCY_RETRY_SECONDS)
        if state.tokens < 1.0:
            return Refusal("rate", (1.0 - state.tokens) / limit.rate)
        state.tokens -= 1.0
        state.in_flight += 1
        return None

    def release(self, key: str) -> None:
        state = self._table.get(key)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    def in_flight(self, key: str) -> int:
        state = self._table.get(key)
        return 0 if state is None else state.in_flight

    def _make_room(self) -> None:
        if len(self._table) < self._max_keys:
            return
        target = self._max_keys * 9 // 10
        for key in [k for k, s in self._table.items() if s.in_flight == 0]:
            if len(self._table) <= target:
                break
            del self._table[key]
