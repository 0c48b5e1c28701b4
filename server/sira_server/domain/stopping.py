"""The stopping rule behind auto-stop: always-valid pairwise tests on conversion counts.

A rule that stops when a posterior probability crosses 0.95 is checked again at every look,
and every look is another chance to cross it by luck: under continuous monitoring it picks
a "winner" in over a third of experiments where nothing differs. This rule instead bounds
the probability of *ever* drawing a wrong conclusion, however often it is evaluated.

For each pair of variants (i, j) it computes the mixture sequential probability ratio
(mSPRT, Robbins 1970; Johari, Koomen, Pekelis & Walsh, "Peeking at A/B tests", KDD 2017) of
the difference of their conversion rates, d = p_j - p_i, against d = 0:

    V = p0 (1 - p0) (1/n_i + 1/n_j)       (p0 the pooled rate: the variance under d = 0)
    D = s_j / n_j - s_i / n_i
    L = sqrt(V / (V + tau^2)) * exp(tau^2 D^2 / (2 V (V + tau^2)))

the likelihood ratio of a N(0, tau^2) mixture of effects against no effect. Under d = 0 it
is a nonnegative martingale with mean 1, so by Ville's inequality it exceeds 1/a at *some*
look with probability at most a, whatever the looks. Only counts enter: the allocation of
subjects to arms (Thompson sampling, adaptive) cancels out of the likelihood ratio, as it
depends on past data only.

A single tau detects effects near tau fastest but large effects slowly (the exponent grows
like tau^2 D^2), so the rule averages L over scales (`SCALES`): half the weight on the
experiment's ``min_effect``, the rest on 2, 4 and 8 times it. An average of e-values is
an e-value, so the guarantee is unchanged; the cost is log 2 on effects near min_effect.

Several variants: ``m = k (k - 1) / 2`` pairs share the error rate (Bonferroni): a pair is
decided when ``L >= m / error_rate``. A decided pair says the variant with the lower rate is
worse; a variant worse than another active one *fails* (auto-stop drops it), and when one
active variant is left it wins. Variants below ``min_samples`` are not judged (the normal
approximation of the mixture needs a few conversions).

Everything here is vectorised over leading axes so that the stopping simulation
(``sira_loadtest.stopping_report``) runs this very code on whole trajectories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_ERROR_RATE",
    "DEFAULT_MIN_EFFECT",
    "StoppingVerdict",
    "failing",
    "log_e_values",
    "log_threshold",
    "verdict",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

DEFAULT_ERROR_RATE = 0.05
"""Bound on the probability that auto-stop ever drops or crowns a variant wrongly."""
DEFAULT_MIN_EFFECT = 0.02
"""Mixing scale tau: the absolute difference in conversion rate detected fastest."""
SCALES = ((1.0, 0.5), (2.0, 0.25), (4.0, 0.125), (8.0, 0.125))
"""(multiple of min_effect, weight) of the mixture over scales; weights sum to 1."""


def log_threshold(variants: int, error_rate: float) -> float:
    """log(m / error_rate), m the number of pairs among ``variants`` (at least one)."""
    if not 0.0 < error_rate < 1.0:
        raise ValueError(f"error_rate must be in (0, 1), got {error_rate}")
    pairs = max(variants * (variants - 1) // 2, 1)
    return math.log(pairs / error_rate)


def log_e_values(successes: npt.ArrayLike, trials: npt.ArrayLike, min_effect: float) -> FloatArray:
    """log L (averaged over `SCALES`) for every ordered pair, shape ``(..., k, k)``: entry
    ``[i, j]`` is the pair's log mixture ratio when variant i's observed rate is below j's
    (evidence that i is worse than j), else 0. Pairs where either arm has no trial get 0."""
    if not min_effect > 0.0:
        raise ValueError(f"min_effect must be positive, got {min_effect}")
    s = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    si, sj = s[..., :, None], s[..., None, :]
    ni, nj = n[..., :, None], n[..., None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        both = (ni > 0) & (nj > 0)
        pooled = (si + sj + 1.0) / (ni + nj + 2.0)  # never 0 or 1: V stays positive
        v = pooled * (1.0 - pooled) * (1.0 / ni + 1.0 / nj)
        diff = sj / nj - si / ni
        terms = []
        for multiple, weight in SCALES:
            t2 = (multiple * min_effect) ** 2
            terms.append(
                math.log(weight)
                + 0.5 * np.log(v / (v + t2))
                + t2 * diff * diff / (2.0 * v * (v + t2))
            )
        log_l = np.logaddexp.reduce(np.stack(terms), axis=0)
    out: FloatArray = np.where(both & (diff > 0.0), log_l, 0.0)
    return out


def failing(
    log_e: FloatArray,
    trials: npt.ArrayLike,
    active: npt.ArrayLike,
    min_samples: int,
    log_thr: float,
    *,
    dropped_too: bool = False,
) -> BoolArray:
    """Per variant, shape ``(..., k)``: active, judged (>= min_samples) and decided worse than
    another active judged variant. With ``dropped_too``, inactive variants are judged as
    well (against the active ones): what insights report for a dropped variant."""
    n = np.asarray(trials)
    judged = n >= min_samples
    on = np.asarray(active, dtype=np.bool_) & judged
    rows = judged if dropped_too else on
    pair_on = rows[..., :, None] & on[..., None, :]
    decided = (log_e >= log_thr) & pair_on
    out: BoolArray = np.asarray(decided.any(axis=-1), dtype=np.bool_)
    return out


@dataclass(frozen=True, slots=True)
class StoppingVerdict:
    """What the rule concludes now, with its own statistic per variant."""

    log_e_value: tuple[float, ...]
    """Per variant: for a variant below the leader, the largest log L against an active
    variant with a higher rate (evidence it is worse); for the leader, the smallest log L
    against the other active variants (evidence it beats all of them)."""
    log_threshold: float
    """log(pairs / error_rate): a pair is decided at or above it."""
    failing: tuple[int, ...]
    """Indices of active variants decided worse than another active variant."""
    worse: tuple[bool, ...]
    """Per variant, active or dropped: decided worse than an active variant."""
    winner: int
    """The only active variant not failing, when the others all fail; else -1."""
    error_rate: float

    @property
    def e_values(self) -> tuple[float, ...]:
        return tuple(math.exp(min(x, 700.0)) for x in self.log_e_value)

    @property
    def threshold(self) -> float:
        return math.exp(self.log_threshold)


def verdict(
    successes: npt.ArrayLike,
    trials: npt.ArrayLike,
    active: npt.ArrayLike,
    *,
    error_rate: float,
    min_effect: float,
    min_samples: int,
) -> StoppingVerdict:
    """The rule on one experiment's counts (1-D arrays in variant order)."""
    s = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    on = np.asarray(active, dtype=np.bool_)
    k = s.size
    thr = log_threshold(k, error_rate)
    log_e = log_e_values(s, n, min_effect)
    fails = failing(log_e, n, on, min_samples, thr)
    worse = failing(log_e, n, on, min_samples, thr, dropped_too=True)
    live = [i for i in range(k) if on[i]]
    rates = np.where(n > 0, s / np.maximum(n, 1.0), 0.0)
    leader = max(live, key=lambda i: (rates[i], -i)) if live else -1
    stat: list[float] = []
    for i in range(k):
        others = [j for j in live if j != i]
        if not others:
            stat.append(0.0)
        elif i == leader:
            stat.append(float(min(log_e[j, i] for j in others)))
        else:
            stat.append(float(max(log_e[i, j] for j in others)))
    failing_idx = tuple(i for i in live if fails[i])
    remaining = [i for i in live if not fails[i]]
    winner = remaining[0] if failing_idx and len(remaining) == 1 else -1
    return StoppingVerdict(
        tuple(stat), thr, failing_idx, tuple(bool(x) for x in worse), winner, error_rate
    )
