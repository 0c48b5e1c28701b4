"""Settings come from the environment once, with clear errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from sira_server.config import ConfigError, ReplicaWait, Settings


def test_defaults_are_the_embedded_development_setup() -> None:
    s = Settings.from_env({})
    assert s.embedded
    assert (s.grpc_port, s.metrics_port, s.data_dir) == (50051, 9464, Path(".sira"))
    assert s.jwt.algorithm == "HS256"
    assert s.jwt.secret is None


def test_external_stores_and_jwt_settings_are_read() -> None:
    s = Settings.from_env(
        {
            "SIRA_DATABASE_URL": "postgresql://db/sira",
            "SIRA_REDIS_URL": "redis://cache:6379/0",
            "SIRA_GRPC_PORT": "6000",
            "SIRA_METRICS_PORT": "0",
            "SIRA_JWT_SECRET": "s" * 40,
            "SIRA_JWT_AUDIENCE": "sira",
            "SIRA_JWT_ISSUER": "molam-id",
        }
    )
    assert not s.embedded
    assert s.grpc_port == 6000
    assert s.metrics_port is None
    assert (s.jwt.audience, s.jwt.issuer) == ("sira", "molam-id")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SIRA_GRPC_PORT": "fifty"}, "SIRA_GRPC_PORT"),
        ({"SIRA_WORKERS": "0"}, "SIRA_WORKERS"),
        ({"SIRA_JWT_ALGORITHM": "none"}, "SIRA_JWT_ALGORITHM"),
        ({"SIRA_JWT_ALGORITHM": "RS256"}, "SIRA_JWT_PUBLIC_KEY"),
        ({"SIRA_TLS_CERT_FILE": "/x.pem"}, "SIRA_TLS_KEY_FILE"),
        ({"SIRA_DATABASE_URL": "postgresql://db/sira"}, "SIRA_REDIS_URL"),
        ({"SIRA_JWT_PUBLIC_KEY_FILE": "/nonexistent.pem"}, "SIRA_JWT_PUBLIC_KEY_FILE"),
        ({"SIRA_SHUTDOWN_GRACE_SECONDS": "soon"}, "SIRA_SHUTDOWN_GRACE_SECONDS"),
        # A cluster is never embedded: it needs the URL of one of its nodes.
        ({"SIRA_REDIS_CLUSTER": "1"}, "SIRA_REDIS_URL"),
        ({"SIRA_REDIS_CLUSTER": "maybe"}, "SIRA_REDIS_CLUSTER"),
        ({"SIRA_REDIS_WAIT_REPLICAS": "-1"}, "SIRA_REDIS_WAIT_REPLICAS"),
        ({"SIRA_REDIS_WAIT_TIMEOUT_MS": "0"}, "SIRA_REDIS_WAIT_TIMEOUT_MS"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


def test_script_transport_is_the_channel_unless_told() -> None:
    assert Settings.from_env({}).script_transport == "channel"
    assert Settings.from_env({"SIRA_SCRIPT_TRANSPORT": "pipeline"}).script_transport == "pipeline"
    with pytest.raises(ConfigError, match="SIRA_SCRIPT_TRANSPORT"):
        Settings.from_env({"SIRA_SCRIPT_TRANSPORT": "carrier-pigeon"})


def test_redis_cluster_and_replica_wait_are_read() -> None:
    external = {"SIRA_DATABASE_URL": "postgresql://db/sira", "SIRA_REDIS_URL": "redis://n1:7000"}
    plain = Settings.from_env(external)
    assert (plain.redis_cluster, plain.replica_wait) == (False, None)
    s = Settings.from_env(
        {
            **external,
            "SIRA_REDIS_CLUSTER": "true",
            "SIRA_REDIS_WAIT_REPLICAS": "1",
            "SIRA_REDIS_WAIT_TIMEOUT_MS": "250",
        }
    )
    assert s.redis_cluster
    assert s.replica_wait == ReplicaWait(replicas=1, timeout_ms=250)
