"""The arm a new subject gets, and the propensity logged with it.

The key property: the logged propensity is the probability the choice really had,
checked by simulation (chi-square against the empirical frequencies).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import stats

from sira_server.domain.bayes import monte_carlo_core, new_rng_state
from sira_server.domain.experiment import Allocation
from sira_server.engine.decider import (
    WARM_UP_SHARE,
    Posterior,
    choose_new_arm,
)

DRAWS = 20_000


def posterior(trials: list[int], successes: list[int], active: np.ndarray) -> Posterior:
    s = np.array(successes, dtype=np.float64)
    n = np.array(trials, dtype=np.float64)
    alpha, beta = 1.0 + s, 1.0 + n - s
    prob_best, _, _, _ = monte_carlo_core(alpha, beta, active, -1, 200_000, 7)
    return Posterior(alpha, beta, prob_best)


def simulate(
    post: Posterior, active: np.ndarray, min_samples: int, n: int = DRAWS
) -> tuple[np.ndarray, dict[int, float]]:
    rng_state = new_rng_state(11)
    rng = random.Random(5)
    counts = np.zeros(active.size, dtype=np.int64)
    propensities: dict[int, float] = {}
    weights = np.ones(active.size)
    for _ in range(n):
        choice = choose_new_arm(
            Allocation.THOMPSON_SAMPLING, weights, active, post, rng_state, rng, min_samples
        )
        counts[choice.index] += 1
        propensities[choice.index] = choice.propensity
    return counts, propensities


def assert_frequencies_match(counts: np.ndarray, propensities: dict[int, float]) -> None:
    arms = sorted(propensities)
    expected = np.array([propensities[i] for i in arms])
    assert expected.sum() == pytest.approx(1.0, abs=0.01)
    observed = counts[arms]
    _, p_value = stats.chisquare(observed, expected / expected.sum() * observed.sum())
    assert p_value > 1e-4, (observed, expected)


def test_thompson_propensity_is_the_probability_of_the_draw() -> None:
    active = np.array([True, True, True])
    post = posterior([400, 400, 400], [20, 28, 24], active)
    counts, propensities = simulate(post, active, min_samples=100)
    for index, p in propensities.items():
        assert p == pytest.approx(float(post.prob_best[index]))
    assert_frequencies_match(counts, propensities)


def test_an_arm_short_of_min_samples_keeps_getting_subjects() -> None:
    # Arm 0 looked bad early: Thompson alone would almost never pick it again.
    active = np.array([True, True])
    post = posterior([40, 600], [0, 72], active)
    assert post.prob_best[0] < 0.02
    counts, propensities = simulate(post, active, min_samples=100)
    assert counts[0] / DRAWS >= WARM_UP_SHARE * 0.9
    assert propensities[0] == pytest.approx(
        (1 - WARM_UP_SHARE) * post.prob_best[0] + WARM_UP_SHARE, rel=1e-9
    )
    assert_frequencies_match(counts, propensities)


def test_no_warm_up_once_every_arm_has_min_samples() -> None:
    active = np.array([True, True])
    post = posterior([300, 600], [3, 60], active)
    counts, propensities = simulate(post, active, min_samples=100)
    assert propensities[1] == pytest.approx(float(post.prob_best[1]))
    assert counts[0] < DRAWS * 0.01


def test_dropped_arms_are_never_chosen_even_when_short() -> None:
    active = np.array([False, True, True])
    post = posterior([5, 50, 50], [0, 5, 6], active)
    counts, propensities = simulate(post, active, min_samples=100, n=5_000)
    assert counts[0] == 0
    assert_frequencies_match(counts, propensities)


def test_fixed_weights_log_their_exact_share() -> None:
    active = np.array([True, True, False])
    weights = np.array([1.0, 3.0, 5.0])
    rng = random.Random(3)
    counts = np.zeros(3, dtype=np.int64)
    for _ in range(8_000):
        choice = choose_new_arm(
            Allocation.FIXED_WEIGHTS,
            weights,
            active,
            Posterior.uniform(active),
            new_rng_state(1),
            rng,
            100,
        )
        counts[choice.index] += 1
        assert choice.propensity == pytest.approx(weights[choice.index] / 4.0)
    assert counts[2] == 0
    assert_frequencies_match(counts, {0: 0.25, 1: 0.75})
