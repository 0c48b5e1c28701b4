"""The server as a process: health, reflection, graceful shutdown, the embedded default."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from server_fixtures import RunningServer, run_sira_server

FOUR_SERVICES = {
    "sira.experiments.v1.LifecycleService",
    "sira.experiments.v1.AssignmentService",
    "sira.experiments.v1.TrackingService",
    "sira.experiments.v1.InsightsService",
}
REPO = Path(__file__).resolve().parents[1]


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_is_serving_without_a_token(sira_server: RunningServer) -> None:
    assert health_status(sira_server.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(sira_server.address, "liveness") == health_pb2.HealthCheckResponse.SERVING
    for service in FOUR_SERVICES:
        assert health_status(sira_server.address, service) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_four_services_without_a_token(sira_server: RunningServer) -> None:
    with grpc.insecure_channel(sira_server.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert services >= FOUR_SERVICES | {"grpc.health.v1.Health"}
        # grpcurl describes methods through the same file descriptors.
        db = ProtoReflectionDescriptorDatabase(channel)
        proto = db.FindFileContainingSymbol("sira.experiments.v1.AssignmentService")
        assert proto.name == "sira/experiments/v1/assignment_service.proto"


@pytest.fixture
def own_server(sira_server_database_url: str, server_redis_url: str) -> Iterator[RunningServer]:
    from server_fixtures import redis_url_with_db

    data_dir = Path(tempfile.mkdtemp(prefix="sira-own-"))
    try:
        with run_sira_server(
            sira_server_database_url, redis_url_with_db(server_redis_url, 12), data_dir
        ) as server:
            yield server
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_sigterm_drains_and_exits_cleanly(own_server: RunningServer) -> None:
    assert health_status(own_server.address) == health_pb2.HealthCheckResponse.SERVING
    assert own_server.stop(signal.SIGTERM) == 0
    log = own_server.log()
    assert "shutting down" in log
    assert "Traceback" not in log


@contextmanager
def embedded_server(data_dir: Path, env: dict[str, str]) -> Iterator[RunningServer]:
    """`run_sira_server` without URLs or secret: the embedded default."""
    with run_sira_server("", "", data_dir, extra_env={**env, "SIRA_JWT_SECRET": ""}) as server:
        yield server


def run(
    cmd: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_embedded_default_end_to_end_through_the_cli() -> None:
    """No database or Redis URL: the server starts real embedded ones in its data dir,
    the CLI mints a dev token from that dir, and a restart keeps the data."""
    # Not under pytest's tmp_path: as root, pgserver runs Postgres as another user, and
    # pytest resets its temp root to 0700 at the next session.
    data_dir = Path(tempfile.mkdtemp(prefix="sira-embedded-e2e-"))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SIRA_DATABASE_URL", "SIRA_REDIS_URL", "SIRA_JWT_SECRET", "SIRA_TOKEN")
    }
    env.update({"SIRA_DATA_DIR": str(data_dir), "SIRA_METRICS_PORT": "0"})
    sira = [sys.executable, "-m", "sira.cli"]
    operator = [sys.executable, "-m", "sira_server"]
    try:
        with embedded_server(data_dir, env) as server:
            env["SIRA_ADDRESS"] = server.address
            token = run([*operator, "token", "--role", "ops_admin", "--subject", "alice"], env)
            assert token.returncode == 0, token.stderr
            env["SIRA_TOKEN"] = token.stdout.strip()
            created = run(
                [*sira, "--json", "create", str(REPO / "docs/examples/checkout-button-color.json")],
                env,
            )
            assert created.returncode == 0, created.stderr
            key = json.loads(created.stdout)["key"]
            assert run([*sira, "start", key], env).returncode == 0
        with embedded_server(data_dir, env) as server:
            env["SIRA_ADDRESS"] = server.address
            shown = run([*sira, "--json", "show", key], env)
            assert shown.returncode == 0, shown.stderr
            assert json.loads(shown.stdout)["status"] == "EXPERIMENT_STATUS_RUNNING"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_workers_share_the_port_and_stop_together(
    sira_server_database_url: str, server_redis_url: str
) -> None:
    from server_fixtures import redis_url_with_db

    data_dir = Path(tempfile.mkdtemp(prefix="sira-workers-"))
    try:
        with run_sira_server(
            sira_server_database_url,
            redis_url_with_db(server_redis_url, 12),
            data_dir,
            extra_env={"SIRA_WORKERS": "2"},
        ) as server:
            # Connections are spread by the kernel; every one of them is served.
            for _ in range(6):
                assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
            assert server.stop(signal.SIGTERM) == 0
            assert server.log().count("shutting down") == 2
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
