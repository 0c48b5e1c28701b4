"""In-process LRU of sticky assignments: (experiment_id, subject_id) -> assignment.

Assignments never change once made, so a hit can be served without asking Redis and
entries need no TTL; the cache is bounded by count and evicts the least recently used.

Deleting an experiment must drop its entries. Scanning the whole cache for them would
block the event loop on a large cache, so each experiment carries a generation number:
`invalidate_experiment` bumps it in O(1), entries of an older generation read as misses
(and are removed when read), and those never read again age out through the LRU.

Not thread-safe: one instance per asyncio event loop (one per worker process).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["StickyCache"]

V = TypeVar("V")


class StickyCache(Generic[V]):
    """Bounded LRU mapping (experiment_id, subject_id) -> V with O(1) get, put, invalidate."""

    __slots__ = ("_capacity", "_entries", "_generations", "hits", "misses")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        # value, generation of its experiment when stored
        self._entries: OrderedDict[tuple[str, str], tuple[V, int]] = OrderedDict()
        self._generations: dict[str, int] = {}
        self.hits = 0
        """Number of `get` calls that found a current entry (for metrics)."""
        self.misses = 0
        """Number of `get` calls that found nothing current (for metrics)."""

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        """Stored entries, including invalidated ones not yet read or evicted."""
        return len(self._entries)

    def get(self, experiment_id: str, subject_id: str) -> V | None:
        """The cached assignment, or None; a hit becomes the most recently used entry."""
        key = (experiment_id, subject_id)
        entry = self._entries.get(key)
        if entry is not None:
            if entry[1] == self._generations.get(experiment_id, 0):
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            del self._entries[key]  # stored before the experiment was invalidated
        self.misses += 1
        return None

    def put(self, experiment_id: str, subject_id: str, value: V) -> None:
        """Store (or replace) an assignment, evicting the least recently used if full."""
        key = (experiment_id, subject_id)
        entries = self._entries
        entries[key] = (value, self._generations.get(experiment_id, 0))
        entries.move_to_end(key)
        if len(entries) > self._capacity:
            entries.popitem(last=False)

    def invalidate_experiment(self, experiment_id: str) -> None:
        """Forget every assignment of ``experiment_id`` (e.g. it was deleted). O(1)."""
        self._generations[experiment_id] = self._generations.get(experiment_id, 0) + 1

    def clear(self) -> None:
        """Forget everything (counters included)."""
        self._entries.clear()
        self._generations.clear()
        self.hits = 0
        self.misses = 0
