"""The server's wheel ships the built dashboard: every file of `web/dist/` is package
data, so an installed `sira-server` (the image, a pip install) serves the page too."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "server" / "sira_server" / "web" / "dist"


@pytest.mark.slow
def test_the_wheel_ships_every_file_of_the_built_dashboard(tmp_path: Path) -> None:
    # Built from a copy: setuptools leaves build/ and egg-info next to the sources.
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".sira")
    for name in ("server", "loadtest"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tmp_path / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
    subprocess.run(
        [*pip_wheel, "--no-build-isolation", "-w", "wheel", str(tmp_path)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("sira_server-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "sira_server/web/dist/" + p.relative_to(DIST).as_posix()
        for p in DIST.rglob("*")
        if p.is_file()
    }
    assert "sira_server/web/dist/index.html" in expected
    assert expected <= shipped, sorted(expected - shipped)
