"""`sira-server --role serve` leaves the write-behind to `sira-server --role flusher`.

A serving process that does not flush appends every acknowledged decision to its
experiment's stream and writes nothing to Postgres; a separate flusher process (no
gRPC) drains the streams, exactly once, and drains what is left when stopped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis
from fault_stores import own_redis_server
from server_fixtures import (
    TEST_JWT_SECRET,
    create_migrated_database,
    drop_database,
    mint_test_token,
    run_sira_server,
)

from sira.experiments.v1 import assignment_service_pb2 as apb
from sira.experiments.v1 import assignment_service_pb2_grpc, lifecycle_service_pb2_grpc
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import lifecycle_service_pb2 as lpb
from sira_server.flusher_process import READY_LINE
from sira_server.store.hot_keys import experiment_keys
from sira_server.store.roles import as_role

pytestmark = pytest.mark.slow

SUBJECTS = 40
WAIT_SECONDS = 60.0


@pytest.fixture
async def database(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_flusher_role")
    try:
        yield url
    finally:
        await drop_database(postgres_server_dsn, url)


def _start_flusher(database_url: str, redis_url: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SIRA_DATABASE_URL": database_url,
        "SIRA_REDIS_URL": redis_url,
        "SIRA_JWT_SECRET": TEST_JWT_SECRET,
        "SIRA_METRICS_PORT": "0",
        "SIRA_SHUTDOWN_GRACE_SECONDS": "5",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sira_server", "--role", "flusher"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + WAIT_SECONDS
    while READY_LINE not in log_path.read_text():
        assert process.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, "flusher not ready"
        time.sleep(0.05)
    assert "dashboard" not in log_path.read_text()  # a flusher serves no HTTP either
    return process


async def _rows(database_url: str, experiment_id: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM experiment_assignments WHERE experiment_id = $1",
            experiment_id,
        )
        return count
    finally:
        await conn.close()


async def test_serving_process_leaves_the_write_behind_to_a_flusher_process(
    database: str, tmp_path: Path, unique_key: str
) -> None:
    app_url = as_role(database)
    with (
        own_redis_server() as redis_url,
        run_sira_server(app_url, redis_url, tmp_path / "serve", {"SIRA_ROLE": "serve"}) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        admin = (("authorization", f"Bearer {mint_test_token('ops_admin')}"),)
        pay = (("authorization", f"Bearer {mint_test_token('pay_module')}"),)
        lifecycle = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
        experiment = epb.Experiment(key=unique_key, name="Flusher role")
        experiment.variants.add(key="a", name="A", is_control=True)
        experiment.variants.add(key="b", name="B")
        created = lifecycle.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=experiment), metadata=admin
        ).experiment
        lifecycle.StartExperiment(lpb.StartExperimentRequest(experiment=unique_key), metadata=admin)
        assign = assignment_service_pb2_grpc.AssignmentServiceStub(channel)
        for i in range(SUBJECTS):
            assign.Assign(
                apb.AssignRequest(experiment=unique_key, subject_id=f"s-{i}"), metadata=pay
            )

        # The serving process acknowledged them all and wrote none to Postgres.
        stream = experiment_keys(created.id).wb
        client = redis.Redis.from_url(redis_url)
        assert client.xlen(stream) == SUBJECTS
        assert await _rows(database, created.id) == 0

        process = _start_flusher(app_url, redis_url, tmp_path / "flusher.log")
        try:
            deadline = time.monotonic() + WAIT_SECONDS
            while await _rows(database, created.id) < SUBJECTS:
                assert time.monotonic() < deadline, "flusher did not write the assignments"
                await asyncio.sleep(0.1)
            for i in range(SUBJECTS, SUBJECTS + 5):  # written while the flusher runs
                assign.Assign(
                    apb.AssignRequest(experiment=unique_key, subject_id=f"s-{i}"), metadata=pay
                )
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(WAIT_SECONDS) == 0, (tmp_path / "flusher.log").read_text()

        # Stopped with SIGTERM, it drained the rest: every record exactly once.
        assert await _rows(database, created.id) == SUBJECTS + 5
        assert client.xlen(stream) == 0
        client.close()


def test_the_flusher_role_needs_external_stores(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SIRA_DATABASE_URL", "SIRA_REDIS_URL")}
    done = subprocess.run(
        [sys.executable, "-m", "sira_server", "--role", "flusher", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode != 0
    assert "--role flusher needs SIRA_DATABASE_URL and SIRA_REDIS_URL" in done.stderr
