"""Microbenchmark of the statistics kernels (no server, no network).

    python -m sira_loadtest.bench_kernels [--runs 21] [--arms 10] [--draws 100000] [--write [PATH]]

Measures, each as the median over ``--runs`` timed runs after a warm-up:
- one Monte Carlo pass (arms x draws), the work behind P(best), P(worse) and expected loss;
- one Thompson decision over the arms, Python call included (what Assign pays);
- the pure compute of GetInsights for that many variants (one pass with lift draws and
  their quantiles, exact guardrail comparisons and credible intervals, SRM, recommendation);
- numpy's own Beta sampler per draw, for comparison.
Prints them; with ``--write`` also puts a markdown section, targets and verdicts included,
between the ``bench:kernels`` markers of docs/benchmarks.md (`make bench` does this).
Machine noise shows as the gap between median and min: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from sira_loadtest.bench_report import read_loadavg, replace_section
from sira_loadtest.machine import describe_machine
from sira_server.domain import bayes
from sira_server.domain.experiment import Allocation, Reward
from sira_server.domain.insights import ArmCounts, compute_insights

THOMPSON_BATCH = 10_000
KERNELS_START = "<!-- bench:kernels start -->"
KERNELS_END = "<!-- bench:kernels end -->"
MONTE_CARLO_TARGET_MS = 40.0
"""One Monte Carlo pass, 10 arms x 100k draws, on one core."""
THOMPSON_TARGET_US = 2.0
"""One Thompson decision over 10 arms, Python call included."""


@dataclass(frozen=True)
class KernelFigure:
    """One measured figure: median and min over the timed runs, in `unit`."""

    key: str
    label: str
    median: float
    best: float
    unit: str
    target: float | None = None
    """Upper bound for the median, same unit; None when no target applies."""

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "no target"
        return "met" if self.median < self.target else "missed"

    def line(self) -> str:
        return (
            f"{self.label:<46} median {self.median:9.3f} {self.unit}"
            f"   min {self.best:9.3f} {self.unit}"
            + (f"   target < {self.target:g} {self.unit}: {self.verdict}" if self.target else "")
        )


@dataclass
class KernelResults:
    date: str
    machine: Mapping[str, str | int]
    runs: int
    arms: int
    draws: int
    warm_up_seconds: float
    loadavg: str
    figures: list[KernelFigure] = field(default_factory=list)

    def get(self, key: str) -> KernelFigure | None:
        return next((f for f in self.figures if f.key == key), None)


def _timings(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _figure(
    key: str,
    label: str,
    seconds: Sequence[float],
    scale: float,
    unit: str,
    target: float | None = None,
) -> KernelFigure:
    return KernelFigure(
        key, label, statistics.median(seconds) * scale, min(seconds) * scale, unit, target
    )


def _arms(n: int) -> list[ArmCounts]:
    """Realistic counts: ~10k subjects per variant, 4-6 % conversion, some refunds/churn."""
    return [
        ArmCounts(
            variant_id=f"v{i}",
            assigned_subjects=10_000 + 37 * i,
            converted_subjects=400 + 25 * i,
            refunded_converted_subjects=8 + i,
            refunded_subjects=10 + i,
            churned_subjects=30 + 2 * i,
            name=f"variant {i}",
            is_control=i == 0,
        )
        for i in range(n)
    ]


def measure_kernels(runs: int = 21, arms: int = 10, draws: int = 100_000) -> KernelResults:
    """Time every kernel; targets apply only at their reference size (10 arms, 100k draws)."""
    loadavg = read_loadavg()
    start = time.perf_counter()
    bayes.warm_up()
    results = KernelResults(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=describe_machine(),
        runs=runs,
        arms=arms,
        draws=draws,
        warm_up_seconds=time.perf_counter() - start,
        loadavg=loadavg,
    )
    reference = arms == 10
    counts = _arms(arms)
    successes = np.array([a.converted_subjects for a in counts], dtype=np.float64)
    trials = np.array([a.assigned_subjects for a in counts], dtype=np.float64)
    alpha, beta = 1.0 + successes, 1.0 + trials - successes
    active = np.ones(arms, dtype=np.bool_)

    seeds = iter(range(1, 10 * runs + 10))
    mc = _timings(lambda: bayes.monte_carlo_pass(alpha, beta, draws, next(seeds)), runs)
    mc_target = MONTE_CARLO_TARGET_MS if reference and draws == 100_000 else None
    label = f"Monte Carlo pass {arms} arms x {draws} draws"
    results.figures.append(_figure("monte_carlo", label, mc, 1e3, "ms", mc_target))

    state = bayes.new_rng_state(12345)

    def decisions() -> None:
        for _ in range(THOMPSON_BATCH):
            bayes.thompson_choose(alpha, beta, active, state)

    th = _timings(decisions, runs)
    label = f"Thompson decision over {arms} arms"
    th_target = THOMPSON_TARGET_US if reference else None
    results.figures.append(_figure("thompson", label, th, 1e6 / THOMPSON_BATCH, "µs", th_target))

    def insights() -> None:
        compute_insights(
            counts, reward=Reward.CONVERSION_NOT_REFUNDED, allocation=Allocation.FIXED_WEIGHTS
        )

    insights()
    gi = _timings(insights, max(3, runs // 3))
    label = f"GetInsights pure compute, {arms} variants"
    results.figures.append(_figure("insights", label, gi, 1e3, "ms"))

    rng = np.random.default_rng(0)
    n = 1_000_000
    nb = _timings(lambda: rng.beta(alpha[0], beta[0], size=n), 5)
    results.figures.append(_figure("numpy_beta", "numpy Beta sampler, per draw", nb, 1e9 / n, "ns"))
    per_draw = [t / (arms * draws) for t in mc]
    label = "our Beta draw inside the Monte Carlo pass"
    results.figures.append(_figure("our_beta", label, per_draw, 1e9, "ns"))
    return results


def _cell(value: float) -> str:
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def render_kernels_markdown(results: KernelResults) -> str:
    """The section body (without markers)."""
    m = results.machine
    lines = [
        "## Statistics kernels",
        "",
        f"Measured by `python -m sira_loadtest.bench_kernels --write` (run by `make bench`) "
        f"on {results.date}: median and min of {results.runs} timed runs after a warm-up "
        f"(numba cache loaded or compiled in {results.warm_up_seconds:.2f} s), one core, "
        "no server running.",
        "",
        f"- Machine: {m.get('cpu')}, {m.get('cores')} usable cores; {m.get('os')}; "
        f"Python {m.get('python')}. Load average at the start: {results.loadavg}.",
        "",
        "| Kernel | Median | Min | Target | Verdict |",
        "|---|---:|---:|---|---|",
    ]
    for f in results.figures:
        target = f"< {f.target:g} {f.unit}" if f.target is not None else "-"
        lines.append(
            f"| {f.label} | {_cell(f.median)} {f.unit} | {_cell(f.best)} {f.unit} | "
            f"{target} | {f.verdict if f.target is not None else '-'} |"
        )
    insights = results.get("insights")
    lines += [
        "",
        "How to read it: the Monte Carlo pass is what GetInsights and the fail-fast "
        "autopilot pay per recomputation, never per request; the Thompson decision is what "
        "each Assign that is not a sticky hit pays in the server's own time (next to the "
        "hundreds of microseconds of server CPU an Assign call costs end to end). "
        "GetInsights' pure compute has no per-request target: the server keeps each "
        "experiment's insights in a cache no older than about a second, recomputed in the "
        "background"
        + (
            f", so one actively read experiment costs about {insights.median / 5:.0f} % "
            "of a core (one recomputation every 0.5 s)"
            if insights is not None and insights.median > 0
            else ""
        )
        + "; its request latency is measured through the real server in the decision-path "
        "section. The two Beta rows compare our sampler with numpy's.",
    ]
    return "\n".join(lines) + "\n"


def write_kernels_section(path: Path, results: KernelResults) -> None:
    replace_section(path, render_kernels_markdown(results), start=KERNELS_START, end=KERNELS_END)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sira_loadtest.bench_kernels")
    parser.add_argument("--runs", type=int, default=21, help="timed runs per figure (21)")
    parser.add_argument("--arms", type=int, default=10, help="arms / variants (10)")
    parser.add_argument("--draws", type=int, default=100_000, help="Monte Carlo draws (100000)")
    parser.add_argument(
        "--write",
        nargs="?",
        const=Path("docs/benchmarks.md"),
        type=Path,
        metavar="PATH",
        help="also write the markdown section into PATH (docs/benchmarks.md)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.arms < 2 or args.draws < 1:
        parser.error("--runs and --draws must be >= 1, --arms >= 2")
    results = measure_kernels(args.runs, args.arms, args.draws)
    print(f"warm_up (compile or load the numba cache)       {results.warm_up_seconds:.2f} s")
    for figure in results.figures:
        print(figure.line())
    if args.write is not None:
        write_kernels_section(args.write, results)
        print(f"wrote the kernels section of {args.write}")


if __name__ == "__main__":
    main()
