"""The decision-path benchmark's results, as markdown (a marked section) and JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTION_START = "<!-- bench:decisions start -->"
SECTION_END = "<!-- bench:decisions end -->"
OK_SHARE_FOR_RATIO = 0.5
"""Below this share of OK calls a ratio to echo measures the error path: not given."""


@dataclass(frozen=True)
class Measurement:
    """One timed run of one target with one client."""

    target: str
    """echo, Assign or Track."""
    client: str
    """sira-loadtest or h2load."""
    workload: str
    """What was sent, in words (honest about fixed bodies)."""
    calls: int
    rps: float
    p50_ns: int
    p95_ns: int
    p99_ns: int
    statuses: Mapping[str, int]
    """gRPC status counts; for h2load the status of the fixed body times the calls."""
    note: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)
    """The ghz-style JSON report or h2load's summary."""

    @property
    def ok_share(self) -> float:
        return self.statuses.get("OK", 0) / self.calls if self.calls else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "client": self.client,
            "workload": self.workload,
            "calls": self.calls,
            "rps": round(self.rps, 1),
            "p50_ns": self.p50_ns,
            "p95_ns": self.p95_ns,
            "p99_ns": self.p99_ns,
            "statuses": dict(self.statuses),
            "note": self.note,
            "detail": dict(self.detail),
        }


@dataclass
class BenchResult:
    date: str
    machine: Mapping[str, str | int]
    settings: dict[str, Any]
    """Concurrency, duration, connections, workers, stores, h2load version..."""
    measurements: list[Measurement] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """What could not be measured, and why."""

    def find(self, target: str, client: str) -> Measurement | None:
        return next(
            (m for m in self.measurements if m.target == target and m.client == client), None
        )

    def ratio(self, target: str, client: str) -> tuple[float | None, str]:
        """(target RPS / echo RPS, caveat) for one client; (None, why) when meaningless."""
        base, run = self.find("echo", client), self.find(target, client)
        if base is None or run is None:
            return None, "not measured"
        failed = {k: v for k, v in run.statuses.items() if k != "OK"}
        caveat = ""
        if failed:
            top = max(failed.items(), key=lambda kv: kv[1])[0]
            caveat = (
                f"{(run.calls - run.statuses.get('OK', 0)) / run.calls:.1%} not OK, mostly {top}"
            )
        if run.ok_share < OK_SHARE_FOR_RATIO or base.rps <= 0:
            return None, f"n/a ({caveat or 'no calls'})"
        return run.rps / base.rps, caveat

    def to_json(self) -> dict[str, Any]:
        ratios: dict[str, Any] = {}
        for client in sorted({m.client for m in self.measurements}):
            for target in ("Assign", "Track"):
                value, why = self.ratio(target, client)
                ratios[f"{target}/echo {client}"] = {
                    "ratio": round(value, 3) if value is not None else None,
                    "caveat": why,
                }
        return {
            "date": self.date,
            "machine": dict(self.machine),
            "settings": dict(self.settings),
            "measurements": [m.to_json() for m in self.measurements],
            "ratios": ratios,
            "problems": list(self.problems),
        }


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.2f}" if ns else "-"


def _statuses(statuses: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(statuses.items(), key=lambda kv: -kv[1]))


def _sira_line(s: Mapping[str, Any]) -> str:
    if not s.get("sira", True):
        return "- SIRA: not started (`--echo-only`)."
    if "preassigned" not in s:
        return "- SIRA: could not be started or seeded (see the notes)."
    return (
        f"- SIRA: one server process, {s.get('stores')}; experiment `{s.get('experiment')}` "
        f"({s.get('variants')} variants, Thompson sampling); {s['preassigned']} of "
        f"{s.get('subjects')} returning subjects pre-assigned before the clock starts."
    )


def ratio_lines(result: BenchResult) -> list[str]:
    """One line per client: `client: Assign/echo = 0.42; Track/echo = ...`."""
    lines = []
    for client in sorted({r.client for r in result.measurements}):
        parts = []
        for target in ("Assign", "Track"):
            value, why = result.ratio(target, client)
            if value is None:
                parts.append(f"{target}/echo {why}")
            else:
                parts.append(f"{target}/echo = {value:.2f}" + (f" ({why})" if why else ""))
        lines.append(f"{client}: " + "; ".join(parts))
    return lines


def render_markdown(result: BenchResult) -> str:
    """The section body (without markers)."""
    m, s = result.machine, result.settings
    lines = [
        "## Decision path: Assign and Track against an echo server",
        "",
        f"Measured by `make bench` (`python -m sira_loadtest.bench`) on {result.date}.",
        "",
        f"- Machine: {m.get('cpu')}, {m.get('cores')} usable cores; {m.get('os')}.",
        f"- Software: Python {m.get('python')}, grpcio {m.get('grpcio')}, "
        f"protobuf {m.get('protobuf')}, {s.get('h2load') or 'h2load not found'}.",
        _sira_line(s),
        f"- Load: {s.get('concurrency')} calls in flight over {s.get('connections')} "
        f"connection(s), {s.get('workers')} client process(es), {s.get('duration')} s per run "
        f"after a {s.get('warmup')} s warm-up. Client and servers share the machine, so "
        "every number includes the client's own CPU cost.",
        "",
        "| Target | Client | Workload | Calls | RPS | p50 ms | p95 ms | p99 ms | gRPC status |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result.measurements:
        lines.append(
            f"| {r.target} | {r.client} | {r.workload} | {r.calls} | {r.rps:.0f} | "
            f"{_ms(r.p50_ns)} | {_ms(r.p95_ns)} | {_ms(r.p99_ns)} | {_statuses(r.statuses)} |"
        )
    lines += ["", "Throughput relative to the echo server (same client, same concurrency):", ""]
    lines += [f"- {line}" for line in ratio_lines(result)]
    notes = [r for r in result.measurements if r.note]
    if notes or result.problems:
        lines += ["", "Notes:", ""]
        lines += [f"- {r.target} ({r.client}): {r.note}" for r in notes]
        lines += [f"- {p}" for p in result.problems]
    lines += [
        "",
        "How to read it: echo is the ceiling of one grpc.aio server process on this machine "
        "(no interceptors, no parsing, no I/O). Assign/echo and Track/echo say how much of "
        "that ceiling the real decision path keeps. h2load (C, nghttp2) costs the machine "
        "far less CPU than the Python client, but sends one fixed body and cannot see gRPC "
        "status codes (errors arrive as HTTP 200 with a `grpc-status` trailer); its status "
        "column is the status of that body, probed once with a real gRPC call, so errors "
        "that only appear under load (UNAVAILABLE, RESOURCE_EXHAUSTED) do not show there.",
    ]
    return "\n".join(lines) + "\n"


def replace_section(path: Path, body: str, title: str = "# Benchmarks") -> None:
    """Put `body` between the markers in `path`, keeping everything else in the file."""
    block = f"{SECTION_START}\n{body.rstrip()}\n{SECTION_END}\n"
    text = path.read_text() if path.exists() else f"{title}\n\n"
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start != -1 and end > start:
        tail = text[end + len(SECTION_END) :]
        text = text[:start] + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def measurement_table(measurements: Sequence[Measurement]) -> str:
    """A compact plain-text table for the terminal."""
    rows = [f"{'target':<8} {'client':<14} {'rps':>8} {'p50':>8} {'p95':>8} {'p99':>8}  status"]
    for r in measurements:
        rows.append(
            f"{r.target:<8} {r.client:<14} {r.rps:>8.0f} {_ms(r.p50_ns):>8} "
            f"{_ms(r.p95_ns):>8} {_ms(r.p99_ns):>8}  {_statuses(r.statuses)}"
        )
    return "\n".join(rows)
