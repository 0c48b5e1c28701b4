"""Microbenchmark of the statistics kernels (no server, no network).

    python -m sira_loadtest.bench_kernels [--runs 21] [--arms 10] [--draws 100000]

Prints, each as the median over ``--runs`` timed runs after a warm-up:
- one Monte Carlo pass (arms x draws), the work behind P(best), P(worse) and expected loss;
- one Thompson decision over the arms, Python call included (what Assign pays);
- the pure compute of GetInsights for that many variants (one pass with lift draws and
  their quantiles, exact guardrail comparisons and credible intervals, SRM, recommendation);
- numpy's own Beta sampler per draw, for comparison.
Machine noise shows as the gap between median and min: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from sira_server.domain import bayes
from sira_server.domain.experiment import Allocation, Reward
from sira_server.domain.insights import ArmCounts, compute_insights

THOMPSON_BATCH = 10_000


def _timings(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _line(label: str, seconds: Sequence[float], scale: float, unit: str) -> str:
    med, best = statistics.median(seconds) * scale, min(seconds) * scale
    return f"{label:<46} median {med:9.3f} {unit}   min {best:9.3f} {unit}"


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sira_loadtest.bench_kernels")
    parser.add_argument("--runs", type=int, default=21, help="timed runs per figure (21)")
    parser.add_argument("--arms", type=int, default=10, help="arms / variants (10)")
    parser.add_argument("--draws", type=int, default=100_000, help="Monte Carlo draws (100000)")
    args = parser.parse_args(argv)
    runs, k, draws = args.runs, args.arms, args.draws

    start = time.perf_counter()
    bayes.warm_up()
    print(f"warm_up (compile or load the numba cache)       {time.perf_counter() - start:.2f} s")

    arms = _arms(k)
    successes = np.array([a.converted_subjects for a in arms], dtype=np.float64)
    trials = np.array([a.assigned_subjects for a in arms], dtype=np.float64)
    alpha, beta = 1.0 + successes, 1.0 + trials - successes
    active = np.ones(k, dtype=np.bool_)

    seeds = iter(range(1, 10 * runs + 10))
    mc = _timings(lambda: bayes.monte_carlo_pass(alpha, beta, draws, next(seeds)), runs)
    print(_line(f"Monte Carlo pass {k} arms x {draws} draws", mc, 1e3, "ms"))

    state = bayes.new_rng_state(12345)

    def decisions() -> None:
        for _ in range(THOMPSON_BATCH):
            bayes.thompson_choose(alpha, beta, active, state)

    th = _timings(decisions, runs)
    print(_line(f"Thompson decision over {k} arms", th, 1e6 / THOMPSON_BATCH, "us"))

    def insights() -> None:
        compute_insights(
            arms, reward=Reward.CONVERSION_NOT_REFUNDED, allocation=Allocation.FIXED_WEIGHTS
        )

    insights()
    gi = _timings(insights, max(3, runs // 3))
    print(_line(f"GetInsights pure compute, {k} variants", gi, 1e3, "ms"))

    rng = np.random.default_rng(0)
    n = 1_000_000
    nb = _timings(lambda: rng.beta(alpha[0], beta[0], size=n), 5)
    print(_line("numpy Beta sampler, per draw", nb, 1e9 / n, "ns"))
    per_draw = [t / (k * draws) for t in mc]
    print(_line("our Beta draw inside the Monte Carlo pass", per_draw, 1e9, "ns"))


if __name__ == "__main__":
    main()
