"""The committed stubs are exactly what `make protos` generates, and import cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sira_server.codegen import REPO_ROOT, generate, generated_files

CLIENT_DIR = REPO_ROOT / "client"


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    fresh = {p.name: p.read_bytes() for p in generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in generated_files(CLIENT_DIR)}
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stubs out of date, run `make protos` and commit: {stale}"


def test_every_service_has_sync_and_aio_stubs_and_servicers() -> None:
    for name in ("lifecycle", "assignment", "tracking", "insights"):
        pyi = (CLIENT_DIR / f"sira/experiments/v1/{name}_service_pb2_grpc.pyi").read_text()
        service = name.capitalize() + "Service"
        assert f"class {service}Stub" in pyi
        assert f"class {service}AsyncStub" in pyi
        assert f"class {service}Servicer" in pyi
    assert (CLIENT_DIR / "sira/py.typed").exists()


def test_stubs_import_without_path_tricks(tmp_path: Path) -> None:
    code = (
        "from sira.experiments.v1 import assignment_service_pb2 as a, "
        "lifecycle_service_pb2_grpc as g; "
        "print(a.AssignRequest(experiment='x').experiment, g.LifecycleServiceStub.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["x", "LifecycleServiceStub"]
