"""Settings come from the environment once, with clear errors naming the variable."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import uvloop

from sira_server.config import ConfigError, ReplicaWait, Settings
from sira_server.launcher import run_loop


def test_defaults_are_the_embedded_development_setup() -> None:
    s = Settings.from_env({})
    assert s.embedded
    assert (s.grpc_port, s.metrics_port, s.data_dir) == (50051, 9464, Path(".sira"))
    assert s.jwt.algorithm == "HS256"
    assert s.jwt.secret is None
    assert (s.http.host, s.http.port, s.http.cors_origins) == ("127.0.0.1", 8051, ())
    assert not s.http.dev_sign_in  # decided by the launcher, never by the environment


@pytest.mark.parametrize(
    ("raw", "port"), [("off", None), ("OFF", None), ("0", 0), ("9000", 9000), ("", 8051)]
)
def test_the_http_port_can_be_any_free_one_or_off(raw: str, port: int | None) -> None:
    assert Settings.from_env({"SIRA_HTTP_PORT": raw}).http.port == port


def test_cors_origins_are_exact_origins() -> None:
    s = Settings.from_env(
        {"SIRA_HTTP_CORS_ORIGINS": " https://ops.example.com/ , http://localhost:5173"}
    )
    assert s.http.cors_origins == ("https://ops.example.com", "http://localhost:5173")


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
        ({"SIRA_HTTP_PORT": "eighty"}, "SIRA_HTTP_PORT"),
        ({"SIRA_HTTP_PORT": "70000"}, "SIRA_HTTP_PORT"),
        ({"SIRA_HTTP_CORS_ORIGINS": "*"}, "SIRA_HTTP_CORS_ORIGINS"),
        ({"SIRA_HTTP_CORS_ORIGINS": "https://*.example.com"}, "SIRA_HTTP_CORS_ORIGINS"),
        ({"SIRA_HTTP_CORS_ORIGINS": "https://ops.example.com/app"}, "SIRA_HTTP_CORS_ORIGINS"),
        ({"SIRA_HTTP_CORS_ORIGINS": "ops.example.com"}, "SIRA_HTTP_CORS_ORIGINS"),
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


@pytest.mark.parametrize(("raw", "on_uvloop"), [("", True), ("asyncio", False)])
def test_the_server_runs_on_uvloop_unless_told(raw: str, on_uvloop: bool) -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        seen.append(asyncio.get_running_loop())

    run_loop(Settings.from_env({"SIRA_EVENT_LOOP": raw}), main())
    assert isinstance(seen[0], uvloop.Loop) is on_uvloop
    assert isinstance(seen[0], asyncio.BaseEventLoop) is not on_uvloop


def test_an_unknown_event_loop_is_refused() -> None:
    with pytest.raises(ConfigError, match="SIRA_EVENT_LOOP must be uvloop or asyncio"):
        Settings.from_env({"SIRA_EVENT_LOOP": "trio"})


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
