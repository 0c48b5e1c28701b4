"""Every manifest in k8s/ is valid against a current Kubernetes API (kubernetes-validate,
strict: unknown fields are errors too), and the serving settings the README promises are
set explicitly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[1] / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
KUBERNETES_VERSION = kubernetes_validate.latest_version()


def _resources(path: Path) -> list[dict[str, object]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_there_are_manifests() -> None:
    assert {p.name for p in MANIFESTS} >= {"deployment.yaml", "service-headless.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_for_a_current_kubernetes(path: Path) -> None:
    resources = _resources(path)
    assert resources, f"{path.name} holds no resource"
    for resource in resources:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_headless_service_lets_clients_balance_over_every_pod() -> None:
    (service,) = _resources(K8S / "service-headless.yaml")
    spec = service["spec"]
    assert isinstance(spec, dict)
    assert spec["clusterIP"] == "None"
    assert spec["selector"] == {"app": "sira"}


def test_the_deployment_listens_on_every_interface_explicitly() -> None:
    (deployment,) = _resources(K8S / "deployment.yaml")
    text = yaml.safe_dump(deployment)
    for name in ("SIRA_GRPC_HOST", "SIRA_METRICS_HOST"):
        assert name in text


def test_the_deployment_says_what_it_does_with_the_dashboard_port() -> None:
    """The HTTP port defaults to 8051 on loopback; in a pod it is set explicitly."""
    (deployment,) = _resources(K8S / "deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SIRA_HTTP_PORT"] == "off"


def test_serving_pods_leave_the_write_behind_to_the_flusher_deployment() -> None:
    def container(path: str) -> dict[str, Any]:
        (deployment,) = _resources(K8S / path)
        return deployment["spec"]["template"]["spec"]["containers"][0]  # type: ignore[index,no-any-return]

    serving = {e["name"]: e.get("value") for e in container("deployment.yaml")["env"]}
    assert serving["SIRA_ROLE"] == "serve"
    assert container("flusher.yaml")["args"] == ["--role", "flusher"]
