"""How much the server's bandit loses against always showing the best variant.

    python -m sira_loadtest.bandit_report [--seeds 20] [--horizon 20000] [--batch 200]

Simulates cumulative (pseudo-)regret, the expected conversions lost against an oracle that
always picks the best arm, for:

- Thompson sampling as the server runs it: the real kernel `bayes.thompson_choose` on
  Beta(1 + successes, 1 + failures) posteriors that are refreshed only every ``--batch``
  decisions (the server refreshes every 200 ms, so 200 decisions is 1,000 Assign/s);
- the same with a refresh after every decision (the unbatched textbook algorithm);
- uniform random allocation (a classic A/B test);
- the oracle (regret 0 by definition).

Pseudo-regret sums ``best rate - rate of the chosen arm`` over decisions: it depends on the
choices only, not on the coin flips, so the curves are smooth with a few seeds. Rewards are
still drawn (numpy, seeded) because they drive the posteriors. Writes
``docs/bandit-regret.png`` and ``docs/bandit.md``.
"""

from __future__ import annotations

import argparse
import random
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sira_server.domain.bayes import new_rng_state, thompson_choose, warm_up
from sira_server.domain.experiment import Allocation
from sira_server.engine.decider import Posterior, choose_new_arm

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DOCS = Path(__file__).resolve().parents[2] / "docs"
MIN_SAMPLES = 100
"""The server's default fail-fast min_samples: a variant below it is never flagged."""


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    rates: tuple[float, ...]
    """True conversion rate per arm."""

    @property
    def title(self) -> str:
        return f"{self.name}: " + " vs ".join(f"{100 * r:g}%" for r in self.rates)


SCENARIOS = (
    Scenario("2 arms, close", (0.045, 0.050)),
    Scenario("2 arms, far", (0.045, 0.085)),
    Scenario("5 arms", (0.03, 0.04, 0.05, 0.06, 0.07)),
)


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    batch: int
    """Decisions between posterior refreshes; 0 for uniform allocation."""
    warm_up: bool = False
    """The server's warm-up share for arms short of min_samples (engine.decider)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """One policy on one scenario, over every seed."""

    policy: str
    regret: FloatArray
    """Cumulative pseudo-regret, shape (seeds, horizon)."""
    pulls: IntArray
    """Decisions per arm at the end, shape (seeds, arms)."""


def simulate(
    rates: FloatArray, policy: Policy, horizon: int, seed: int
) -> tuple[FloatArray, IntArray]:
    """One run: the cumulative pseudo-regret after each decision and the pulls per arm."""
    rng = np.random.default_rng(seed)
    arms = rates.size
    if policy.batch == 0:
        chosen = rng.integers(0, arms, size=horizon)
    else:
        state = new_rng_state(seed)
        active = np.ones(arms, dtype=np.bool_)
        wins = np.zeros(arms)
        trials = np.zeros(arms)
        alpha, beta = np.ones(arms), np.ones(arms)
        chosen = np.empty(horizon, dtype=np.int64)
        converts = rng.random(horizon)
        ones = np.ones(arms)
        py_rng = random.Random(seed)
        for t in range(horizon):
            if t % policy.batch == 0:  # the refresh: posteriors as of the last batch
                alpha, beta = 1.0 + wins, 1.0 + trials - wins
            if policy.warm_up:  # exactly the server's choice (propensity unused here)
                posterior = Posterior(alpha, beta, np.zeros(arms))
                choice = choose_new_arm(
                    Allocation.THOMPSON_SAMPLING,
                    ones,
                    active,
                    posterior,
                    state,
                    py_rng,
                    MIN_SAMPLES,
                )
                arm = choice.index
            else:
                arm = int(thompson_choose(alpha, beta, active, state))
            chosen[t] = arm
            trials[arm] += 1.0
            wins[arm] += float(converts[t] < rates[arm])
    regret = np.cumsum(rates.max() - rates[chosen])
    pulls = np.bincount(chosen, minlength=arms).astype(np.int64)
    return regret, pulls


def run_scenario(
    scenario: Scenario, policies: Sequence[Policy], horizon: int, seeds: Sequence[int]
) -> list[Outcome]:
    rates = np.asarray(scenario.rates, dtype=np.float64)
    outcomes = []
    for policy in policies:
        runs = [simulate(rates, policy, horizon, seed) for seed in seeds]
        outcomes.append(
            Outcome(
                policy.name,
                np.stack([regret for regret, _ in runs]),
                np.stack([pulls for _, pulls in runs]),
            )
        )
    return outcomes


def plot(results: Sequence[tuple[Scenario, list[Outcome]]], path: Path, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "uniform": "#d62728",
        "thompson": "#1f77b4",
        "no-warm-up": "#9467bd",
        "unbatched": "#2ca02c",
    }
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.4), dpi=110)
    for ax, (scenario, outcomes) in zip(np.atleast_1d(axes), results, strict=True):
        horizon = outcomes[0].regret.shape[1]
        x = np.arange(1, horizon + 1)
        for outcome in outcomes:
            kind = _kind(outcome.policy)
            mean = outcome.regret.mean(axis=0)
            low, high = np.quantile(outcome.regret, [0.1, 0.9], axis=0)
            ax.plot(
                x,
                mean,
                color=colours[kind],
                label=outcome.policy,
                linewidth=1.4 if kind in ("unbatched", "no-warm-up") else 2.2,
                linestyle=":" if kind in ("unbatched", "no-warm-up") else "-",
                zorder=3 if kind == "unbatched" else 2,
            )
            if kind in ("uniform", "thompson"):  # other bands would hide the server's
                ax.fill_between(x, low, high, color=colours[kind], alpha=0.15, linewidth=0)
        ax.axhline(0.0, color="black", linewidth=1.0, linestyle="--", label="oracle (best arm)")
        ax.set_title(scenario.title, fontsize=10)
        ax.set_xlabel("decisions")
        ax.set_ylabel("cumulative regret (conversions lost)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        "Cumulative regret: mean (line) and 10-90% of runs (band) over "
        f"{results[0][1][0].regret.shape[0]} seeds "
        f"(server: posteriors refreshed every {batch} decisions)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _kind(policy: str) -> str:
    if policy.startswith("uniform"):
        return "uniform"
    if "without warm-up" in policy:
        return "no-warm-up"
    return "unbatched" if "every decision" in policy else "thompson"


def markdown(
    results: Sequence[tuple[Scenario, list[Outcome]]],
    *,
    horizon: int,
    seeds: int,
    batch: int,
    seconds: float,
    image: str,
) -> str:
    names = [o.policy for o in results[0][1]]
    lines = [
        "# Bandit quality: cumulative regret",
        "",
        *_para(
            "Generated by `python -m sira_loadtest.bandit_report` "
            f"({seeds} seeds x {horizon:,} decisions per scenario, {seconds:.0f} s). "
            "Do not edit by hand: rerun it."
        ),
        *_para(
            "**Regret** is the expected number of conversions lost against an oracle that "
            "always shows the best variant (regret 0): the sum over decisions of `best rate - "
            "rate of the variant shown`. It counts what the experiment costs while it learns. "
            "Uniform allocation (a classic A/B test) pays a fixed price per decision forever; a "
            "good bandit's regret flattens once it knows the winner."
        ),
        *_para(
            "The server's policy is `engine.decider.choose_new_arm` itself: the real numba "
            "kernel `bayes.thompson_choose` (plus the warm-up share described below), one "
            "Beta(1 + successes, 1 + failures) draw per arm per "
            f"decision, on posteriors refreshed only every {batch} decisions (the server "
            f"refreshes every 200 ms from Redis, so {batch} decisions per refresh is "
            f"{batch * 5:,} Assign/s; at lower traffic the batches are smaller and the policy "
            "gets closer to the unbatched one). The unbatched line updates after every "
            "decision: the gap between the two is the price of batching."
        ),
        "## Final regret",
        "",
        *_para(
            f"Mean cumulative regret after {horizon:,} decisions ± its standard error, the "
            "10th-90th percentile over runs in parentheses, and the share of decisions that "
            "went to the best arm. Regret varies a lot from run to run when the arms are close "
            "(an early unlucky streak costs thousands of decisions): compare means within "
            "their standard errors."
        ),
        "| scenario | " + " | ".join(names) + " | oracle |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for scenario, outcomes in results:
        cells = []
        best = int(np.argmax(scenario.rates))
        for o in outcomes:
            final = o.regret[:, -1]
            low, high = np.quantile(final, [0.1, 0.9])
            share = o.pulls[:, best].sum() / o.pulls.sum()
            se = final.std(ddof=1) / np.sqrt(final.size) if final.size > 1 else 0.0
            cells.append(
                f"{final.mean():.1f} ± {se:.1f} ({low:.1f}-{high:.1f}), best arm {100 * share:.0f}%"
            )
        lines.append(f"| {scenario.title} | " + " | ".join(cells) + " | 0 |")
    lines += [
        "",
        f"![Cumulative regret per scenario]({image})",
        "",
        "## Reading it",
        "",
    ]
    for scenario, outcomes in results:
        uniform = next(o for o in outcomes if _kind(o.policy) == "uniform")
        server = next(o for o in outcomes if _kind(o.policy) == "thompson")
        saved = 1.0 - server.regret[:, -1].mean() / uniform.regret[:, -1].mean()
        unbatched = next(o for o in outcomes if _kind(o.policy) == "unbatched")
        gap = server.regret[:, -1] - unbatched.regret[:, -1]
        gap_se = gap.std(ddof=1) / np.sqrt(gap.size) if gap.size > 1 else 0.0
        lines.append(
            f"- **{scenario.title}**: the server's Thompson sampling loses "
            f"{server.regret[:, -1].mean():.1f} conversions against "
            f"{uniform.regret[:, -1].mean():.1f} for uniform allocation "
            f"({100 * saved:.0f}% less); batching costs {gap.mean():+.1f} ± {gap_se:.1f} "
            "against the unbatched policy."
        )
    lines += [
        "",
        "## Starved arms and fail-fast",
        "",
        *_para(
            "A bandit spends little on arms it believes are worse: that is where its low "
            "regret comes from. The fail-fast rule, however, only flags a variant with at "
            f"least `min_samples` (default {MIN_SAMPLES}) subjects, and a winner is only "
            "declared once every active variant has them. Plain Thompson sampling can leave "
            "an arm that looked bad early below `min_samples` for a long time, and auto-stop "
            "then waits with it. The server therefore gives 10 % of new subjects uniformly to "
            "active arms still short of `min_samples` (its warm-up share, "
            "`engine/decider.py`). Runs (out of "
            f"{seeds}) in which some arm still had fewer than {MIN_SAMPLES} subjects after "
            f"{horizon:,} decisions, and the fewest subjects any arm had (the simulation never "
            "drops an arm):"
        ),
        "| scenario | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for scenario, outcomes in results:
        cells = [
            f"{int((o.pulls.min(axis=1) < MIN_SAMPLES).sum())} (fewest: {int(o.pulls.min())})"
            for o in outcomes
        ]
        lines.append(f"| {scenario.title} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## With auto-stop on",
        "",
        *_para(
            "The policies above are the server's with auto-stop off. With auto-stop on, "
            "the server also spreads 80 % of new subjects evenly over the active arms until "
            "the always-valid stopping rule concludes: without that evidence on the losing "
            "arm no valid test can conclude within a few thousand subjects. Its regret, "
            "subjects needed and error rate against the seed's rule: `stopping.md`."
        ),
    ]
    return "\n".join(lines)


def _para(text: str) -> list[str]:
    """One markdown paragraph, wrapped, with its blank line."""
    return [*textwrap.wrap(text, width=90, break_on_hyphens=False), ""]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sira_loadtest.bandit_report",
        description="Simulate the regret of the server's Thompson sampling; write "
        "docs/bandit.md and docs/bandit-regret.png.",
    )
    parser.add_argument("--seeds", type=int, default=120, help="runs per policy and scenario")
    parser.add_argument("--horizon", type=int, default=20_000, help="decisions per run")
    parser.add_argument("--batch", type=int, default=200, help="decisions per refresh")
    parser.add_argument(
        "--base-seed", type=int, default=147, help="first seed (fixed: the report is reproducible)"
    )
    parser.add_argument("--out-dir", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    if min(args.seeds, args.horizon, args.batch) < 1:
        parser.error("--seeds, --horizon and --batch must be positive")

    started = time.perf_counter()
    warm_up()
    policies = (
        Policy("uniform", 0),
        Policy(f"server: Thompson + warm-up, refresh every {args.batch}", args.batch, True),
        Policy(f"Thompson without warm-up, refresh every {args.batch}", args.batch),
        Policy("Thompson, refresh every decision", 1),
    )
    seeds = [args.base_seed + i for i in range(args.seeds)]
    results = []
    for scenario in SCENARIOS:
        results.append((scenario, run_scenario(scenario, policies, args.horizon, seeds)))
        print(f"{scenario.title}: done ({time.perf_counter() - started:.1f} s)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    image = args.out_dir / "bandit-regret.png"
    plot(results, image, args.batch)
    text = markdown(
        results,
        horizon=args.horizon,
        seeds=args.seeds,
        batch=args.batch,
        seconds=time.perf_counter() - started,
        image=image.name,
    )
    (args.out_dir / "bandit.md").write_text(text)
    print(f"wrote {image} and {args.out_dir / 'bandit.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
