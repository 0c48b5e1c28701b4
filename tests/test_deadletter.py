"""Dead letters are visible and recoverable: a real schema drift makes Postgres reject an
acknowledged event; it is counted, logged once, shown by health, the gauge and
`sira-server deadletter list`, and written by `sira-server deadletter replay` once the
drift is fixed."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from fault_stores import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_fixtures import (
    create_migrated_database,
    drop_database,
    mint_test_token,
    run_sira_server,
)
from store_helpers import create_experiment, event

from sira.experiments.v1 import (
    assignment_service_pb2,
    assignment_service_pb2_grpc,
    experiment_pb2,
    lifecycle_service_pb2,
    lifecycle_service_pb2_grpc,
    tracking_service_pb2,
    tracking_service_pb2_grpc,
)
from sira_server.cli import main
from sira_server.metrics import Metrics
from sira_server.store.deadletter import count_dead_letters
from sira_server.store.flusher import WriteBehindFlusher
from sira_server.store.hot_state import HotLayout, HotState
from sira_server.store.roles import as_role

DRIFT = "ALTER TABLE experiment_metrics ADD CONSTRAINT drift_small_values CHECK (value < 100)"
UNDRIFT = "ALTER TABLE experiment_metrics DROP CONSTRAINT drift_small_values"


async def _cli(*argv: str) -> int:
    # The CLI runs its own event loop: give it a thread, as a shell would a process.
    return await asyncio.to_thread(main, list(argv))


@pytest.mark.parametrize("shards", [1, 8])  # with 8, in the dead stream of s0's shard
async def test_a_rejected_record_is_counted_logged_once_listed_and_replayed(
    shards: int,
    migrated_pool: asyncpg.Pool,
    database_url: str,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    layout = HotLayout(shards)
    hot = HotState(redis, migrated_pool, layout=layout)
    try:
        experiment_id, variants = await create_experiment(migrated_pool)
        await hot.init_experiment(experiment_id, variants, "conversion")
        for n in range(3):
            await hot.assign(experiment_id, f"s{n}", variants[0], 0.5)
        await migrated_pool.execute(DRIFT)
        await hot.track(experiment_id, event("s0", variants[0], value=500.0, currency="XOF"))
        await hot.track(experiment_id, event("s1", variants[0], value=5.0, currency="XOF"))
        before = await hot.counters(experiment_id)

        metrics = Metrics()
        flusher = WriteBehindFlusher(
            redis, migrated_pool, "t", on_flush=metrics.record_flush, layout=layout
        )
        with caplog.at_level(logging.ERROR, logger="sira_server.store.flusher"):
            stats = await flusher.drain(timeout=30)
            await flusher.drain(timeout=30)  # nothing new: no second log line
        assert stats.dead_lettered == 1
        assert (
            metrics.registry.get_sample_value("sira_write_behind_dead_lettered_entries_total") == 1
        )
        logged = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
        assert len(logged) == 1
        assert "drift_small_values" in logged[0]
        assert await count_dead_letters(redis) == {experiment_id: 1}
        assert await migrated_pool.fetchval("SELECT count(*) FROM experiment_metrics") == 1

        urls = ("--database-url", database_url, "--redis-url", redis_url)
        assert await _cli("deadletter", "list", "--json", *urls) == 0
        (letter,) = json.loads(capsys.readouterr().out)["dead_letters"]
        assert (letter["experiment_id"], letter["kind"], letter["subject_id"]) == (
            experiment_id,
            "metric",
            "s0",
        )
        assert "drift_small_values" in letter["reason"]

        # Still drifted: the replay says why and keeps the record.
        assert await _cli("deadletter", "replay", "--json", *urls) == 1
        report = json.loads(capsys.readouterr().out)
        assert list(report["still_rejected"]) == [letter["id"]]
        assert "drift_small_values" in report["still_rejected"][letter["id"]]
        assert await count_dead_letters(redis) == {experiment_id: 1}

        await migrated_pool.execute(UNDRIFT)
        # --id picks entries: another id leaves this one parked.
        assert await _cli("deadletter", "replay", "--id", "1-1", *urls) == 0
        assert await count_dead_letters(redis) == {experiment_id: 1}
        capsys.readouterr()
        assert await _cli("deadletter", "replay", f"exp-{experiment_id[:8]}", *urls) == 0
        assert "1 written" in capsys.readouterr().out
        assert await count_dead_letters(redis) == {experiment_id: 0}
        assert await migrated_pool.fetchval("SELECT count(*) FROM experiment_metrics") == 2
        # Counted once, when it was acknowledged: the replay changes no counter.
        assert await hot.counters(experiment_id) == before
        assert await _cli("deadletter", "list", *urls) == 0
        assert "no dead letters" in capsys.readouterr().out
        # A second replay has nothing to do and doubles nothing.
        assert await _cli("deadletter", "replay", *urls) == 0
        assert await migrated_pool.fetchval("SELECT count(*) FROM experiment_metrics") == 2
    finally:
        await hot.close()
        await redis.aclose()


def test_deadletter_without_urls_says_what_to_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deadletter", "list", "--database-url", "", "--redis-url", ""]) == 2
    assert "SIRA_REDIS_URL" in capsys.readouterr().err


def test_deadletter_of_an_unknown_experiment_is_one_line(
    database_url: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    urls = ["--database-url", database_url, "--redis-url", redis_url]
    assert main(["deadletter", "replay", "no-such", *urls]) == 1
    assert capsys.readouterr().err.strip() == "error: NOT_FOUND: experiment 'no-such' not found"


# --- the server: health and metrics say so -------------------------------------------


@pytest.fixture
async def drift_database_url(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_drift")
    yield url
    await drop_database(postgres_server_dsn, url)


def _write_behind_health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service="write-behind")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_the_server_reports_dead_letters_until_they_are_replayed(
    drift_database_url: str, redis_url: str
) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="sira-drift-"))
    metrics_port = free_port()
    app_url = as_role(drift_database_url)
    env = {"SIRA_METRICS_PORT": str(metrics_port)}
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        with run_sira_server(app_url, redis_url, data_dir, extra_env=env) as server:
            assert _write_behind_health(server.address) == serving
            experiment_id = _assign_then_track(server.address, None)
            _wait_for(  # the assignment reaches Postgres before the drift
                lambda: (
                    _sql(drift_database_url, "SELECT count(*) FROM experiment_assignments") == 1
                ),
                "the assignment row",
            )
            _sql(drift_database_url, DRIFT)
            _assign_then_track(server.address, experiment_id)
            _wait_for(
                lambda: _write_behind_health(server.address) != serving,
                "health write-behind NOT_SERVING",
            )
            scraped = _scrape(metrics_port)
            gauge = f'sira_write_behind_dead_letters{{experiment_id="{experiment_id}"}} 1.0'
            assert gauge in scraped
            assert "sira_write_behind_dead_lettered_entries_total 1.0" in scraped
            assert server.log().count("dead-lettered") == 1
            assert server.log().count("parked as dead letters") == 1

            _sql(drift_database_url, UNDRIFT)
            replay = subprocess.run(
                [sys.executable, "-m", "sira_server", "deadletter", "replay"],
                # The app role may replay: it only inserts rows.
                env={**server.env, "SIRA_DATABASE_URL": app_url, "SIRA_REDIS_URL": redis_url},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert replay.returncode == 0, replay.stderr
            _wait_for(
                lambda: _write_behind_health(server.address) == serving,
                "health write-behind SERVING again",
            )
            assert _sql(drift_database_url, "SELECT count(*) FROM experiment_metrics") == 1
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _sql(database_url: str, sql: str) -> object:
    """One statement as the owner (the test plays the DBA); its first value."""

    async def run() -> object:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _assign_then_track(address: str, experiment_id: str | None) -> str:
    """First call: create, start, assign. Second: a conversion of 500 (the drift refuses it)."""
    admin = (("authorization", f"Bearer {mint_test_token('ops_admin')}"),)
    pay = (("authorization", f"Bearer {mint_test_token('pay_module')}"),)
    with grpc.insecure_channel(address) as channel:
        if experiment_id is None:
            lifecycle = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
            experiment = experiment_pb2.Experiment(key="drift", name="Drift")
            experiment.variants.add(key="a", name="A", is_control=True)
            experiment.variants.add(key="b", name="B")
            created = lifecycle.CreateExperiment(
                lifecycle_service_pb2.CreateExperimentRequest(experiment=experiment),
                metadata=admin,
            ).experiment
            lifecycle.StartExperiment(
                lifecycle_service_pb2.StartExperimentRequest(experiment="drift"), metadata=admin
            )
            assignment_service_pb2_grpc.AssignmentServiceStub(channel).Assign(
                assignment_service_pb2.AssignRequest(experiment="drift", subject_id="s"),
                metadata=pay,
            )
            return str(created.id)
        assignment = assignment_service_pb2_grpc.AssignmentServiceStub(channel).Assign(
            assignment_service_pb2.AssignRequest(experiment="drift", subject_id="s"),
            metadata=pay,
        )
        tracking_service_pb2_grpc.TrackingServiceStub(channel).Track(
            tracking_service_pb2.TrackRequest(
                event=tracking_service_pb2.TrackedEvent(
                    experiment="drift",
                    subject_id="s",
                    variant_id=assignment.decision.variant.id,
                    event_type=tracking_service_pb2.EVENT_TYPE_CONVERSION,
                    value=500.0,
                    currency="XOF",
                    client_event_id="order-1",
                )
            ),
            metadata=pay,
        )
        return experiment_id
