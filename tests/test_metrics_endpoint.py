"""The Prometheus endpoint of a real `sira-server`: the seed's metrics and ours, after traffic.

A server of its own (fresh database, its own Redis database index), so every
counter and gauge can be compared with exact numbers.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from fault_stores import free_port
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import (
    create_migrated_database,
    drop_database,
    mint_test_token,
    redis_url_with_db,
    run_sira_server,
)

from sira import AsyncClient, NotFoundError, PermissionDeniedError, tracked_event
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import tracking_service_pb2 as tpb

pytestmark = pytest.mark.slow

REDIS_DB = 7
POLL_DEADLINE_SECONDS = 30.0
"""Gauges are refreshed every few seconds (catalog version check, backlog)."""
ASSIGN = "/sira.experiments.v1.AssignmentService/Assign"
TRACK = "/sira.experiments.v1.TrackingService/Track"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def database(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_metrics")
    try:
        yield url
    finally:
        await drop_database(postgres_server_dsn, url)


@pytest.fixture
async def redis_url(server_redis_url: str) -> AsyncIterator[str]:
    """A Redis database index of this file's own, emptied before and after."""
    url = redis_url_with_db(server_redis_url, REDIS_DB)
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
        yield url
        await client.flushdb()
    finally:
        await client.aclose()


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def variant(name: str, control: bool = False) -> epb.Variant:
    return epb.Variant(name=name, is_control=control)


async def test_metrics_after_traffic(database: str, redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {"SIRA_METRICS_PORT": str(port), "SIRA_GRPC_HOST": "127.0.0.1"}
    with run_sira_server(database, redis_url, tmp_path, extra_env=env) as server:
        admin = AsyncClient(server.address, token=mint_test_token("ops_admin"))
        pay = AsyncClient(server.address, token=mint_test_token("pay_module"))
        science = AsyncClient(server.address, token=mint_test_token("data_science"))
        try:
            key = f"m-{uuid.uuid4().hex[:8]}"
            specs = [
                epb.Experiment(
                    key=f"{key}-{n}", name=n, variants=[variant("A", True), variant("B")]
                )
                for n in ("run", "stop", "draft")
            ]
            running, stopped, _draft = [await admin.create_experiment(s) for s in specs]
            await admin.start_experiment(running.id)
            await admin.start_experiment(stopped.id)
            await admin.stop_experiment(stopped.id)

            decisions = [await pay.assign(running.key, f"s{i}") for i in range(5)]
            await pay.assign(running.key, "s0")  # sticky: a decision, no new assignment
            await pay.assign(stopped.key, "s0")  # concluded: a decision, no assignment
            with pytest.raises(NotFoundError):
                await pay.assign(f"{key}-missing", "s0")
            with pytest.raises(PermissionDeniedError):
                await science.assign(running.key, "s0")
            for i, decision in enumerate(decisions[:3]):
                conversion = tracked_event(
                    experiment=running.key,
                    subject_id=f"s{i}",
                    variant_id=decision.variant.id,
                    client_event_id=f"conv-{i}",
                )
                assert (await pay.track(conversion)).outcome == tpb.TRACK_OUTCOME_ACCEPTED
            assert (await pay.track(conversion)).outcome == tpb.TRACK_OUTCOME_DUPLICATE
            churn = tracked_event(
                experiment=running.key,
                subject_id="s4",
                variant_id=decisions[4].variant.id,
                event_type="churn",
            )
            assert (await pay.track(churn)).outcome == tpb.TRACK_OUTCOME_ACCEPTED
        finally:
            for client in (admin, pay, science):
                await client.close()

        expected: dict[tuple[str, frozenset[tuple[str, str]]], float] = {
            ("experiments_total", frozenset({("status", "running")})): 1,
            ("experiments_total", frozenset({("status", "stopped")})): 1,
            ("experiments_total", frozenset({("status", "draft")})): 1,
            ("experiment_assignments_total", frozenset({("experiment_id", running.id)})): 5,
            (
                "experiment_metrics_total",
                frozenset({("experiment_id", running.id), ("event_type", "conversion")}),
            ): 3,
            (
                "experiment_metrics_total",
                frozenset({("experiment_id", running.id), ("event_type", "churn")}),
            ): 1,
            ("sira_decisions_latency_seconds_count", frozenset()): 7,
            ("sira_write_behind_pending_entries", frozenset({("experiment_id", running.id)})): 0,
            ("sira_rpc_total", frozenset({("method", ASSIGN), ("code", "OK")})): 7,
            ("sira_rpc_total", frozenset({("method", ASSIGN), ("code", "NOT_FOUND")})): 1,
            ("sira_rpc_total", frozenset({("method", ASSIGN), ("code", "PERMISSION_DENIED")})): 1,
            ("sira_rpc_total", frozenset({("method", TRACK), ("code", "OK")})): 5,
        }
        deadline = time.monotonic() + POLL_DEADLINE_SECONDS
        while True:
            samples = await asyncio.to_thread(scrape, port)
            seen = {name: samples.get(name) for name in expected}
            flushed = value(samples, "sira_write_behind_flush_seconds_count") or 0
            if (seen == expected and flushed >= 1) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert seen == expected
        assert flushed >= 1, "a write-behind batch was timed"
        buckets = [
            labels for name, labels in samples if name == "sira_decisions_latency_seconds_bucket"
        ]
        assert frozenset({("le", "+Inf")}) in buckets
        assert len(buckets) >= 10
        inf = value(samples, "sira_decisions_latency_seconds_bucket", le="+Inf")
        assert inf == 7
        assert value(samples, "sira_write_behind_flush_seconds_bucket", le="+Inf") == flushed
