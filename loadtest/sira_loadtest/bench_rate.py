"""Latency under a fixed rate: Assign and Track at 25, 50 and 75 % of their measured maximum.

The closed-loop runs of `make bench` find each target's maximum rate at the
bench's concurrency. These runs then offer a fixed fraction of it, open loop
(`sira-loadtest --rps`): every call has an intended send time and its latency is
measured from that time, so a stall is charged to every call it delays (no
coordinated omission, as wrk2). These are the numbers a capacity planner needs:
what latency callers see at a given share of capacity. Rendered as its own
marked section of docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sira_loadtest.report import Report

RATE_SHARES: tuple[float, ...] = (0.25, 0.5, 0.75)
OPEN_LOOP_START = "<!-- bench:open-loop start -->"
OPEN_LOOP_END = "<!-- bench:open-loop end -->"
OTHER_LOAD_NOTE = 0.2
"""Cores used by others during a run above which the row is marked disturbed."""


@dataclass(frozen=True)
class RateRow:
    target: str
    """Assign or Track."""
    loop: str
    """closed (max rate at the bench's concurrency) or open (a fixed rate)."""
    share: float | None
    """Fraction of the closed-loop maximum offered (open loop only)."""
    offered_rps: float | None
    achieved_rps: float
    calls: int
    p50_ns: int
    p99_ns: int
    p999_ns: int
    ok_share: float
    other_cores: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RateRow:
        return cls(**doc)


def _p(report_json: Mapping[str, Any], percent: float) -> int:
    for entry in report_json.get("latencyDistribution", []):
        if float(entry["percentage"]) == percent:
            return int(entry["latency"])
    return 0


def row_from_report_json(
    target: str,
    loop: str,
    report_json: Mapping[str, Any],
    *,
    share: float | None = None,
    offered_rps: float | None = None,
    other_cores: float | None = None,
) -> RateRow:
    statuses: Mapping[str, int] = report_json.get("statusCodeDistribution", {})
    calls = int(report_json.get("count", 0))
    return RateRow(
        target=target,
        loop=loop,
        share=share,
        offered_rps=offered_rps,
        achieved_rps=float(report_json.get("rps", 0.0)),
        calls=calls,
        p50_ns=_p(report_json, 50),
        p99_ns=_p(report_json, 99),
        p999_ns=_p(report_json, 99.9),
        ok_share=statuses.get("OK", 0) / calls if calls else 0.0,
        other_cores=other_cores,
    )


def row_from_report(
    target: str, report: Report, share: float, offered_rps: float, other_cores: float | None
) -> RateRow:
    return row_from_report_json(
        target,
        "open",
        report.to_json(details=False),
        share=share,
        offered_rps=offered_rps,
        other_cores=other_cores,
    )


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.2f}" if ns else "-"


def render_rate_markdown(
    rows: Sequence[RateRow], date: str, concurrency: object, duration: object
) -> str:
    lines = [
        "## Latency under a fixed rate (open loop)",
        "",
        f"Measured by `make bench` on {date}, right after the closed-loop runs above, on "
        "the same one-process server. Closed loop: "
        f"{concurrency} calls in flight as fast as the server answers, which gives the "
        "maximum rate. Open loop: `sira-loadtest --rps R` at 25, 50 and 75 % of that "
        f"maximum for {duration} s each, latency measured from each call's intended send "
        "time (a stall is charged to every call it delays, as wrk2 does).",
        "",
        "| Target | Loop | Offered | Achieved RPS | Calls | p50 ms | p99 ms | p99.9 ms "
        "| OK | Other load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        offered = "max" if r.share is None else f"{r.share:.0%} ({r.offered_rps or 0:.0f}/s)"
        other = "?" if r.other_cores is None else f"{r.other_cores:.2f}"
        if r.other_cores is not None and r.other_cores > OTHER_LOAD_NOTE:
            other += " (disturbed)"
        lines.append(
            f"| {r.target} | {r.loop} | {offered} | {r.achieved_rps:.0f} | {r.calls} "
            f"| {_ms(r.p50_ns)} | {_ms(r.p99_ns)} | {_ms(r.p999_ns)} | {r.ok_share:.1%} "
            f"| {other} |"
        )
    if not rows:
        lines.append("| - | - | - | - | - | - | - | - | - | - |")
    return "\n".join(lines) + "\n"
