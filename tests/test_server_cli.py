"""`sira-server migrate|token` (operator tasks on the server's side, `sira_server.cli`):
tokens the server accepts, migrations applied once, every failure one line."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import jwt
import pytest

from sira import cli
from sira_server import cli as server_cli

TEST_JWT_SECRET = "sira-test-secret-" + "x" * 32  # the secret server_fixtures starts with


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SIRA_* setting of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("SIRA_"):
            monkeypatch.delenv(name)


def _one_error_line(err: str, starts: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(starts), err
    assert "Traceback" not in err


def test_token_from_env_secret_is_accepted_by_the_server(
    sira_server: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIRA_JWT_SECRET", TEST_JWT_SECRET)
    assert (
        server_cli.main(["token", "--role", "ops_admin", "--role", "marketing", "--subject", "bob"])
        == 0
    )
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, TEST_JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob"
    assert claims["roles"] == ["ops_admin", "marketing"]
    assert claims["exp"] - claims["iat"] == 3600
    # The client's `sira` accepts it.
    code = cli.main(
        ["list", "--page-size", "1", "--address", sira_server.address, "--token", token]
    )
    assert (code, capsys.readouterr().err) == (0, "")


def test_token_from_the_dev_secret_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIRA_JWT_AUDIENCE", "sira-api")
    monkeypatch.setenv("SIRA_JWT_ISSUER", "molam-id")
    (tmp_path / "dev-jwt-secret").write_text("s" * 48 + "\n")
    argv = ["token", "--role", "pay_module", "--ttl", "60", "--data-dir", str(tmp_path), "--json"]
    assert server_cli.main(argv) == 0
    token = json.loads(capsys.readouterr().out)["token"]
    claims = jwt.decode(
        token, "s" * 48, algorithms=["HS256"], audience="sira-api", issuer="molam-id"
    )
    assert claims["roles"] == ["pay_module"]
    assert claims["exp"] - claims["iat"] == 60


def test_token_without_a_secret_says_how_to_get_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIRA_DATA_DIR", str(tmp_path / "empty"))
    assert server_cli.main(["token", "--role", "ops_admin"]) == 2
    _one_error_line(capsys.readouterr().err, "error: no JWT secret")


async def test_migrate_applies_then_reports_up_to_date(
    fresh_database_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # main() runs its own event loop (asyncio.run): call it from a worker thread.
    code = await asyncio.to_thread(
        server_cli.main, ["migrate", "--database-url", fresh_database_dsn]
    )
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.startswith("applied ")
    code = await asyncio.to_thread(
        server_cli.main, ["migrate", "--database-url", fresh_database_dsn, "--json"]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"applied": []}
    code = await asyncio.to_thread(
        server_cli.main, ["migrate", "--database-url", fresh_database_dsn]
    )
    assert (code, capsys.readouterr().out.strip()) == (0, "up to date")


def test_migrate_failures_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert server_cli.main(["migrate"]) == 2
    _one_error_line(capsys.readouterr().err, "error: no database")
    assert (
        server_cli.main(["migrate", "--database-url", "postgresql://postgres@127.0.0.1:1/x"]) == 1
    )
    _one_error_line(capsys.readouterr().err, "error: migration failed")
