"""The CPU bench's results and their report: runs, ratios to echo, targets, tables.

`sira_loadtest.bench_cpu` measures; this module holds what a run produced (also read
back from its JSON, `--render`) and turns it into the markdown of docs/benchmarks.md."""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sira_loadtest.scenarios import TRACK_BATCH_EVENTS

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
GROUPS = ("server", "flusher", "redis", "postgres")
"""CPU groups of a stack; echo's one process counts as `server`."""


@dataclass(frozen=True)
class Scenario:
    name: str
    """Row label."""
    scenario: str
    """sira-loadtest `--scenario`, or "" for echo."""
    events_per_call: int = 1


SCENARIOS = (
    Scenario("echo", ""),
    Scenario("Assign, new subject", "assign-new"),
    Scenario("Assign, returning subject", "assign-returning"),
    Scenario("Track", "track-heavy"),
    Scenario(f"TrackBatch({TRACK_BATCH_EVENTS})", "track-batch", TRACK_BATCH_EVENTS),
)
ECHO = SCENARIOS[0].name
ECHO_TOKEN = "echo + bearer token"
"""Echo called with the metadata SIRA calls carry: what gRPC charges for it alone."""
ECHO_UVLOOP = "echo on uvloop"
"""The same echo on sira-server's default event loop: how much of a ratio is the loop."""
CURRENT = "current"
"""Label of the servers run by this checkout's interpreter."""
ASSIGN_NEW, ASSIGN_RETURNING, TRACK, TRACK_BATCH = (s.name for s in SCENARIOS[1:])


@dataclass
class CpuRun:
    stack: str
    scenario: str
    calls: int
    ok: int
    events: int
    seconds: float
    drain_seconds: float
    ticks: dict[str, int]
    round: int = 0

    def us_per_call(self, group: str) -> float:
        return self.ticks.get(group, 0) / CLOCK_TICKS * 1e6 / max(self.ok, 1)

    @property
    def total_us(self) -> float:
        return sum(self.us_per_call(g) for g in GROUPS)

    @property
    def cpu_seconds(self) -> float:
        return sum(self.ticks.values()) / CLOCK_TICKS


@dataclass
class CpuResult:
    date: str
    machine: dict[str, str | int]
    settings: dict[str, Any]
    runs: list[CpuRun] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def runs_of(self, stack: str, scenario: str) -> list[CpuRun]:
        return [r for r in self.runs if r.stack == stack and r.scenario == scenario and r.ok]

    def median(self, stack: str, scenario: str, value: Callable[[CpuRun], float]) -> float | None:
        runs = self.runs_of(stack, scenario)
        return statistics.median(value(r) for r in runs) if runs else None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CpuResult:
        runs = [CpuRun(**r) for r in data["runs"]]
        return cls(data["date"], data["machine"], data["settings"], runs, data["problems"])

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "machine": self.machine,
            "settings": self.settings,
            "runs": [asdict(r) for r in self.runs],
            "problems": self.problems,
        }


# --- report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    what: str
    stack: str
    measured: float | None
    limit: float
    at_most: bool

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        met = self.measured <= self.limit if self.at_most else self.measured >= self.limit
        return "met" if met else "missed"


def _server_us(run: CpuRun) -> float:
    return run.us_per_call("server")


def _total_us(run: CpuRun) -> float:
    return run.total_us


def events_per_core_second(run: CpuRun) -> float:
    """Events written into Postgres per CPU second of server, flusher, Redis and Postgres."""
    return run.events / run.cpu_seconds if run.cpu_seconds > 0 else 0.0


def vs_echo(
    result: CpuResult,
    stack: str,
    scenario: str,
    value: Callable[[CpuRun], float],
    echo_label: str = "echo",
) -> float | None:
    """Median over rounds of (this run's CPU per call / echo's in the same round)."""
    echo = {r.round: r.us_per_call("server") for r in result.runs_of(echo_label, ECHO)}
    ratios = [
        value(r) / echo[r.round] for r in result.runs_of(stack, scenario) if echo.get(r.round)
    ]
    return statistics.median(ratios) if ratios else None


def targets(result: CpuResult) -> list[Target]:
    checks = []
    for stack in [s["label"] for s in result.settings["stacks"] if s["python"] == sys.executable]:
        checks += [
            Target(
                "Assign returning, server CPU / echo",
                stack,
                vs_echo(result, stack, ASSIGN_RETURNING, _server_us),
                1.3,
                True,
            ),
            Target(
                "Assign new, server + flusher + Redis + Postgres CPU / echo",
                stack,
                vs_echo(result, stack, ASSIGN_NEW, _total_us),
                2.0,
                True,
            ),
            Target(
                "Track, server + flusher + Redis + Postgres CPU / echo",
                stack,
                vs_echo(result, stack, TRACK, _total_us),
                2.0,
                True,
            ),
            Target(
                f"TrackBatch({TRACK_BATCH_EVENTS}) events/s per core into Postgres",
                stack,
                result.median(stack, TRACK_BATCH, events_per_core_second),
                20_000,
                False,
            ),
        ]
    return checks


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def cpu_table(result: CpuResult) -> list[str]:
    lines = [
        "| Call | Server | calls/s | server µs | flusher µs | Redis µs | Postgres µs "
        "| total µs | server / echo | total / echo |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    stacks = ["echo", ECHO_TOKEN, ECHO_UVLOOP] + [s["label"] for s in result.settings["stacks"]]
    for scenario in SCENARIOS:
        for stack in stacks:
            runs = result.runs_of(stack, scenario.name)
            if not runs:
                continue
            per = scenario.events_per_call
            name = scenario.name + (" per event" if per > 1 else "")
            rate = statistics.median(r.ok / r.seconds for r in runs)
            cells = [
                _fmt(statistics.median(r.us_per_call(g) for r in runs) / per, 1)
                if g == "server" or any(r.ticks.get(g) for r in runs)
                else "-"
                for g in GROUPS
            ]
            total = result.median(stack, scenario.name, _total_us)
            lines.append(
                f"| {name} | {stack} | {rate:,.0f} | {' | '.join(cells)} "
                f"| {_fmt(total and total / per, 1)} "
                f"| {_fmt(vs_echo(result, stack, scenario.name, _server_us), 2)} "
                f"| {_fmt(vs_echo(result, stack, scenario.name, _total_us), 2)} |"
            )
    return lines


def render_markdown(result: CpuResult) -> str:
    s = result.settings
    machine = result.machine
    lines = [
        "## Server CPU per call (from /proc)",
        "",
        f"Measured by `python -m sira_loadtest.bench_cpu` (run by `make bench`) on {result.date}.",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} usable cores; Python "
        f"{machine['python']}, grpcio {machine['grpcio']}, protobuf {machine['protobuf']}.",
        f"- Load: sira-loadtest, {s['concurrency']} calls in flight over one connection, "
        f"{s['duration']} s per run after a {s['warmup']} s warm-up; {s['rounds']} rounds, "
        "each scenario on every server in turn (order alternating); medians over rounds. "
        f"{s['subjects']} returning subjects pre-assigned per server.",
        "- Servers: " + "; ".join(_describe(st) for st in s["stacks"]) + ". Each has its "
        "own Redis and Postgres (the embedded ones: Redis with AOF fsync always over a "
        "Unix socket, Postgres over TCP) started by the bench, so every pid is known.",
        "- CPU: utime+stime from /proc/PID/stat (plus reaped children) of the server "
        "process, the `--role flusher` process, redis-server, and the postmaster with "
        "all its children (backends, WAL writer, checkpointer...), read before the run and "
        "after the flusher has written every record of it into Postgres; divided by the "
        "calls answered OK. The load client's CPU is not counted.",
        f"- Load average before: {s['loadavg_start']}; after: {s.get('loadavg_end', '?')}.",
        "",
        *cpu_table(result),
        "",
        "Targets (same run):",
        "",
        "| What | Server | Measured | Target | Verdict |",
        "|---|---|---:|---|---|",
    ]
    for t in targets(result):
        op = "≤" if t.at_most else "≥"
        digits = 0 if t.limit > 100 else 2
        lines.append(
            f"| {t.what} | {t.stack} | {_fmt(t.measured, digits)} "
            f"| {op} {t.limit:,.{digits}f} | {t.verdict} |"
        )
    lines += ["", *same_loop_lines(result), *before_after_lines(result)]
    if result.problems:
        lines += ["", "Problems:", "", *(f"- {p}" for p in result.problems)]
    return "\n".join(lines).rstrip() + "\n"


def same_loop_lines(result: CpuResult) -> list[str]:
    """The target ratios against the echo on uvloop, sira-server's own loop: the share of
    a ratio that is SIRA's work, not the event loop's."""
    if not result.runs_of(ECHO_UVLOOP, ECHO):
        return []
    lines = ["The same ratios against the echo on uvloop (the loop sira-server runs on):", ""]
    for stack in [s["label"] for s in result.settings["stacks"] if s["python"] == sys.executable]:
        parts = [
            f"{name} {_fmt(vs_echo(result, stack, scenario, value, ECHO_UVLOOP), 2)}"
            for name, scenario, value in (
                ("Assign returning (server)", ASSIGN_RETURNING, _server_us),
                ("Assign new (total)", ASSIGN_NEW, _total_us),
                ("Track (total)", TRACK, _total_us),
            )
        ]
        lines.append(f"- {stack}: " + ", ".join(parts) + ".")
    return [*lines, ""]


def _describe(stack: Mapping[str, Any]) -> str:
    how = (
        "`--role serve` + a `--role flusher` process"
        if stack["split_flusher"]
        else ("one process, flusher inside (`--role all`, the default)")
    )
    who = "" if stack["python"] == sys.executable else f", run by `{stack['python']}`"
    return f"**{stack['label']}**: {how}{who}"


def before_after_lines(result: CpuResult) -> list[str]:
    """Per scenario: before / main per round, median and range (the noise)."""
    pairs = [tuple(p) for p in result.settings.get("pairs") or ()] or [
        (CURRENT, s["label"]) for s in result.settings["stacks"] if s["python"] != sys.executable
    ]
    if not pairs:
        return []
    lines = [
        "Before / after: CPU per call of one server divided by another's, per round "
        "(same scenario, consecutive runs); median and range over the rounds. Below 1: "
        "the first spends less.",
        "",
        "| Call | after / before | server CPU | range | total CPU | range |",
        "|---|---|---:|---|---:|---|",
    ]
    for scenario, (new, old) in ((s, p) for p in pairs for s in SCENARIOS[1:]):
        cells = []
        for value in (_server_us, _total_us):
            old_runs = {r.round: value(r) for r in result.runs_of(old, scenario.name)}
            ratios = [
                value(r) / old_runs[r.round]
                for r in result.runs_of(new, scenario.name)
                if old_runs.get(r.round)
            ]
            if ratios:
                cells += [
                    f"{statistics.median(ratios):.2f}",
                    f"{min(ratios):.2f}-{max(ratios):.2f}",
                ]
            else:
                cells += ["-", "-"]
        lines.append(f"| {scenario.name} | {new} / {old} | {' | '.join(cells)} |")
    return lines
