"""`make capacity` (sira_loadtest.capacity), small: the real server, redis-server and
Postgres, a few calls per workload; the per-call facts that do not depend on speed."""

from __future__ import annotations

import shutil

import pytest

from sira_loadtest.capacity import measure, render

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]


async def test_capacity_measures_every_workload_per_call(postgres_server_dsn: str) -> None:
    result = await measure(postgres_server_dsn, calls=80, concurrency=4, subjects=20)
    workloads = {w["name"]: w for w in result["workloads"]}  # type: ignore[attr-defined]
    assert list(workloads) == [
        "Assign, new subject",
        "Assign, returning, not cached in this process",
        "Assign, returning, cached in this process",
        "Track, new conversion",
    ]
    assert all(w["calls"] == 80 for w in workloads.values())
    new = workloads["Assign, new subject"]
    assert new["postgres_rows"] == 1.0  # one assignment row per new subject
    assert new["redis_commands"] >= 1.0  # at least the script's EVALSHA
    assert new["commands"]["evalsha"] >= 1.0
    assert new["redis_memory_bytes"] > 0  # the assignment stays in Redis
    uncached = workloads["Assign, returning, not cached in this process"]
    assert uncached["postgres_rows"] == 0.0
    assert uncached["commands"]["evalsha"] >= 1.0  # one read-only script run
    cached = workloads["Assign, returning, cached in this process"]
    assert cached["postgres_rows"] == 0.0
    assert cached["commands"].get("evalsha", 0) < 0.5  # answered from the process
    track = workloads["Track, new conversion"]
    # One row per event, plus the subjects the track-heavy scenario pre-assigns.
    assert track["postgres_rows"] == pytest.approx(1 + 20 / 80)
    result["loadavg"] = ["0", "0", "0"]
    table = render(result)
    assert "| Assign, new subject |" in table
