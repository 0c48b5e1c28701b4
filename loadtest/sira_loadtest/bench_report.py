"""The decision-path benchmark's results, as markdown (a marked section) and JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SECTION_START = "<!-- bench:decisions start -->"
SECTION_END = "<!-- bench:decisions end -->"
OK_SHARE_FOR_RATIO = 0.5
"""Below this share of OK calls a ratio to echo measures the error path: not given."""
RATIO_TARGET = 0.5
"""Assign/echo and Track/echo throughput, same client and load."""
P95_TARGET_MS = 100.0
"""p95 of Assign and Track at the bench's full concurrency (the seed: < 100 ms P95)."""
P95_AIM_MS = 10.0
OTHER_LOAD_NOTE = 0.2
"""Cores used by other processes during a run above which the run is called disturbed."""
INSIGHTS_TARGET = "GetInsights"
INSIGHTS_P95_TARGET_MS = 5.0
"""GetInsights is served from a cache: its p95 should be that of a cheap unary call."""


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
    other_cores: float | None = None
    """CPU used by processes outside the bench during the run, in cores (None: unknown)."""

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
            "other_cores": None if self.other_cores is None else round(self.other_cores, 3),
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
            for target in _ratio_targets(self):
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
            "targets": [asdict(c) for c in target_checks(self)],
            "problems": list(self.problems),
        }


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.2f}" if ns else "-"


def _statuses(statuses: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(statuses.items(), key=lambda kv: -kv[1]))


def read_loadavg() -> str:
    """`1-min 5-min 15-min` load averages, or "unknown" off Linux."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def workers_target(workers: int) -> str:
    """Target name of the Assign run against a server with several worker processes."""
    return f"Assign, {workers} workers"


def _sira_line(s: Mapping[str, Any]) -> str:
    if not s.get("sira", True):
        return "- SIRA: not started (`--echo-only`)."
    if "preassigned" not in s:
        return "- SIRA: could not be started or seeded (see the notes)."
    line = (
        f"- SIRA: one server process, {s.get('stores')}; experiment `{s.get('experiment')}` "
        f"({s.get('variants')} variants, Thompson sampling); {s['preassigned']} of "
        f"{s.get('subjects')} returning subjects pre-assigned before the clock starts."
    )
    workers = s.get("sira_workers")
    if workers:
        line += (
            f" For the `{workers_target(workers)}` rows the same server (same data) is "
            f"restarted as `sira-server --workers {workers}`: {workers} processes sharing "
            "the port (SO_REUSEPORT); the echo server stays one process."
        )
    return line


def _insights_line(s: Mapping[str, Any]) -> str | None:
    seed = s.get("insights")
    if not isinstance(seed, Mapping):
        return None
    return (
        f"- GetInsights: experiment `{seed.get('experiment')}` with {seed.get('variants')} "
        f"variants (Thompson sampling), seeded over gRPC with {seed.get('assigned')} assigned "
        f"subjects and {seed.get('converted')} conversions; then GetInsights with a "
        f"`data_science` token, {seed.get('concurrency')} calls in flight, "
        f"{s.get('duration')} s. The server answers from its insights cache (no older than "
        "about 1 s, recomputed in the background)."
    )


def _ratio_targets(result: BenchResult) -> list[str]:
    """Assign and Track always; the multi-worker Assign run when it was measured."""
    extra = sorted({m.target for m in result.measurements if m.target.startswith("Assign, ")})
    return ["Assign", "Track", *extra]


def ratio_lines(result: BenchResult) -> list[str]:
    """One line per client: `client: Assign/echo = 0.42; Track/echo = ...`."""
    lines = []
    for client in sorted({r.client for r in result.measurements}):
        parts = []
        for target in _ratio_targets(result):
            if target not in ("Assign", "Track") and result.find(target, client) is None:
                continue
            value, why = result.ratio(target, client)
            if value is None:
                parts.append(f"{target}/echo {why}")
            else:
                parts.append(f"{target}/echo = {value:.2f}" + (f" ({why})" if why else ""))
        lines.append(f"{client}: " + "; ".join(parts))
    return lines


@dataclass(frozen=True)
class TargetCheck:
    """One stated target against what was measured."""

    what: str
    measured: str
    target: str
    verdict: str
    """met, missed, or n/a (not measured, or mostly errors)."""
    caveat: str = ""


def _not_ok(run: Measurement) -> str:
    failed = run.calls - run.statuses.get("OK", 0)
    return f"{failed / run.calls:.1%} of calls not OK" if failed and run.calls else ""


def target_checks(result: BenchResult) -> list[TargetCheck]:
    """The decision path's targets: throughput ratios, p95 at full load, GetInsights p95."""
    checks = []
    clients = sorted({m.client for m in result.measurements}, key=lambda c: c != "sira-loadtest")
    for client in clients:
        for target in _ratio_targets(result):
            if result.find(target, client) is None:
                continue
            value, why = result.ratio(target, client)
            if value is None:
                why = why.removeprefix("n/a (").removesuffix(")")
            if target.startswith("Assign, "):
                why = "; ".join(x for x in (why, "echo is one process") if x)
            verdict = "n/a" if value is None else "met" if value >= RATIO_TARGET else "missed"
            checks.append(
                TargetCheck(
                    f"{target}/echo throughput, {client}",
                    "-" if value is None else f"{value:.3f}",
                    f">= {RATIO_TARGET}",
                    verdict,
                    why,
                )
            )
    concurrency = result.settings.get("concurrency")
    for client in clients:
        for target in _ratio_targets(result):
            run = result.find(target, client)
            if run is None:
                continue
            p95 = run.p95_ns / 1e6
            if not run.statuses.get("OK"):
                verdict = "n/a"
            elif p95 < P95_AIM_MS:
                verdict = f"met (aim < {P95_AIM_MS:g} ms met too)"
            elif p95 < P95_TARGET_MS:
                verdict = f"met; aim < {P95_AIM_MS:g} ms missed"
            else:
                verdict = "missed"
            checks.append(
                TargetCheck(
                    f"{target} p95 at {concurrency} in flight, {client}",
                    f"{p95:.2f} ms" if run.statuses.get("OK") else "-",
                    f"< {P95_TARGET_MS:g} ms (aim < {P95_AIM_MS:g} ms)",
                    verdict,
                    _not_ok(run),
                )
            )
    insights = result.find(INSIGHTS_TARGET, "sira-loadtest")
    if insights is not None:
        p95 = insights.p95_ns / 1e6
        ok = bool(insights.statuses.get("OK")) and insights.ok_share >= OK_SHARE_FOR_RATIO
        checks.append(
            TargetCheck(
                "GetInsights p95, sira-loadtest",
                f"{p95:.2f} ms" if ok else "-",
                f"< {INSIGHTS_P95_TARGET_MS:g} ms",
                "n/a" if not ok else "met" if p95 < INSIGHTS_P95_TARGET_MS else "missed",
                _not_ok(insights),
            )
        )
    return checks


def queueing_line(result: BenchResult) -> str | None:
    """Little's law at the bench's concurrency, against what echo reaches."""
    concurrency = result.settings.get("concurrency")
    echoes = [m for m in result.measurements if m.target == "echo" and m.rps > 0]
    if not isinstance(concurrency, int) or concurrency < 1 or not echoes:
        return None
    needed = concurrency / (P95_AIM_MS / 1e3)
    reached = ", ".join(
        f"{m.rps:.0f} calls/s with p95 {m.p95_ns / 1e6:.1f} ms ({m.client})" for m in echoes
    )
    return (
        f"At {concurrency} calls in flight, latency is mostly queueing: the mean is "
        f"{concurrency} / RPS (Little's law), so a p95 under {P95_AIM_MS:g} ms needs "
        f"roughly {needed:.0f} calls/s or more, whatever the server does per call; the "
        f"do-nothing echo server reaches {reached} on this machine."
    )


def render_markdown(result: BenchResult) -> str:
    """The section body (without markers)."""
    m, s = result.machine, result.settings
    lines = [
        "## Decision path: Assign, Track and GetInsights against an echo server",
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
    ]
    insights = _insights_line(s)
    if insights:
        lines.append(insights)
    lines.append(
        "- Other load: cores used by processes outside the bench (other users of the "
        "machine) while each run was measured; above "
        f"{OTHER_LOAD_NOTE:g} the run was disturbed and its numbers are low."
    )
    if s.get("loadavg_start"):
        lines.append(
            f"- Load average (1, 5, 15 min) before the bench: {s.get('loadavg_start')}; "
            f"after: {s.get('loadavg_end', 'unknown')} (the bench's own processes count in "
            "it; the Other load column leaves them out)."
        )
    lines += [
        "",
        "| Target | Client | Workload | Calls | RPS | p50 ms | p95 ms | p99 ms | gRPC status "
        "| Other load |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in result.measurements:
        other = "-" if r.other_cores is None else f"{r.other_cores:.2f}"
        lines.append(
            f"| {r.target} | {r.client} | {r.workload} | {r.calls} | {r.rps:.0f} | "
            f"{_ms(r.p50_ns)} | {_ms(r.p95_ns)} | {_ms(r.p99_ns)} | {_statuses(r.statuses)} "
            f"| {other} |"
        )
    lines += ["", "Throughput relative to the echo server (same client, same concurrency):", ""]
    lines += [f"- {line}" for line in ratio_lines(result)]
    checks = target_checks(result)
    if checks:
        lines += [
            "",
            "Targets:",
            "",
            "| What | Measured | Target | Verdict | Caveat |",
            "|---|---:|---|---|---|",
        ]
        lines += [
            f"| {c.what} | {c.measured} | {c.target} | {c.verdict} | {c.caveat or '-'} |"
            for c in checks
        ]
    queueing = queueing_line(result)
    if queueing:
        lines += ["", queueing]
    notes = [r for r in result.measurements if r.note]
    disturbed = [
        r
        for r in result.measurements
        if r.other_cores is not None and r.other_cores > OTHER_LOAD_NOTE
    ]
    if notes or disturbed or result.problems:
        lines += ["", "Notes:", ""]
        lines += [f"- {r.target} ({r.client}): {r.note}" for r in notes]
        lines += [
            f"- {r.target} ({r.client}): other processes used {r.other_cores:.2f} cores "
            "during this run; it competed for the CPU"
            for r in disturbed
            if r.other_cores is not None
        ]
        lines += [f"- {p}" for p in result.problems]
    lines += [
        "",
        "How to read it: echo is the ceiling of one grpc.aio server process on this machine "
        "(no interceptors, no parsing, no I/O). Assign/echo and Track/echo say how much of "
        "that ceiling the real decision path keeps. h2load (C, nghttp2) costs the machine "
        "far less CPU than the Python client, but sends one fixed body and cannot see gRPC "
        "status codes (errors arrive as HTTP 200 with a `grpc-status` trailer); its status "
        "column is the status of that body, probed once with a real gRPC call, so errors "
        "that only appear under load (UNAVAILABLE, RESOURCE_EXHAUSTED) do not show there. "
        "The multi-worker Assign rows are not like for like: SO_REUSEPORT spreads "
        "connections, not calls, so they use several connections where the other rows use "
        "the bench's setting, and echo stays one process; they say what more server "
        "processes buy on this machine, where the client needs CPU too.",
    ]
    return "\n".join(lines) + "\n"


def replace_section(
    path: Path,
    body: str,
    title: str = "# Benchmarks",
    *,
    start: str = SECTION_START,
    end: str = SECTION_END,
) -> None:
    """Put `body` between the markers in `path`, keeping everything else in the file."""
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else f"{title}\n\n"
    first, last = text.find(start), text.find(end)
    if first != -1 and last > first:
        tail = text[last + len(end) :]
        text = text[:first] + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def measurement_table(measurements: Sequence[Measurement]) -> str:
    """A compact plain-text table for the terminal."""
    rows = [
        f"{'target':<18} {'client':<14} {'rps':>8} {'p50':>8} {'p95':>8} {'p99':>8} "
        f"{'other':>6}  status"
    ]
    for r in measurements:
        other = "-" if r.other_cores is None else f"{r.other_cores:.2f}"
        rows.append(
            f"{r.target:<18} {r.client:<14} {r.rps:>8.0f} {_ms(r.p50_ns):>8} "
            f"{_ms(r.p95_ns):>8} {_ms(r.p99_ns):>8} {other:>6}  {_statuses(r.statuses)}"
        )
    return "\n".join(rows)
