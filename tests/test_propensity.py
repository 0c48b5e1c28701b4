"""Exact Thompson propensities (`domain.propensity`): against scipy's adaptive quadrature
down to P = 1e-5, and as inverse-propensity weights on simulated choices."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from scipy import integrate, stats

from sira_server.domain.bayes import monte_carlo_core, new_rng_state, thompson_choose
from sira_server.domain.experiment import Allocation
from sira_server.domain.propensity import thompson_propensities
from sira_server.engine.decider import EXPLORE_SHARE, Posterior, choose_new_arm


def _counts(successes: list[int], trials: list[int]) -> tuple[np.ndarray, np.ndarray]:
    s = np.array(successes, dtype=np.float64)
    n = np.array(trials, dtype=np.float64)
    return 1.0 + s, 1.0 + n - s


def _scipy_prob(alpha: np.ndarray, beta: np.ndarray, active: np.ndarray, i: int) -> float:
    """integral of f_i * prod F_j by scipy.integrate.quad, with break points at each arm's
    bulk and tails so that the adaptive rule sees every peak."""
    others = [j for j in range(alpha.size) if j != i and active[j]]

    def integrand(x: float) -> float:
        value = stats.beta.pdf(x, alpha[i], beta[i])
        for j in others:
            value *= stats.beta.cdf(x, alpha[j], beta[j])
        return float(value)

    live = [j for j in range(alpha.size) if active[j]]
    cuts = sorted(
        {
            float(stats.beta.ppf(q, alpha[j], beta[j]))
            for j in live
            for q in (1e-9, 1e-6, 1e-3, 0.05, 0.5, 0.95, 1 - 1e-3, 1 - 1e-6, 1 - 1e-9)
        }
    )
    edges = [0.0, *[c for c in cuts if 0.0 < c < 1.0], 1.0]
    return sum(
        integrate.quad(integrand, lo, hi, epsabs=0.0, epsrel=1e-10, limit=200)[0]
        for lo, hi in itertools.pairwise(edges)
    )


CASES = [
    ([200, 137], [2000, 2000]),  # the arm: P ~ 1.65e-4
    ([200, 128], [2000, 2000]),  # P ~ 1e-5
    ([44, 84], [998, 998]),  # the seed's blue and green
    ([30, 3, 31, 29], [300, 300, 300, 300]),  # one hopeless arm among close ones
    ([5, 9, 0], [40, 41, 3]),  # small counts, an arm with almost no data
    ([1, 1, 1, 1, 1], [2, 2, 2, 2, 2]),  # equal arms
]


@pytest.mark.parametrize(("successes", "trials"), CASES)
def test_matches_scipy_quadrature_within_one_percent(
    successes: list[int], trials: list[int]
) -> None:
    alpha, beta = _counts(successes, trials)
    active = np.ones(alpha.size, dtype=np.bool_)
    got = thompson_propensities(alpha, beta, active)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    for i in range(alpha.size):
        exact = _scipy_prob(alpha, beta, active, i)
        if exact >= 1e-5:
            assert got[i] == pytest.approx(exact, rel=0.01), i
        else:
            assert got[i] == pytest.approx(exact, rel=0.01, abs=1e-7), i


def test_reaches_one_in_a_hundred_thousand() -> None:
    alpha, beta = _counts([200, 128], [2000, 2000])
    p = thompson_propensities(alpha, beta, np.ones(2, dtype=np.bool_))[1]
    assert 3e-6 < p < 3e-5


def test_inactive_arms_get_zero_and_do_not_compete() -> None:
    alpha, beta = _counts([30, 60, 31], [300, 300, 300])
    active = np.array([True, False, True])
    got = thompson_propensities(alpha, beta, active)
    assert got[1] == 0.0
    assert got[0] == pytest.approx(_scipy_prob(alpha, beta, active, 0), rel=0.01)
    assert got[0] + got[2] == pytest.approx(1.0)
    only = thompson_propensities(alpha, beta, np.array([False, True, False]))
    assert only.tolist() == [0.0, 1.0, 0.0]


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="positive"):
        thompson_propensities([0.0, 1.0], [1.0, 1.0], [True, True])
    with pytest.raises(ValueError, match="same length"):
        thompson_propensities([1.0], [1.0, 1.0], [True, True])


def test_inverse_propensity_weights_average_one_at_p_1e_3() -> None:
    """The issue's check: over simulated Thompson choices, mean of 1[chose i] / p_i is 1
    within sampling error. 4M joint draws from the server's Beta sampler (the kernel
    behind `thompson_choose`): the mean's standard error is sqrt((1 - p) / (N p)) ~ 0.016."""
    alpha, beta = _counts([200, 145], [2000, 2000])
    p = thompson_propensities(alpha, beta, np.ones(2, dtype=np.bool_))
    assert 5e-4 < p[1] < 2e-3
    draws = 4_000_000
    frequency, _, _, _ = monte_carlo_core(alpha, beta, np.ones(2, dtype=np.bool_), -1, draws, 11)
    for i in range(2):
        weight_mean = frequency[i] / p[i]  # (1/N) sum 1[chose i] / p_i
        se = math.sqrt((1 - p[i]) / (draws * p[i]))
        assert abs(weight_mean - 1.0) < 4 * se, (i, weight_mean, se)


def test_thompson_choose_frequencies_match() -> None:
    """The same through `thompson_choose` itself (the Assign kernel), at P ~ 1e-2."""
    alpha, beta = _counts([200, 160], [2000, 2000])
    active = np.ones(2, dtype=np.bool_)
    p = thompson_propensities(alpha, beta, active)[1]
    state = new_rng_state(5)
    n = 300_000
    hits = sum(thompson_choose(alpha, beta, active, state) == 1 for _ in range(n))
    se = math.sqrt((1 - p) / (n * p))
    assert abs(hits / (n * p) - 1.0) < 4 * se


def test_logged_propensity_under_auto_stop_is_the_choice_frequency() -> None:
    """`choose_new_arm` with the exploration share (auto-stop) and one arm in warm-up:
    the propensity it logs for each arm is the frequency with which it picks that arm."""
    alpha, beta = _counts([20, 40, 2], [400, 400, 30])
    active = np.ones(3, dtype=np.bool_)
    posterior = Posterior(alpha, beta, thompson_propensities(alpha, beta, active))
    state, rng = new_rng_state(3), random.Random(3)
    n = 40_000
    counts = np.zeros(3)
    logged = np.zeros(3)
    for _ in range(n):
        choice = choose_new_arm(
            Allocation.THOMPSON_SAMPLING, np.ones(3), active, posterior, state, rng, 100, 0.8
        )
        counts[choice.index] += 1
        logged[choice.index] = choice.propensity
    assert EXPLORE_SHARE == 0.8
    assert logged.sum() == pytest.approx(1.0, rel=1e-9)
    for i in range(3):
        se = math.sqrt(logged[i] * (1 - logged[i]) / n)
        assert abs(counts[i] / n - logged[i]) < 4 * se, (i, counts[i] / n, logged[i])
