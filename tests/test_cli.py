"""The `sira` CLI against the real server: the seed's Checkout Button Color lifecycle
in table and JSON modes, and every failure as one line with the right exit code."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from rich.console import Console

from sira import cli, render
from sira.experiments.v1 import experiment_pb2, insights_service_pb2

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
SIRA_SCRIPT = Path(sys.executable).parent / "sira"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SIRA_* setting of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("SIRA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "160")


@pytest.fixture
def checkout_file(tmp_path: Path, unique_key: str) -> Path:
    """The seed's checkout-button-color.json with a key of this test's own."""
    spec = json.loads((EXAMPLES / "checkout-button-color.json").read_text())
    path = tmp_path / "checkout-button-color.json"
    path.write_text(json.dumps({"key": unique_key, **spec}))
    return path


class Sira:
    """Runs `main()` in-process against one server with one token."""

    def __init__(self, capsys: pytest.CaptureFixture[str], address: str, token: str | None):
        self.capsys = capsys
        self.address = address
        self.token = token

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        args = [*argv, "--address", self.address]
        if self.token:
            args += ["--token", self.token]
        code = cli.main(args)
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *argv: str) -> Any:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        assert err == ""
        return json.loads(out)


@pytest.fixture
def ops(
    sira_server: Any, token_for: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> Sira:
    return Sira(capsys, sira_server.address, token_for("ops_admin", "alice"))


def _one_error_line(err: str, starts: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(starts), err
    assert "Traceback" not in err


# -- the seed's lifecycle --------------------------------------------------------


def test_checkout_button_color_lifecycle_tables(
    ops: Sira, checkout_file: Path, unique_key: str
) -> None:
    code, out, err = ops("create", str(checkout_file))
    assert (code, err) == (0, "")
    assert f"created {unique_key}" in out
    assert "Blue Button" in out
    assert "#34C759" in out
    assert "country in FR, SN" in out  # the server normalises the order

    code, out, _ = ops("list", "--status", "draft", "--all")
    assert code == 0
    assert unique_key in out
    assert "draft" in out

    code, out, _ = ops("show", unique_key)
    assert code == 0
    for text in (unique_key, "Checkout Button Color", "blue-button", "green-button", "#0A84FF"):
        assert text in out

    code, out, _ = ops("start", unique_key)
    assert (code, out.strip()) == (0, f"{unique_key}: running")

    code, out, _ = ops("stop", unique_key, "--winner", "green-button", "--reason", "green wins")
    assert code == 0
    assert (
        out.strip()
        == f"{unique_key}: stopped, winner green-button (Green Button), reason: green wins"
    )

    code, out, _ = ops("archive", unique_key)
    assert code == 0
    assert out.startswith(f"{unique_key}: archived, winner green-button")

    code, out, _ = ops("audit", unique_key)
    assert code == 0
    for action in ("created", "started", "stopped", "archived"):
        assert action in out
    assert "alice" in out


def test_checkout_button_color_lifecycle_json(
    ops: Sira, checkout_file: Path, unique_key: str
) -> None:
    created = ops.json("create", str(checkout_file))
    assert created["key"] == unique_key
    assert created["status"] == "EXPERIMENT_STATUS_DRAFT"
    assert [v["name"] for v in created["variants"]] == ["Blue Button", "Green Button"]
    assert created["variants"][0]["config"] == {"button_color": "#0A84FF"}
    assert sorted(created["targeting"]["countries"]) == ["FR", "SN"]

    listed = ops.json("list", "--all", "--status", "draft")
    assert unique_key in [e["key"] for e in listed["experiments"]]
    assert ops.json("show", created["id"])["key"] == unique_key

    assert ops.json("start", unique_key)["status"] == "EXPERIMENT_STATUS_RUNNING"
    stopped = ops.json("stop", unique_key, "--winner", "green-button")
    green = next(v for v in stopped["variants"] if v["key"] == "green-button")
    assert stopped["status"] == "EXPERIMENT_STATUS_STOPPED"
    assert stopped["winner_variant_id"] == green["id"]
    assert ops.json("archive", unique_key)["status"] == "EXPERIMENT_STATUS_ARCHIVED"

    events = ops.json("audit", unique_key)["events"]
    assert [e["action"] for e in events][:4] == ["archived", "stopped", "started", "created"]
    assert {e["actor"] for e in events} == {"alice"}
    assert all(e["experiment_id"] == created["id"] for e in events)
    assert len(ops.json("audit", unique_key, "--limit", "2")["events"]) == 2


def test_global_options_before_the_subcommand(
    sira_server: Any, token_for: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    token = token_for("data_science")
    code = cli.main(["--json", "--address", sira_server.address, "--token", token, "list"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert isinstance(json.loads(out), dict)


def test_address_and_token_from_the_environment(
    sira_server: Any,
    token_for: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIRA_ADDRESS", sira_server.address)
    monkeypatch.setenv("SIRA_TOKEN", token_for("marketing"))
    assert cli.main(["list", "--page-size", "1"]) == 0
    assert capsys.readouterr().err == ""


def test_delete_asks_unless_yes(
    ops: Sira, checkout_file: Path, unique_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ops("create", str(checkout_file))[0] == 0

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # not a terminal
    code, _, err = ops("delete", unique_key)
    assert code == 2
    _one_error_line(err, "error: refusing to delete")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    code, _, err = ops("delete", unique_key)
    assert code == 2
    assert "not deleted" in err
    assert ops("show", unique_key)[0] == 0

    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    code, out, _ = ops("delete", unique_key)
    assert (code, out.strip()) == (0, f"deleted {unique_key}")
    code, _, err = ops("show", unique_key)
    assert code == 1
    assert "NOT_FOUND" in err


def test_archive_stale_dry_run(ops: Sira) -> None:
    code, out, _ = ops("archive-stale", "--older-than-days", "90", "--dry-run")
    assert code == 0
    assert "would archive" in out
    response = ops.json("archive-stale", "--dry-run")
    assert set(response) <= {"experiments"}


# -- failures: one line, never a traceback ------------------------------------------


def test_unknown_experiment(ops: Sira, unique_key: str) -> None:
    code, out, err = ops("show", unique_key)
    assert code == 1
    assert out == ""
    _one_error_line(err, "error: NOT_FOUND (ERROR_REASON_EXPERIMENT_NOT_FOUND): ")
    assert unique_key in err


def test_missing_token(sira_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = Sira(capsys, sira_server.address, None)("list")
    assert code == 1
    _one_error_line(err, "error: UNAUTHENTICATED (ERROR_REASON_TOKEN_MISSING): ")
    assert "SIRA_TOKEN" in err


def test_wrong_role(
    sira_server: Any,
    token_for: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
    checkout_file: Path,
) -> None:
    reader = Sira(capsys, sira_server.address, token_for("data_science"))
    code, _, err = reader("create", str(checkout_file))
    assert code == 1
    _one_error_line(err, "error: PERMISSION_DENIED (ERROR_REASON_ROLE_NOT_ALLOWED): ")


def test_invalid_file(ops: Sira, tmp_path: Path) -> None:
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"name": "x", "variants": [], "targetting": {}}))
    code, _, err = ops("create", str(typo))
    assert code == 2
    _one_error_line(err, f"error: {typo}: top level: unknown key 'targetting'")

    broken = tmp_path / "broken.json"
    broken.write_text("{")
    code, _, err = ops("create", str(broken))
    assert code == 2
    _one_error_line(err, f"error: {broken}: invalid JSON")

    code, _, err = ops("create", str(tmp_path / "absent.yaml"))
    assert code == 2
    _one_error_line(err, "error: ")


def test_file_the_server_rejects_lists_its_violations(ops: Sira, tmp_path: Path) -> None:
    lonely = tmp_path / "lonely.yaml"
    lonely.write_text("name: Lonely\nvariants:\n  - name: Only One\n")
    code, _, err = ops("create", str(lonely))
    assert code == 1
    first, *violations = err.splitlines()
    assert first.startswith("error: INVALID_ARGUMENT (ERROR_REASON_INVALID_ARGUMENT): ")
    assert violations
    assert all(line.startswith("  ") and ": " in line for line in violations)
    assert "Traceback" not in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["list", "--status", "paused"]) == 2
    assert cli.main(["stop"]) == 2
    assert cli.main(["--timeout", "-1", "list"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "insights" in capsys.readouterr().out


def test_server_tasks_point_to_sira_server(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("migrate", "token", "rebuild", "deadletter"):
        assert cli.main([command]) == 2
        assert f"run `sira-server {command}`" in capsys.readouterr().err


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["list", "--address", "127.0.0.1:1", "--timeout", "2"])
    assert code == 1
    _one_error_line(capsys.readouterr().err, "error: UNAVAILABLE: cannot reach the SIRA server")


def test_ctrl_c_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["list"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_console_script_prints_one_line_and_no_traceback(
    sira_server: Any, token_for: Callable[..., str], unique_key: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIRA_")}
    env["SIRA_ADDRESS"] = sira_server.address
    env["SIRA_TOKEN"] = token_for("ops_admin")
    cases: list[tuple[list[str], int, str]] = [
        (["show", unique_key], 1, "error: NOT_FOUND (ERROR_REASON_EXPERIMENT_NOT_FOUND)"),
        (["list", "--token", "garbage"], 1, "error: UNAUTHENTICATED (ERROR_REASON_TOKEN_INVALID)"),
        (["create", str(tmp_path / "nope.json")], 2, "error: "),
        (["list", "--address", "127.0.0.1:1"], 1, "error: UNAVAILABLE"),
        (["stop"], 2, "usage: sira stop"),
    ]
    for argv, expected_code, starts in cases:
        done = subprocess.run(
            [str(SIRA_SCRIPT), *argv], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == expected_code, (argv, done.stderr)
        assert "Traceback" not in done.stderr
        assert done.stdout == ""
        assert done.stderr.startswith(starts), (argv, done.stderr)
        if expected_code == 1:
            assert len(done.stderr.splitlines()) == 1, done.stderr


# -- results and insights ------------------------------------------------------------


@pytest.fixture
async def bare_server() -> AsyncIterator[str]:
    """A real gRPC server with no service at all: every call is UNIMPLEMENTED."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_results_and_insights_unimplemented_is_one_line(
    bare_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("results", "insights"):
        code = await asyncio.to_thread(cli.main, [command, "x", "--address", bare_server])
        assert code == 1
        _one_error_line(capsys.readouterr().err, "error: UNIMPLEMENTED: ")


def test_results_and_insights_on_the_real_server(
    ops: Sira, checkout_file: Path, unique_key: str
) -> None:
    assert ops("create", str(checkout_file))[0] == 0
    assert ops("start", unique_key)[0] == 0
    for command in ("results", "insights"):
        code, out, err = ops(command, unique_key)
        if code == 0:
            assert "Blue Button" in out
            assert "Green Button" in out
        else:  # not served yet: still one clean line
            _one_error_line(err, "error: ")


def _insights() -> insights_service_pb2.GetInsightsResponse:
    """The seed's step 8-9: green converts at 8.47 %, blue at 4.5 %."""
    response = insights_service_pb2.GetInsightsResponse(
        status=experiment_pb2.EXPERIMENT_STATUS_RUNNING,
        leading_variant_id="green",
        action=insights_service_pb2.RECOMMENDED_ACTION_STOP_WITH_WINNER,
        recommendation="Variant 'Green Button' leading",
        threshold=0.95,
        min_samples=100,
        draws=20000,
    )
    response.insights.add(
        variant_id="blue",
        variant="Blue Button",
        is_control=True,
        samples=1000,
        conversions=45,
        conversion_rate=0.045,
        confidence_interval=insights_service_pb2.Interval(lower=0.033, upper=0.059),
        prob_worse_than_best=0.9999,
        fails_fast=True,
    )
    response.insights.add(
        variant_id="green",
        variant="Green Button",
        samples=1000,
        conversions=85,
        conversion_rate=0.0847,
        confidence_interval=insights_service_pb2.Interval(lower=0.0712, upper=0.0982),
        prob_best=0.9999,
        lift=0.88,
    )
    return response


def test_insights_view_has_table_chart_and_recommendation() -> None:
    console = Console(file=io.StringIO(), width=140)
    console.print(render.insights_view(_insights()))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "8.47%" in text
    assert "[7.12%, 9.82%]" in text
    assert "recommendation: stop with winner — Variant 'Green Button' leading" in text
    chart = [line for line in text.splitlines() if line.startswith(("Blue", "Green"))]
    assert len(chart) == 2
    blue, green = chart
    # On one shared scale the leader's bar is longer.
    assert green.count("█") > blue.count("█")


def test_conversion_chart_marks_the_interval_around_the_mean() -> None:
    chart = render.conversion_chart(_insights(), width=40).plain.splitlines()
    green = next(line for line in chart if line.startswith("Green Button"))
    bar = green[len("Green Button  ") :][:40]
    mean_at = bar.index("│")
    assert set(bar[:mean_at]) <= {"█", "▓"}
    assert "▓" in bar  # the lower half of the interval, up to the mean
    assert "░" in bar[mean_at:]  # the upper half
    assert bar.rstrip().endswith("░")  # the upper bound (9.82 %) is the scale's end
