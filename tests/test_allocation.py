"""Fixed-weight allocation: exact slices on a u grid, frequencies vs weights, dropped arms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sira_server.domain.allocation import weighted_choice, weighted_propensities

CASES = [
    ([1.0, 1.0], [True, True]),
    ([1.0, 2.0, 3.0], [True, True, True]),
    ([1.0, 2.0, 3.0], [True, False, True]),
    ([0.5, 0.0, 4.5, 1.0], [True, True, True, True]),
    ([5.0, 1.0, 1.0, 1.0, 2.0], [False, True, True, False, True]),
    ([1e-6, 1.0], [True, True]),
]


@pytest.mark.parametrize(("weights", "active"), CASES)
def test_propensities_closed_form(weights: list[float], active: list[bool]) -> None:
    w = np.where(active, weights, 0.0)
    expected = w / w.sum()
    got = weighted_propensities(np.array(weights), np.array(active))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert got.sum() == pytest.approx(1.0)
    assert np.all(got[~np.array(active)] == 0.0)


@pytest.mark.parametrize(("weights", "active"), CASES)
def test_u_grid_gives_exact_shares(weights: list[float], active: list[bool]) -> None:
    # A midpoint grid of u is a perfect quantile sweep: each arm must get its share of the
    # grid to within one point (slice boundaries).
    n = 100_000
    w, a = np.array(weights), np.array(active)
    picks = [weighted_choice(w, a, (k + 0.5) / n) for k in range(n)]
    counts = np.bincount(picks, minlength=len(weights))
    expected = weighted_propensities(w, a) * n
    assert np.all(np.abs(counts - expected) <= 1.0)
    assert np.all(counts[~a] == 0)


def test_grid_is_monotone_in_u() -> None:
    # The inverse-CDF construction: arms come out in index order as u grows.
    w, a = np.array([3.0, 1.0, 0.0, 2.0]), np.array([True, True, True, True])
    picks = [weighted_choice(w, a, k / 1000) for k in range(1000)]
    assert picks == sorted(picks)
    assert set(picks) == {0, 1, 3}


@pytest.mark.parametrize(("weights", "active"), CASES)
def test_random_frequencies_match_weights(weights: list[float], active: list[bool]) -> None:
    rng = np.random.default_rng(20261127)
    n = 50_000
    w, a = np.array(weights), np.array(active)
    counts = np.bincount(
        [weighted_choice(w, a, float(u)) for u in rng.random(n)], minlength=len(weights)
    )
    p = weighted_propensities(w, a)
    support = p > 0
    assert np.all(counts[~support] == 0)
    if support.sum() > 1:
        assert stats.chisquare(counts[support], p[support] * n).pvalue > 1e-4


def test_deterministic_given_u() -> None:
    w, a = np.array([1.0, 2.0, 3.0]), np.array([True, True, True])
    assert weighted_choice(w, a, 0.0) == 0
    assert weighted_choice(w, a, 1 / 6 - 1e-12) == 0
    assert weighted_choice(w, a, 1 / 6 + 1e-12) == 1
    assert weighted_choice(w, a, 0.5 - 1e-12) == 1
    assert weighted_choice(w, a, 0.5) == 2
    assert weighted_choice(w, a, 0.9999999999999999) == 2


def test_top_of_range_never_picks_a_dropped_arm() -> None:
    # u just below 1 can round u * total up to total; the answer must still be a live arm.
    largest_u = float(np.nextafter(1.0, 0.0))
    for weights, active in CASES:
        pick = weighted_choice(np.array(weights), np.array(active), largest_u)
        assert active[pick]
        assert weights[pick] > 0
    w = np.array([0.1, 0.2, 0.3, 0.0])
    assert weighted_choice(w, np.array([True, True, True, True]), largest_u) == 2


def test_single_active_arm_always_chosen() -> None:
    w, a = np.array([1.0, 1.0, 1.0]), np.array([False, True, False])
    assert {weighted_choice(w, a, k / 100) for k in range(100)} == {1}
    np.testing.assert_array_equal(weighted_propensities(w, a), [0.0, 1.0, 0.0])


def test_accepts_plain_sequences() -> None:
    assert weighted_choice([1.0, 1.0], [True, True], 0.75) == 1
    np.testing.assert_array_equal(weighted_propensities([1, 3], [1, 1]), [0.25, 0.75])


@pytest.mark.parametrize(
    ("weights", "active", "message"),
    [
        ([1.0, 1.0], [False, False], "no active arm"),
        ([0.0, 0.0], [True, True], "no active arm"),
        ([0.0, 1.0], [True, False], "no active arm"),
        ([-1.0, 2.0], [True, True], "non-negative"),
        ([float("nan"), 1.0], [True, True], "non-negative"),
        ([float("inf"), 1.0], [True, True], "finite"),
        ([1.0, 1.0], [True], "same length"),
        ([[1.0, 1.0]], [[True, True]], "1-D"),
    ],
)
def test_rejects_bad_input(weights: object, active: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_choice(weights, active, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        weighted_propensities(weights, active)  # type: ignore[arg-type]


@pytest.mark.parametrize("u", [-0.1, 1.0, 1.5, float("nan")])
def test_rejects_u_outside_unit_interval(u: float) -> None:
    with pytest.raises(ValueError, match=r"u must be in \[0, 1\)"):
        weighted_choice(np.array([1.0, 1.0]), np.array([True, True]), u)
