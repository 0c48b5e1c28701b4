"""Sticky LRU: hits, LRU eviction order, capacity, experiment invalidation, counters."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from sira_server.domain.sticky_cache import StickyCache


def test_get_returns_what_was_put() -> None:
    cache: StickyCache[str] = StickyCache(10)
    assert cache.get("e1", "s1") is None
    cache.put("e1", "s1", "variant-a")
    assert cache.get("e1", "s1") == "variant-a"
    assert cache.get("e1", "s2") is None
    assert cache.get("e2", "s1") is None  # same subject, other experiment
    assert len(cache) == 1
    assert cache.capacity == 10


def test_evicts_least_recently_used() -> None:
    cache: StickyCache[int] = StickyCache(3)
    for i in range(3):
        cache.put("e", f"s{i}", i)
    assert cache.get("e", "s0") == 0  # s0 becomes most recent; s1 is now the oldest
    cache.put("e", "s3", 3)
    assert cache.get("e", "s1") is None
    assert [cache.get("e", s) for s in ("s0", "s2", "s3")] == [0, 2, 3]
    assert len(cache) == 3


def test_put_refreshes_recency_and_replaces() -> None:
    cache: StickyCache[int] = StickyCache(2)
    cache.put("e", "a", 1)
    cache.put("e", "b", 2)
    cache.put("e", "a", 10)  # a is now the most recent
    cache.put("e", "c", 3)  # evicts b
    assert cache.get("e", "a") == 10
    assert cache.get("e", "b") is None
    assert cache.get("e", "c") == 3


def test_capacity_one() -> None:
    cache: StickyCache[int] = StickyCache(1)
    cache.put("e", "a", 1)
    cache.put("e", "b", 2)
    assert cache.get("e", "a") is None
    assert cache.get("e", "b") == 2
    assert len(cache) == 1


@pytest.mark.parametrize("capacity", [0, -5])
def test_rejects_non_positive_capacity(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity"):
        StickyCache[int](capacity)


def test_invalidate_experiment_forgets_only_that_experiment() -> None:
    cache: StickyCache[str] = StickyCache(100)
    for i in range(10):
        cache.put("deleted", f"s{i}", "x")
        cache.put("kept", f"s{i}", "y")
    cache.invalidate_experiment("deleted")
    assert all(cache.get("deleted", f"s{i}") is None for i in range(10))
    assert all(cache.get("kept", f"s{i}") == "y" for i in range(10))
    assert len(cache) == 10  # stale entries were dropped as they were read


def test_put_after_invalidate_is_served() -> None:
    cache: StickyCache[str] = StickyCache(10)
    cache.put("e", "s", "old")
    cache.invalidate_experiment("e")
    cache.put("e", "s", "new")
    assert cache.get("e", "s") == "new"
    cache.invalidate_experiment("e")
    cache.invalidate_experiment("e")
    assert cache.get("e", "s") is None
    cache.invalidate_experiment("never-seen")  # harmless


def test_stale_entries_age_out() -> None:
    cache: StickyCache[int] = StickyCache(5)
    for i in range(5):
        cache.put("gone", f"s{i}", i)
    cache.invalidate_experiment("gone")
    for i in range(5):
        cache.put("live", f"s{i}", i)
    assert len(cache) == 5
    assert all(cache.get("live", f"s{i}") == i for i in range(5))


def test_hit_and_miss_counters_and_clear() -> None:
    cache: StickyCache[int] = StickyCache(10)
    cache.get("e", "s")
    cache.put("e", "s", 1)
    cache.get("e", "s")
    cache.get("e", "s")
    cache.invalidate_experiment("e")
    cache.get("e", "s")
    assert (cache.hits, cache.misses) == (2, 2)
    cache.put("e", "t", 2)
    cache.clear()
    assert len(cache) == 0
    assert (cache.hits, cache.misses) == (0, 0)
    assert cache.get("e", "t") is None


def test_matches_reference_lru_under_random_workload() -> None:
    # Model check against a straightforward OrderedDict LRU.
    rng = random.Random(7)
    capacity = 50
    cache: StickyCache[int] = StickyCache(capacity)
    model: OrderedDict[tuple[str, str], int] = OrderedDict()
    for step in range(20_000):
        key = (f"e{rng.randrange(4)}", f"s{rng.randrange(40)}")
        if rng.random() < 0.5:
            expected = model.get(key)
            if expected is not None:
                model.move_to_end(key)
            assert cache.get(*key) == expected, step
        else:
            model[key] = step
            model.move_to_end(key)
            if len(model) > capacity:
                model.popitem(last=False)
            cache.put(*key, step)
        assert len(cache) == len(model)


def test_invalidation_under_random_workload() -> None:
    # Whatever stale entries linger, a get never returns a value put before the last
    # invalidation of its experiment, and a hit is always the latest value put.
    rng = random.Random(11)
    cache: StickyCache[int] = StickyCache(30)
    latest: dict[tuple[str, str], int] = {}
    for step in range(20_000):
        exp = f"e{rng.randrange(3)}"
        key = (exp, f"s{rng.randrange(30)}")
        op = rng.random()
        if op < 0.5:
            got = cache.get(*key)
            assert got is None or got == latest.get(key), step
        elif op < 0.98:
            cache.put(*key, step)
            latest[key] = step
        else:
            cache.invalidate_experiment(exp)
            for k in [k for k in latest if k[0] == exp]:
                del latest[k]
        assert len(cache) <= cache.capacity
