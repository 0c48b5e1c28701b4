"""Bandit kernels against independent references: closed forms, numerical integration,
scipy's distributions, and their own numpy twins on fixed seeds.

Every Monte Carlo check uses a fixed seed, so a run is deterministic; tolerances are a few
standard errors of the estimate, so a seed is no lucky pick.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from sira_server.domain import bayes, bayes_twins

F64 = np.float64


def _arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=F64)


def _lbeta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _p_b_beats_a(a_a: int, b_a: int, a_b: int, b_b: int) -> float:
    """Evan Miller's exact P(p_B > p_A) for Beta posteriors with integer a_b."""
    return sum(
        math.exp(
            _lbeta(a_a + i, b_a + b_b) - math.log(b_b + i) - _lbeta(1 + i, b_b) - _lbeta(a_a, b_a)
        )
        for i in range(a_b)
    )


def _window(alpha: np.ndarray, beta: np.ndarray) -> tuple[float, float, list[float]]:
    """Integration range covering every posterior's mass, and the means as break points."""
    lo = float(min(stats.beta.ppf(1e-12, alpha, beta)))
    hi = float(max(stats.beta.ppf(1 - 1e-12, alpha, beta)))
    return lo, hi, sorted(float(m) for m in alpha / (alpha + beta))


def _exact_prob_best(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """P(X_i is the max) = integral of f_i(x) * prod_{j != i} F_j(x)."""
    lo, hi, points = _window(alpha, beta)
    out = []
    for i in range(alpha.size):
        others = [j for j in range(alpha.size) if j != i]

        def integrand(x: float, i: int = i, others: list[int] = others) -> float:
            value = stats.beta.pdf(x, alpha[i], beta[i])
            for j in others:
                value *= stats.beta.cdf(x, alpha[j], beta[j])
            return float(value)

        out.append(integrate.quad(integrand, lo, hi, points=points, limit=400)[0])
    return np.array(out)


def _exact_expected_max(alpha: np.ndarray, beta: np.ndarray) -> float:
    """E[max_j X_j] = integral over [0, 1] of 1 - prod_j F_j(x)."""
    lo, hi, points = _window(alpha, beta)

    def tail(x: float) -> float:
        return float(1.0 - np.prod(stats.beta.cdf(x, alpha, beta)))

    return lo + float(integrate.quad(tail, lo, hi, points=points, limit=400)[0])


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    bayes.warm_up()


# --- random numbers ------------------------------------------------------------------------


def test_splitmix_seeding_matches_the_reference_vector() -> None:
    assert [int(w) for w in bayes.new_rng_state(0)] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
        0xF88BB8A8724C81EC,
    ]


def test_xoshiro_matches_the_reference_vector_in_kernel_and_twin() -> None:
    expected = [11520, 0, 1509978240, 1215971899390074240]
    state = np.array([1, 2, 3, 4], dtype=np.uint64)
    assert [int(bayes._next(state)) for _ in expected] == expected
    streams = bayes_twins._Streams(np.array([[1, 2, 3, 4]], dtype=np.uint64))
    lane = np.zeros(1, dtype=np.intp)
    assert [int(streams.next(lane)[0]) for _ in expected] == expected


def test_lane_streams_are_jumps_of_the_base_stream() -> None:
    assert np.array_equal(
        bayes._lane_states(12345, bayes.LANES), bayes_twins._lane_states_numpy(12345, 64)
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [(1.0, 1.0), (0.3, 0.7), (2.0, 30.0), (46.0, 956.0), (5001.0, 95001.0), (900.0, 3.0)],
)
def test_beta_draws_follow_the_beta_distribution(a: float, b: float) -> None:
    draws = bayes.beta_draws(_arr(a), _arr(b), 20_000, 7)[0]
    assert stats.kstest(draws, stats.beta(a, b).cdf).pvalue > 1e-3
    se = math.sqrt(stats.beta.var(a, b) / draws.size)
    assert abs(draws.mean() - stats.beta.mean(a, b)) < 4 * se


def test_normal_tail_is_sampled() -> None:
    """Gamma(0.5) relies on normals beyond the ziggurat's base layer more than most shapes:
    Beta(0.5, 0.5) puts visible mass near 0 and 1 (arcsine law)."""
    draws = bayes.beta_draws(_arr(0.5), _arr(0.5), 50_000, 11)[0]
    assert stats.kstest(draws, stats.beta(0.5, 0.5).cdf).pvalue > 1e-3


# --- twins ---------------------------------------------------------------------------------


def test_thompson_kernel_equals_its_numpy_twin() -> None:
    alpha, beta = _arr(11, 21, 31, 6, 0.5), _arr(91, 181, 271, 46, 0.5)
    active = np.array([True, True, False, True, True])
    s_kernel, s_twin = bayes.new_rng_state(42), bayes.new_rng_state(42)
    kernel = [bayes.thompson_choose(alpha, beta, active, s_kernel) for _ in range(300)]
    twin = [bayes_twins.thompson_choose_numpy(alpha, beta, active, s_twin) for _ in range(300)]
    assert kernel == twin
    assert np.array_equal(s_kernel, s_twin)
    assert 2 not in kernel


def test_monte_carlo_kernel_equals_its_numpy_twin() -> None:
    """Same algorithm, same streams: the counts are identical and the loss sums are added
    in the same order. Exact equality also needs numpy's exp/log to round like libm's; a
    1-ulp difference would at worst flip a rejection test once in ~1e15 draws."""
    alpha, beta = _arr(3, 50, 48, 0.7, 20), _arr(5, 950, 940, 1.3, 400)
    active = np.array([True, True, True, True, False])
    draws = 3_000  # not a multiple of LANES: uneven lanes
    kernel = bayes.monte_carlo_core(alpha, beta, active, 1, draws, 99)
    twin = bayes_twins.monte_carlo_core_numpy(alpha, beta, active, 1, draws, 99)
    for got, want in zip(kernel, twin, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert np.array_equal(kernel[0], twin[0])
    assert np.array_equal(kernel[1], twin[1])
    passed = bayes.monte_carlo_pass(alpha, beta, 500, 5)
    twin_pass = bayes_twins.monte_carlo_pass_numpy(alpha, beta, 500, 5)
    for got, want in zip(passed, twin_pass, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_beta_draws_kernel_equals_its_numpy_twin() -> None:
    alpha, beta = _arr(3, 0.4, 200), _arr(5, 2, 9800)
    np.testing.assert_allclose(
        bayes.beta_draws(alpha, beta, 400, 3),
        bayes_twins.beta_draws_numpy(alpha, beta, 400, 3),
        rtol=1e-12,
    )


# --- the Monte Carlo pass against exact answers --------------------------------------------


def test_results_depend_on_the_seed_only() -> None:
    alpha, beta = _arr(10, 12, 9), _arr(90, 88, 91)
    first = bayes.monte_carlo_pass(alpha, beta, 10_000, 1)
    again = bayes.monte_carlo_pass(alpha, beta, 10_000, 1)
    other = bayes.monte_carlo_pass(alpha, beta, 10_000, 2)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize(
    ("a_a", "b_a", "a_b", "b_b"),
    [(45, 955, 85, 915), (11, 90, 14, 87), (2, 3, 3, 2), (101, 901, 103, 899), (1, 1, 1, 1)],
)
def test_two_arm_prob_worse_matches_evan_miller(a_a: int, b_a: int, a_b: int, b_b: int) -> None:
    draws = 100_000
    alpha, beta = _arr(a_a, a_b), _arr(b_a, b_b)
    prob_best, prob_worse, _ = bayes.monte_carlo_pass(alpha, beta, draws, 2024)
    exact = _p_b_beats_a(a_a, b_a, a_b, b_b)  # P(X_B > X_A)
    se = math.sqrt(exact * (1 - exact) / draws) + 1e-12
    assert abs(prob_best[1] - exact) <= 3 * se
    # With two arms, the trailing arm's P(worse) is the other arm's P(best), and the
    # leader's P(worse) is its chance to trail the runner-up: the same number.
    leader = 1 if a_b / (a_b + b_b) > a_a / (a_a + b_a) else 0
    p_trail = exact if leader == 1 else 1 - exact  # P(trailing arm < leader)
    assert abs(prob_worse[1 - leader] - p_trail) <= 3 * se
    assert abs(prob_worse[leader] - (1 - p_trail)) <= 3 * se


@pytest.mark.parametrize(
    ("alpha", "beta"),
    [
        (_arr(21, 25, 30), _arr(181, 177, 172)),
        (_arr(5, 7, 6, 9), _arr(45, 43, 44, 41)),
        (_arr(50, 52, 49, 58, 55), _arr(950, 948, 951, 942, 945)),
    ],
)
def test_prob_best_matches_numerical_integration(alpha: np.ndarray, beta: np.ndarray) -> None:
    draws = 100_000
    prob_best, _, _ = bayes.monte_carlo_pass(alpha, beta, draws, 31)
    exact = _exact_prob_best(alpha, beta)
    assert exact.sum() == pytest.approx(1.0, abs=1e-6)
    se = np.sqrt(exact * (1 - exact) / draws)
    assert np.all(np.abs(prob_best - exact) <= 4 * se + 1e-9), (prob_best, exact)


def test_expected_loss_matches_exact_integral_and_numpy_reference() -> None:
    alpha, beta = _arr(21, 25, 30, 12), _arr(181, 177, 172, 90)
    draws = 100_000
    _, _, loss = bayes.monte_carlo_pass(alpha, beta, draws, 8)
    exact = _exact_expected_max(alpha, beta) - alpha / (alpha + beta)
    # Independent sampler: numpy's own Beta generator.
    x = np.random.default_rng(8).beta(alpha, beta, size=(draws, alpha.size))
    shortfall = x.max(axis=1, keepdims=True) - x
    reference = shortfall.mean(axis=0)
    se = shortfall.std(axis=0) / math.sqrt(draws)
    assert np.all(np.abs(loss - exact) <= 4 * se)
    assert np.all(np.abs(reference - exact) <= 4 * se)
    assert np.all(np.abs(loss - reference) <= 6 * se)


def test_prob_worse_is_pairwise_so_equal_arms_do_not_all_fail() -> None:
    """Ten identical arms: 1 - P(best) would be 0.9 for each; pairwise it is 0.5."""
    alpha, beta = np.full(10, 101.0), np.full(10, 901.0)
    prob_best, prob_worse, _ = bayes.monte_carlo_pass(alpha, beta, 50_000, 4)
    np.testing.assert_allclose(prob_best, 0.1, atol=0.01)
    np.testing.assert_allclose(prob_worse, 0.5, atol=0.015)


def test_inactive_arms_are_compared_but_never_best() -> None:
    alpha, beta = _arr(60, 40, 10), _arr(40, 60, 90)  # the dropped arm 0 is the best one
    active = np.array([False, True, True])
    prob_best, prob_worse, loss, lift = bayes.monte_carlo_core(alpha, beta, active, -1, 20_000, 3)
    assert prob_best[0] == 0.0
    assert prob_best[1:].sum() == pytest.approx(1.0)
    assert bayes.leader_and_runner_up(alpha, beta, active) == (1, 2)
    # The dropped arm beats the active leader almost surely: a negative loss.
    assert prob_worse[0] < 0.01
    assert loss[0] < 0
    assert lift.shape == (3, 0)


def test_lift_draws_are_ratios_to_the_control() -> None:
    alpha, beta = _arr(30, 36), _arr(970, 964)
    _, _, _, lift = bayes.monte_carlo_core(alpha, beta, np.ones(2, np.bool_), 0, 2_000, 6)
    assert lift.shape == (2, 2_000)
    assert np.all(lift[0] == 0.0)
    assert np.median(lift[1]) == pytest.approx(0.2, abs=0.1)


def test_degenerate_inputs() -> None:
    alpha, beta = _arr(2, 3), _arr(3, 2)
    one = bayes.monte_carlo_pass(alpha, beta, 1, 0)  # fewer draws than lanes
    assert one[0].sum() == 1.0
    none_active = bayes.monte_carlo_core(alpha, beta, np.zeros(2, np.bool_), -1, 100, 0)
    assert np.all(none_active[0] == 0)
    single = bayes.monte_carlo_pass(_arr(3), _arr(4), 1000, 0)
    assert single[0][0] == 1.0
    assert single[1][0] == 0.0
    assert single[2][0] == 0.0
    with pytest.raises(ValueError, match="draws"):
        bayes.monte_carlo_pass(alpha, beta, 0, 0)
    with pytest.raises(ValueError, match="seed"):
        bayes.monte_carlo_pass(alpha, beta, 10, -1)
    with pytest.raises(ValueError, match="seed"):
        bayes.new_rng_state(-1)


# --- Thompson sampling -----------------------------------------------------------------------


def test_thompson_frequencies_match_prob_best() -> None:
    alpha, beta = _arr(21, 25, 30, 18), _arr(181, 177, 172, 184)
    active = np.ones(4, np.bool_)
    state = bayes.new_rng_state(2026)
    n = 20_000
    picks = np.bincount(
        [bayes.thompson_choose(alpha, beta, active, state) for _ in range(n)], minlength=4
    )
    exact = _exact_prob_best(alpha, beta)
    assert stats.chisquare(picks, exact / exact.sum() * n).pvalue > 1e-3


def test_thompson_respects_the_active_mask() -> None:
    alpha, beta = _arr(900, 1, 2), _arr(1, 900, 2)
    state = bayes.new_rng_state(1)
    active = np.array([False, True, True])
    picks = {bayes.thompson_choose(alpha, beta, active, state) for _ in range(200)}
    assert 2 in picks
    assert picks <= {1, 2}
    assert bayes.thompson_choose(alpha, beta, np.zeros(3, np.bool_), state) == -1
