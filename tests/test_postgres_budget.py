"""The Postgres connection budget: what one instance may open (the launcher's log line),
and the Kubernetes manifests added up against the `max_connections` docs/scaling.md
promises, at the HPA's ceiling and during a rolling update."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sira_server.config import ConfigError, Settings
from sira_server.limit_settings import LimitSettings
from sira_server.postgres_budget import PostgresSettings, connection_budget

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCALING = ROOT / "docs" / "scaling.md"

HEADROOM = 25
"""Left for people and tools (psql, monitoring, superuser_reserved_connections = 3),
as docs/scaling.md says."""


def test_one_instance_budget() -> None:
    serve = connection_budget("serve", workers=4, pool_size=10, admin_pool_size=4)
    assert (serve.per_process, serve.total) == (14, 56)
    assert "at most 56 for this instance (4 process(es) x (pool 10 + admin pool 4)" in (
        serve.describe()
    )
    flusher = connection_budget("flusher", workers=4, pool_size=3, admin_pool_size=4)
    assert flusher.total == 3  # one process, no admin pool
    assert "admin" not in flusher.describe()


def test_settings_read_the_pool_size_and_pgbouncer_mode() -> None:
    assert Settings.from_env({}).postgres == PostgresSettings(pool_size=10, pgbouncer=False)
    settings = Settings.from_env({"SIRA_PG_POOL_SIZE": "3", "SIRA_PG_PGBOUNCER": "1"})
    assert settings.postgres == PostgresSettings(pool_size=3, pgbouncer=True)
    assert settings.postgres.pool_options() == {"statement_cache_size": 0}
    assert PostgresSettings().pool_options() == {}
    for bad in ({"SIRA_PG_POOL_SIZE": "0"}, {"SIRA_PG_PGBOUNCER": "yes please"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            Settings.from_env(bad)


def _only(path: str, kind: str) -> dict[str, Any]:
    (resource,) = [
        doc for doc in yaml.safe_load_all((K8S / path).read_text()) if doc and doc["kind"] == kind
    ]
    return resource


def _env(deployment: dict[str, Any]) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _surge(deployment: dict[str, Any], replicas: int) -> int:
    """Extra pods a rolling update may add (Kubernetes' default: 25 %, rounded up)."""
    surge = deployment["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", "25%")
    if isinstance(surge, str):
        return math.ceil(replicas * int(surge.rstrip("%")) / 100)
    return int(surge)


def _pods_and_budget(path: str, max_replicas: int) -> tuple[int, int]:
    """(pods at most, connections per pod) of a Deployment, from its own env."""
    deployment = _only(path, "Deployment")
    env = _env(deployment)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container.get("args", [])
    role = args[args.index("--role") + 1] if "--role" in args else env.get("SIRA_ROLE", "all")
    budget = connection_budget(
        role,
        int(env.get("SIRA_WORKERS", "1")),
        int(env.get("SIRA_PG_POOL_SIZE", PostgresSettings().pool_size)),
        int(env.get("SIRA_ADMIN_POOL_SIZE", LimitSettings().admin_pool_size)),
    )
    return max_replicas + _surge(deployment, max_replicas), budget.total


def manifests_budget() -> int:
    hpa = _only("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "sira"
    serving_pods, per_serving_pod = _pods_and_budget("deployment.yaml", hpa["spec"]["maxReplicas"])
    flusher = _only("flusher.yaml", "Deployment")
    flusher_pods, per_flusher_pod = _pods_and_budget("flusher.yaml", flusher["spec"]["replicas"])
    migrate = _only("migrate-job.yaml", "Job")
    migrations = migrate["spec"].get("parallelism", 1)  # `sira-server migrate`: one each
    return serving_pods * per_serving_pod + flusher_pods * per_flusher_pod + migrations


def test_the_manifests_fit_the_documented_max_connections() -> None:
    total = manifests_budget()
    doc = SCALING.read_text()
    match = re.search(r"`max_connections = (\d+)`", doc)
    assert match, "docs/scaling.md states the max_connections the manifests are sized for"
    max_connections = int(match.group(1))
    assert total + HEADROOM <= max_connections
    # The page's worked sum is this one.
    assert f"**{total}** connections at most" in doc
    assert f"{HEADROOM} of headroom" in doc
