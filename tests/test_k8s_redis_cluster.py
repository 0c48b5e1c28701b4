"""k8s/redis-cluster.yaml's create script, run for real: six local cluster-enabled
redis-servers become 3 masters + 3 replicas, and running it again changes nothing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fault_stores import RedisServer

K8S = Path(__file__).resolve().parents[1] / "k8s"
pytestmark = pytest.mark.skipif(
    shutil.which("redis-cli") is None or shutil.which("getent") is None,
    reason="needs redis-cli and getent",
)


def _config_map() -> dict[str, str]:
    (config_map,) = [
        doc
        for doc in yaml.safe_load_all((K8S / "redis-cluster.yaml").read_text())
        if doc and doc["kind"] == "ConfigMap"
    ]
    data: dict[str, str] = config_map["data"]
    return data


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(1000):
        with socket.socket() as client, socket.socket() as bus:
            client.bind(("127.0.0.1", 0))
            port: int = client.getsockname()[1]
            if port + 10000 > 65535:
                continue
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture
def six_nodes() -> Iterator[list[RedisServer]]:
    root = Path(tempfile.mkdtemp(prefix="sira-k8s-cluster-"))
    nodes = [RedisServer(root / f"n{i}") for i in range(6)]
    try:
        for node in nodes:
            node.port = _cluster_port()
            node.start(
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node.data_dir / "nodes.conf"),
                "--cluster-node-timeout", "5000",
            )  # fmt: skip
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


def _create(script: Path, nodes: list[RedisServer]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(script)],
        env={"PATH": "/usr/bin:/bin", "NODES": " ".join(f"localhost:{n.port}" for n in nodes)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_create_job_forms_the_cluster_once(
    six_nodes: list[RedisServer], tmp_path: Path
) -> None:
    script = tmp_path / "create.sh"
    script.write_text(_config_map()["create.sh"])

    first = _create(script, six_nodes)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Redis Cluster formed" in first.stdout
    client = six_nodes[0].client()
    try:
        info = client.execute_command("CLUSTER", "INFO")
        info = info.decode() if isinstance(info, bytes) else str(info)
        assert "cluster_state:ok" in info
        roles = [n.client().execute_command("ROLE")[0] for n in six_nodes]
        assert sorted(r.decode() if isinstance(r, bytes) else r for r in roles) == (
            ["master"] * 3 + ["slave"] * 3
        )
    finally:
        client.close()

    again = _create(script, six_nodes)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already formed" in again.stdout


def test_the_redis_config_is_durable_and_clustered() -> None:
    conf = _config_map()["redis.conf"]
    for line in ("cluster-enabled yes", "appendonly yes", "appendfsync always"):
        assert line in conf.splitlines()
