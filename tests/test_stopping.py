"""The always-valid stopping rule (`domain.stopping`) and a small run of the stopping
simulation (`sira_loadtest.stopping_sim`, the full one writes docs/stopping.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from sira_loadtest.stopping_sim import new_rule_run
from sira_server.domain import stopping
from sira_server.domain.experiment import FailFast


def _mixture(d: float, v: float, tau: float) -> float:
    """The normal-mixture likelihood ratio of Johari et al. (2017), in closed form."""
    return math.sqrt(v / (v + tau**2)) * math.exp(tau**2 * d**2 / (2 * v * (v + tau**2)))


def test_log_e_values_are_the_mixture_over_scales() -> None:
    s, n = np.array([44.0, 84.0]), np.array([998.0, 998.0])
    got = stopping.log_e_values(s, n, 0.02)
    pooled = (44 + 84 + 1) / (998 + 998 + 2)
    v = pooled * (1 - pooled) * (2 / 998)
    d = 84 / 998 - 44 / 998
    expected = sum(w * _mixture(d, v, m * 0.02) for m, w in stopping.SCALES)
    assert got[0, 1] == pytest.approx(math.log(expected), rel=1e-12)
    assert got[1, 0] == 0.0  # only the worse-than direction carries evidence
    assert got[0, 0] == 0.0
    assert sum(w for _, w in stopping.SCALES) == pytest.approx(1.0)


def test_no_trials_no_evidence_and_equal_rates_little() -> None:
    got = stopping.log_e_values([0.0, 5.0, 50.0], [0.0, 100.0, 1000.0], 0.02)
    assert np.all(got[0, :] == 0.0)
    assert np.all(got[:, 0] == 0.0)
    assert got[1, 2] == 0.0  # 5 % each: no direction
    assert got[2, 1] == 0.0


def test_threshold_shares_the_error_rate_over_pairs() -> None:
    assert stopping.log_threshold(2, 0.05) == pytest.approx(math.log(20))
    assert stopping.log_threshold(4, 0.05) == pytest.approx(math.log(6 / 0.05))
    with pytest.raises(ValueError, match="error_rate"):
        stopping.log_threshold(2, 0.0)


def test_verdict_drops_the_loser_and_names_the_winner() -> None:
    v = stopping.verdict(
        [44, 84], [998, 998], [True, True], error_rate=0.05, min_effect=0.02, min_samples=100
    )
    assert v.failing == (0,)
    assert v.worse == (True, False)
    assert v.winner == 1
    assert v.e_values[0] >= v.threshold == pytest.approx(20.0)
    assert v.log_e_value[0] == pytest.approx(v.log_e_value[1])  # one pair, both ends


def test_verdict_waits_for_min_samples_and_ignores_dropped_arms() -> None:
    short = stopping.verdict(
        [44, 84], [998, 998], [True, True], error_rate=0.05, min_effect=0.02, min_samples=1000
    )
    assert short.failing == ()
    assert short.winner == -1
    dropped = stopping.verdict(
        [10, 300, 310],
        [1000, 3000, 3000],
        [False, True, True],
        error_rate=0.05,
        min_effect=0.02,
        min_samples=100,
    )
    assert dropped.failing == ()  # the two active arms tie
    assert dropped.worse == (True, False, False)  # still reported as worse
    assert dropped.winner == -1


def test_a_small_null_run_keeps_its_error_rate() -> None:
    """A few hundred runs of the server's own allocation, rule and autopilot plan, two
    equal arms at 6 %, looking after every subject (the most looks): the 97.5 % upper
    confidence bound of the wrong-conclusion rate is below 10 % (the guarantee is 5 %;
    the seed's rule makes ~37 % wrong conclusions in this cell)."""
    runs = 300
    rates = np.array([0.06, 0.06])
    wrong = 0
    for seed in range(runs):
        (outcome,) = new_rule_run(rates, 1200, FailFast(), (1,), 9000 + seed)
        wrong += outcome.wrong
    upper = float(stats.beta.ppf(0.975, wrong + 1, runs - wrong))
    assert upper < 0.10, (wrong, upper)
