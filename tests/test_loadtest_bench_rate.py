"""The open-loop section of `make bench`: rows from ghz reports, markdown, flags."""

from __future__ import annotations

from pathlib import Path

from sira_loadtest.bench import parse_args, write_open_loop_section
from sira_loadtest.bench_rate import (
    OPEN_LOOP_END,
    OPEN_LOOP_START,
    RateRow,
    render_rate_markdown,
    row_from_report_json,
)
from sira_loadtest.bench_report import BenchResult

REPORT = {
    "count": 1000,
    "rps": 250.5,
    "statusCodeDistribution": {"OK": 990, "Unavailable": 10},
    "latencyDistribution": [
        {"percentage": 50, "latency": 2_000_000},
        {"percentage": 99, "latency": 9_000_000},
        {"percentage": 99.9, "latency": 30_000_000},
    ],
}


def test_rows_take_p50_p99_and_p999_from_the_report() -> None:
    row = row_from_report_json("Assign", "open", REPORT, share=0.25, offered_rps=250.0)
    assert (row.p50_ns, row.p99_ns, row.p999_ns) == (2_000_000, 9_000_000, 30_000_000)
    assert row.ok_share == 0.99
    assert RateRow.from_json(row.to_json()) == row


def test_markdown_lists_closed_then_open_rows_and_flags_disturbed_runs() -> None:
    rows = [
        row_from_report_json("Assign", "closed", REPORT),
        row_from_report_json("Assign", "open", REPORT, share=0.5, offered_rps=500, other_cores=0.9),
    ]
    text = render_rate_markdown(rows, "today", 64, 10.0)
    assert "| Assign | closed | max | 250 | 1000 | 2.00 | 9.00 | 30.00 | 99.0% | ? |" in text
    assert "| Assign | open | 50% (500/s) |" in text
    assert "0.90 (disturbed)" in text


def test_the_section_is_written_between_its_own_markers(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nhand-written\n")
    result = BenchResult(date="today", machine={}, settings={"concurrency": 64, "duration": 2.0})
    write_open_loop_section(page, result)  # no open-loop rows: nothing written
    assert OPEN_LOOP_START not in page.read_text()
    result.settings["open_loop"] = [row_from_report_json("Track", "closed", REPORT).to_json()]
    write_open_loop_section(page, result)
    write_open_loop_section(page, result)
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written\n")
    assert text.count(OPEN_LOOP_START) == 1
    assert text.count(OPEN_LOOP_END) == 1
    assert "| Track | closed |" in text


def test_open_loop_runs_can_be_skipped() -> None:
    assert parse_args([]).open_loop is True
    assert parse_args(["--no-open-loop"]).open_loop is False
