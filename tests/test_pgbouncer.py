"""SIRA through a real PgBouncer in transaction mode (`SIRA_PG_PGBOUNCER=1`).

Transaction pooling hands each transaction whichever server connection is free: a
small PgBouncer pool (2 server connections) under more client connections makes every
session assumption fail. Without the setting the pools cannot even open (PgBouncer
refuses the admin pool's `statement_timeout` startup parameter, and asyncpg's named
prepared statements vanish between transactions); with it, a whole server works:
lifecycle, decisions, tracking, the write-behind flusher's temp tables and COPY, the
autopilot's advisory lock, and the admin pool's statement timeout.

Needs the `pgbouncer` binary (Debian: `apt-get install pgbouncer`; `.ci/run` installs
it); skipped without it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from fault_stores import free_port, own_redis_server
from server_fixtures import (
    create_migrated_database,
    drop_database,
    mint_test_token,
    run_sira_server,
)

from sira.experiments.v1 import assignment_service_pb2 as apb
from sira.experiments.v1 import (
    assignment_service_pb2_grpc,
    insights_service_pb2_grpc,
    lifecycle_service_pb2_grpc,
    tracking_service_pb2_grpc,
)
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import insights_service_pb2 as ipb
from sira.experiments.v1 import lifecycle_service_pb2 as lpb
from sira.experiments.v1 import tracking_service_pb2 as tpb
from sira_server.app import open_stores
from sira_server.config import ConfigError
from sira_server.limit_settings import LimitSettings
from sira_server.postgres_budget import PostgresSettings
from sira_server.store.roles import APP_ROLE, as_role

PGBOUNCER = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")

pytestmark = pytest.mark.skipif(
    PGBOUNCER is None,
    reason="pgbouncer binary not installed (apt-get install pgbouncer; .ci/run installs it)",
)

START_SECONDS = 30.0
WAIT_SECONDS = 60.0
SERVER_CONNECTIONS = 2
"""PgBouncer's server connections per database and user: fewer than the client's."""


def _start_pgbouncer(workdir: Path, postgres_dsn: str) -> tuple[subprocess.Popen[bytes], int]:
    target = urlsplit(postgres_dsn)
    if target.hostname is None:
        pytest.skip("the test Postgres is reached over a unix socket; PgBouncer needs TCP here")
    user = target.username or "postgres"
    users = {user: target.password or "", APP_ROLE: ""}
    (workdir / "users.txt").write_text("".join(f'"{u}" "{p}"\n' for u, p in users.items()))
    port = free_port()
    (workdir / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={target.hostname} port={target.port or 5432}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "users.txt"}
pool_mode = transaction
default_pool_size = {SERVER_CONNECTIONS}
max_client_conn = 200
"""
    )
    # PgBouncer refuses to run as root; it reads its files first, then drops to `-u`.
    as_user = ["-u", "nobody"] if os.geteuid() == 0 else []
    with (workdir / "pgbouncer.log").open("wb") as log:
        process = subprocess.Popen(
            [str(PGBOUNCER), *as_user, str(workdir / "pgbouncer.ini")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_SECONDS
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(
                f"pgbouncer did not start:\n{(workdir / 'pgbouncer.log').read_text()}"
            )
        time.sleep(0.05)


@pytest.fixture
async def database(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_pgbouncer")
    try:
        yield url
    finally:
        await drop_database(postgres_server_dsn, url)


@pytest.fixture
def bouncer(database: str) -> Iterator[str]:
    """The test database as `sira_app`, through PgBouncer (stopped before the drop)."""
    workdir = Path(tempfile.mkdtemp(prefix="sira-pgbouncer-"))
    process, port = _start_pgbouncer(workdir, database)
    try:
        direct = urlsplit(as_role(database))
        yield urlunsplit(direct._replace(netloc=f"{APP_ROLE}@127.0.0.1:{port}"))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


async def test_without_the_setting_the_pools_do_not_open(bouncer: str, redis_url: str) -> None:
    with pytest.raises(ConfigError, match="unsupported startup parameter: statement_timeout"):
        await open_stores(bouncer, redis_url)


async def test_with_the_setting_pools_share_few_server_connections(
    bouncer: str, redis_url: str
) -> None:
    stores = await open_stores(
        bouncer,
        redis_url,
        LimitSettings(admin_statement_timeout_ms=300),
        postgres=PostgresSettings(pool_size=8, pgbouncer=True),
    )
    try:
        pool, admin = stores.pool, stores.admin_pool
        assert admin is not None

        async def one(i: int) -> int:
            async with pool.acquire() as conn, conn.transaction():
                value: int = await conn.fetchval("SELECT $1::int + 1", i)
                return value

        # 8 client connections on 2 server connections: a named statement would be gone.
        assert sum(await asyncio.gather(*(one(i) for i in range(400)))) == sum(range(1, 401))
        # The admin timeout is the client's: the query is cancelled through PgBouncer.
        with pytest.raises(TimeoutError):
            await admin.fetchval("SELECT pg_sleep(10)")
        assert await admin.fetchval("SELECT 1") == 1
    finally:
        await stores.close()


def _auth(role: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_test_token(role)}"),)


def _autopilot_rounds(port: str, outcome: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    prefix = f'sira_autopilot_rounds_total{{outcome="{outcome}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


async def _count(database: str, table: str, experiment_id: str) -> int:
    conn = await asyncpg.connect(database)
    try:
        count: int = await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE experiment_id = $1", experiment_id
        )
        return count
    finally:
        await conn.close()


SUBJECTS = 120
CONVERTING = 30


async def test_a_server_through_pgbouncer_serves_and_flushes(
    bouncer: str, database: str, tmp_path: Path, unique_key: str
) -> None:
    metrics_port = str(free_port())
    env = {"SIRA_PG_PGBOUNCER": "1", "SIRA_PG_POOL_SIZE": "4", "SIRA_METRICS_PORT": metrics_port}
    with (
        own_redis_server() as redis_url,
        run_sira_server(bouncer, redis_url, tmp_path / "server", env) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        assert "Postgres connection budget: at most 8 for this instance" in server.log()
        lifecycle = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
        admin = _auth("ops_admin")
        experiment = epb.Experiment(key=unique_key, name="Through PgBouncer")
        experiment.variants.add(key="a", name="A", is_control=True)
        experiment.variants.add(key="b", name="B")
        created = lifecycle.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=experiment), metadata=admin
        ).experiment
        lifecycle.StartExperiment(lpb.StartExperimentRequest(experiment=unique_key), metadata=admin)

        assign = assignment_service_pb2_grpc.AssignmentServiceStub(channel)
        track = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        pay = _auth("pay_module")
        variants = {}
        for i in range(SUBJECTS):
            request = apb.AssignRequest(experiment=unique_key, subject_id=f"s-{i}")
            variants[f"s-{i}"] = assign.Assign(request, metadata=pay).decision.variant.id
        for i in range(CONVERTING):
            event = tpb.TrackedEvent(
                experiment=unique_key,
                subject_id=f"s-{i}",
                variant_id=variants[f"s-{i}"],
                event_type=tpb.EVENT_TYPE_CONVERSION,
                client_event_id=f"order-{i}",
            )
            assert (
                track.Track(tpb.TrackRequest(event=event), metadata=pay).outcome
                == tpb.TRACK_OUTCOME_ACCEPTED
            )

        # The write-behind flusher commits through PgBouncer: exact rows in Postgres.
        deadline = time.monotonic() + WAIT_SECONDS
        while (
            await _count(database, "experiment_assignments", created.id) != SUBJECTS
            or await _count(database, "experiment_metrics", created.id) != CONVERTING
        ):
            assert time.monotonic() < deadline, "write-behind rows never reached Postgres"
            await asyncio.sleep(0.2)

        results = insights_service_pb2_grpc.InsightsServiceStub(channel).GetResults(
            ipb.GetResultsRequest(experiment=unique_key), metadata=_auth("data_science")
        )
        assert sum(v.assigned_subjects for v in results.variants) == SUBJECTS
        lifecycle.StopExperiment(
            lpb.StopExperimentRequest(experiment=unique_key, winner_variant="a"), metadata=admin
        )
        audit = lifecycle.ListAuditEvents(
            lpb.ListAuditEventsRequest(experiment=unique_key), metadata=admin
        ).events
        assert sorted(e.action for e in audit) == ["created", "started", "stopped"]

        # The autopilot's rounds take their advisory lock through PgBouncer and finish.
        while _autopilot_rounds(metrics_port, "idle") < 2:
            assert time.monotonic() < deadline, "no autopilot round finished"
            await asyncio.sleep(0.2)
        assert "fail-fast round failed" not in server.log()
