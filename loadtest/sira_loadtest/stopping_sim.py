"""Monte Carlo of auto-stop: how often does it conclude wrongly, how fast does it conclude?

Drives the server's own decision code, nothing re-implemented for the new rule:

- each subject gets an arm from `engine.decider.choose_new_arm` (Thompson sampling with the
  warm-up share, plus the exploration share auto-stop turns on: `explore_share`), on
  posteriors refreshed every `REFRESH` subjects, and converts with its arm's true rate;
- the stopping rule `domain.stopping` (vectorised: the same functions the server calls with
  one look) is evaluated after *every* subject; a look every 50 subjects sees the same
  trajectory at every 50th subject only;
- at the first look where the rule acts, `domain.insights.compute_insights` and
  `domain.autopilot.plan` produce the autopilot's step, which is what gets scored.

Up to its first step the allocation does not depend on when the autopilot looks, so one
trajectory serves both cadences exactly. The first step is the one that matters: in a null
cell any step (dropping any arm, crowning any winner) is a wrong conclusion; with two arms
the first step concludes.

The seed's original rule (a variant fails when P(worse than the leader) > 0.95, a winner when
the leader's P(best) >= 0.95, with at least 100 samples each) is scored the same way on the
seed's allocation (Thompson + warm-up, no exploration share), from the server's Monte Carlo
kernel `bayes.monte_carlo_core` at each look.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from sira_server.domain import stopping
from sira_server.domain.autopilot import Plan, plan
from sira_server.domain.bayes import monte_carlo_core, new_rng_state
from sira_server.domain.experiment import (
    Allocation,
    Experiment,
    ExperimentStatus,
    FailFast,
    Reward,
    Variant,
    VariantState,
)
from sira_server.domain.insights import ArmCounts, compute_insights
from sira_server.domain.targeting import TargetingRule
from sira_server.engine.decider import Posterior, choose_new_arm, explore_share

FloatArray = npt.NDArray[np.float64]

REFRESH = 10
"""Subjects between posterior refreshes (batched Thompson sampling, as the server does)."""
INSIGHTS_DRAWS = 8192
"""Monte Carlo draws of the insights behind the autopilot's step (P(best) is only shown)."""
SEED_RULE_DRAWS = 4096
"""Monte Carlo draws per look of the seed's rule (standard error ~0.003 near 0.95)."""
SEED_THRESHOLD = 0.95
NEVER = -1


@dataclass(frozen=True, slots=True)
class Outcome:
    """One run under one rule and cadence."""

    subjects: int
    """Subjects when the first step was taken; NEVER when the rule did not act."""
    wrong: bool
    """The step dropped a best arm or crowned a non-best one; in a null cell, any step."""
    right_winner: bool
    """The step concluded with a best arm as the winner."""
    regret: float
    """Expected conversions lost against always showing a best arm, over the horizon;
    after a conclusion the winner is served to everyone."""


def experiment(arms: int, fail_fast: FailFast) -> Experiment:
    """A running Thompson-sampling experiment with ``arms`` variants, for `plan`."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    variants = tuple(
        Variant(f"v{i}", f"v{i}", f"V{i}", {}, i == 0, 1.0, i, VariantState.ACTIVE)
        for i in range(arms)
    )
    return Experiment(
        id="sim",
        key="sim",
        name="sim",
        description="",
        status=ExperimentStatus.RUNNING,
        targeting=TargetingRule(),
        allocation=Allocation.THOMPSON_SAMPLING,
        exposure_percent=100.0,
        primary_metric="conversion",
        fail_fast=fail_fast,
        reward=Reward.CONVERSION,
        variants=variants,
        created_by="sim",
        created_at=now,
        updated_at=now,
        version=1,
    )


def trajectory(
    rates: FloatArray, horizon: int, explore: float, min_samples: int, seed: int
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """Successes and trials per arm after each subject (shape (horizon, arms)) and the arm
    each subject got, with the server's `choose_new_arm`."""
    k = rates.size
    rng = random.Random(seed)
    state = new_rng_state(seed)
    converts = np.random.default_rng(seed).random(horizon)
    active = np.ones(k, dtype=np.bool_)
    weights = np.ones(k)
    succ = np.zeros(k)
    trials = np.zeros(k)
    shown = np.zeros(k)  # Posterior.prob_best: only the logged propensity uses it
    posterior = Posterior.uniform(active)
    arms = np.empty(horizon, dtype=np.int64)
    won = np.empty(horizon, dtype=np.bool_)
    true_rates = rates.tolist()
    draws = converts.tolist()
    for t in range(horizon):
        if t % REFRESH == 0:
            posterior = Posterior(1.0 + succ, 1.0 + trials - succ, shown)
        arm = choose_new_arm(
            Allocation.THOMPSON_SAMPLING,
            weights,
            active,
            posterior,
            state,
            rng,
            min_samples,
            explore,
        ).index
        trials[arm] += 1.0
        hit = draws[t] < true_rates[arm]
        if hit:
            succ[arm] += 1.0
        arms[t] = arm
        won[t] = hit
    onehot = np.zeros((horizon, k))
    onehot[np.arange(horizon), arms] = 1.0
    return np.cumsum(onehot * won[:, None], axis=0), np.cumsum(onehot, axis=0), arms


def _score(
    rates: FloatArray, arms: npt.NDArray[np.int64], t: int, step: Plan, ids: Sequence[str]
) -> Outcome:
    best = rates.max()
    is_best = [bool(r == best) for r in rates]
    dropped = [ids.index(v) for v in step.drop]
    winner = ids.index(step.winner) if step.winner is not None else -1
    null = bool(rates.min() == best)  # nothing differs: any step is a wrong conclusion
    wrong = null or any(is_best[i] for i in dropped) or (winner >= 0 and not is_best[winner])
    horizon = arms.size
    lost = float(np.sum(best - rates[arms[: t + 1]]))
    if winner >= 0:
        lost += (horizon - t - 1) * float(best - rates[winner])
    else:
        lost += float(np.sum(best - rates[arms[t + 1 :]]))
    return Outcome(t + 1, wrong, winner >= 0 and is_best[winner], lost)


def _never(rates: FloatArray, arms: npt.NDArray[np.int64]) -> Outcome:
    return Outcome(NEVER, False, False, float(np.sum(rates.max() - rates[arms])))


def _counts(ids: Sequence[str], s: FloatArray, n: FloatArray) -> list[ArmCounts]:
    return [
        ArmCounts(v, int(n[i]), int(s[i]), is_control=i == 0, name=v.upper())
        for i, v in enumerate(ids)
    ]


def new_rule_run(
    rates: FloatArray, horizon: int, fail_fast: FailFast, cadences: Sequence[int], seed: int
) -> list[Outcome]:
    """One run of the server's rule: one `Outcome` per cadence (looks every c subjects)."""
    rule = replace(fail_fast, auto_stop=True)
    exp = experiment(rates.size, rule)
    ids = [v.id for v in exp.variants]
    s, n, arms = trajectory(rates, horizon, explore_share(exp), rule.min_samples, seed)
    thr = stopping.log_threshold(rates.size, rule.error_rate)
    log_e = stopping.log_e_values(s, n, rule.min_effect)
    acts = stopping.failing(log_e, n, np.ones(rates.size, dtype=np.bool_), rule.min_samples, thr)
    acting = np.asarray(acts.any(axis=1), dtype=np.bool_)
    out = []
    for cadence in cadences:
        looks = np.flatnonzero(acting[cadence - 1 :: cadence]) * cadence + cadence - 1
        if looks.size == 0:
            out.append(_never(rates, arms))
            continue
        t = int(looks[0])
        insights = compute_insights(_counts(ids, s[t], n[t]), rule, draws=INSIGHTS_DRAWS)
        step = plan(exp, insights)
        if step.empty:  # the verdict acts, so must the autopilot
            raise AssertionError(f"the rule acts at {t + 1} but the plan is empty")
        out.append(_score(rates, arms, t, step, ids))
    return out


def seed_rule_run(rates: FloatArray, horizon: int, cadence: int, seed: int) -> Outcome:
    """One run of the seed's rule on the seed's allocation, looking every ``cadence``."""
    min_samples = 100
    k = rates.size
    ids = [f"v{i}" for i in range(k)]
    s, n, arms = trajectory(rates, horizon, 0.0, min_samples, seed)
    active = np.ones(k, dtype=np.bool_)
    for t in range(cadence - 1, horizon, cadence):
        if n[t].min() < min_samples and not (n[t] >= min_samples).any():
            continue
        alpha, beta = 1.0 + s[t], 1.0 + n[t] - s[t]
        prob_best, prob_worse, _, _ = monte_carlo_core(
            alpha, beta, active, -1, SEED_RULE_DRAWS, seed + t
        )
        fails = [i for i in range(k) if n[t, i] >= min_samples and prob_worse[i] > SEED_THRESHOLD]
        leader = int(np.argmax(alpha / (alpha + beta)))
        if n[t].min() >= min_samples and prob_best[leader] >= SEED_THRESHOLD:
            return _score(rates, arms, t, Plan(winner=ids[leader]), ids)
        if fails:
            rest = [ids[i] for i in range(k) if i not in fails]
            winner = rest[0] if len(rest) == 1 else None
            return _score(rates, arms, t, Plan(tuple(ids[i] for i in fails), winner), ids)
    return _never(rates, arms)
