"""Insight math against independent references (scipy's Beta quantiles and chi-square,
closed forms, numerical integration) and the decision rules case by case."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from sira.experiments.v1 import insights_service_pb2 as pb
from sira_server.domain import bayes
from sira_server.domain.experiment import (
    Allocation,
    ExperimentStatus,
    FailFast,
    Reward,
    VariantState,
)
from sira_server.domain.insights import (
    ArmCounts,
    ExperimentInsights,
    GuardrailInsight,
    Interval,
    RecommendedAction,
    SrmCheck,
    VariantInsight,
    compute_insights,
    credible_interval,
    posterior_mean,
    prob_greater,
    reward_successes,
    srm_check,
)

DRAWS = 20_000


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    bayes.warm_up()


def _arm(vid: str, n: int, s: int, **extra: Any) -> ArmCounts:
    return ArmCounts(
        variant_id=vid, name=vid.upper(), assigned_subjects=n, converted_subjects=s, **extra
    )


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


# --- credible intervals ----------------------------------------------------------------------

GRID = [
    (0, 0),
    (0, 1),
    (1, 1),
    (0, 5),
    (2, 5),
    (5, 5),
    (0, 1000),
    (1, 1000),
    (999, 1000),
    (1000, 1000),
    (44, 998),
    (3, 100_000),
    (50_000, 100_000),
    (99_990, 100_000),
]


@pytest.mark.parametrize(("successes", "trials"), GRID)
@pytest.mark.parametrize("level", [0.8, 0.95, 0.99])
def test_credible_interval_matches_scipy_beta_ppf(
    successes: int, trials: int, level: float
) -> None:
    a, b = 1 + successes, 1 + trials - successes
    lower, upper = credible_interval(successes, trials, level)
    assert lower == pytest.approx(stats.beta.ppf((1 - level) / 2, a, b), rel=1e-6, abs=1e-12)
    assert upper == pytest.approx(stats.beta.ppf((1 + level) / 2, a, b), rel=1e-6, abs=1e-12)
    assert 0.0 <= lower < posterior_mean(successes, trials) < upper <= 1.0


def test_credible_interval_at_zero_successes_has_a_closed_form() -> None:
    """Beta(1, n + 1) has quantile 1 - (1 - q)**(1 / (n + 1)); the seed's mean - 1.96 sd
    would clip the lower bound to 0."""
    n = 10
    lower, upper = credible_interval(0, n)
    assert lower == pytest.approx(1 - 0.975 ** (1 / (n + 1)), rel=1e-9)
    assert upper == pytest.approx(1 - 0.025 ** (1 / (n + 1)), rel=1e-9)
    assert lower > 0


def test_interval_is_a_tuple() -> None:
    assert credible_interval(5, 10) == (
        credible_interval(5, 10).lower,
        credible_interval(5, 10).upper,
    )


@pytest.mark.parametrize(("successes", "trials"), [(-1, 10), (11, 10), (0, -1)])
def test_bad_counts_are_rejected(successes: int, trials: int) -> None:
    with pytest.raises(ValueError, match="successes"):
        credible_interval(successes, trials)


def test_posterior_mean_uses_the_uniform_prior() -> None:
    assert posterior_mean(0, 0) == 0.5
    assert posterior_mean(84, 998) == pytest.approx(85 / 1000)


# --- reward integrity ------------------------------------------------------------------------


def test_reward_successes() -> None:
    assert reward_successes(Reward.CONVERSION, 120, 30) == 120
    assert reward_successes(Reward.CONVERSION_NOT_REFUNDED, 120, 30) == 90
    assert reward_successes(Reward.CONVERSION_NOT_REFUNDED, 0, 0) == 0
    with pytest.raises(ValueError, match="exceed"):
        reward_successes(Reward.CONVERSION, 10, 11)
    with pytest.raises(ValueError, match="non-negative"):
        reward_successes(Reward.CONVERSION, -1, 0)


def test_arm_counts_are_validated() -> None:
    with pytest.raises(ValueError, match="exceed"):
        _arm("a", 10, 11)
    with pytest.raises(ValueError, match="churned"):
        _arm("a", 10, 1, churned_subjects=12)
    with pytest.raises(ValueError, match="non-negative"):
        _arm("a", -1, 0)


def test_reward_integrity_can_change_the_winner() -> None:
    """B sells more but a third of its buyers ask for their money back."""
    arms = [
        _arm("a", 2000, 200, refunded_converted_subjects=5, refunded_subjects=5),
        _arm("b", 2000, 260, refunded_converted_subjects=90, refunded_subjects=90),
    ]
    plain = compute_insights(arms, reward=Reward.CONVERSION, draws=DRAWS)
    honest = compute_insights(arms, reward=Reward.CONVERSION_NOT_REFUNDED, draws=DRAWS)
    assert [v.conversions for v in plain.insights] == [200, 260]
    assert [v.conversions for v in honest.insights] == [195, 170]
    assert plain.leading_variant_id == "b"
    assert honest.leading_variant_id == "a"


# --- SRM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assigned", "weights"),
    [
        ([500, 500], [1, 1]),
        ([520, 480], [1, 1]),
        ([1000, 2100, 900], [1, 2, 1]),
        ([5300, 4700], [1, 1]),
        ([10, 30, 60], [0.2, 0.3, 0.5]),
    ],
)
def test_srm_matches_scipy_chisquare(assigned: list[int], weights: list[float]) -> None:
    check = srm_check(assigned, weights)
    w = np.asarray(weights, dtype=float)
    reference = stats.chisquare(assigned, np.sum(assigned) * w / w.sum())
    assert check.applicable
    assert check.chi_square == pytest.approx(reference.statistic, rel=1e-12)
    assert check.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert check.degrees_of_freedom == len(assigned) - 1
    assert check.flagged == (reference.pvalue < 0.001)


def test_srm_flags_a_broken_split_only() -> None:
    assert srm_check([5300, 4700], [1, 1]).flagged
    assert not srm_check([5030, 4970], [1, 1]).flagged
    assert not srm_check([0, 0], [1, 1]).applicable
    assert not srm_check([10], [1]).applicable


def test_srm_in_insights_ignores_dropped_variants_and_bandits() -> None:
    arms = [
        _arm("a", 4000, 400, weight=1.0),
        _arm("b", 4010, 410, weight=1.0),
        _arm("c", 150, 5, weight=1.0, state=VariantState.DROPPED),
    ]
    fixed = compute_insights(arms, allocation=Allocation.FIXED_WEIGHTS, draws=DRAWS)
    assert fixed.srm.applicable
    assert fixed.srm.degrees_of_freedom == 1
    assert not fixed.srm.flagged
    skewed = [_arm("a", 4000, 400), _arm("b", 3500, 350)]
    assert compute_insights(skewed, allocation=Allocation.FIXED_WEIGHTS, draws=DRAWS).srm.flagged
    assert not compute_insights(arms, draws=DRAWS).srm.applicable


# --- fail-fast, conclusion and recommendations -------------------------------------------------


def test_the_seeds_scenario_stops_with_green_as_winner() -> None:
    """Seed: blue alpha=45, beta=955 against green alpha=85, beta=915 after 1000 subjects."""
    arms = [
        ArmCounts("blue-id", 998, 44, variant_key="blue", name="Blue", is_control=True),
        ArmCounts("green-id", 998, 84, variant_key="green", name="Green"),
    ]
    result = compute_insights(arms, FailFast(0.95, 100))
    blue, green = result.insights
    exact = _p_b_beats_a(45, 955, 85, 915)
    se = math.sqrt(exact * (1 - exact) / result.draws)
    assert abs(green.prob_best - exact) <= 3 * se + 1e-9
    assert blue.prob_worse_than_best == pytest.approx(exact, abs=3 * se + 1e-9)
    assert blue.fails_fast
    assert not green.fails_fast
    assert result.leading_variant_id == "green-id"
    assert result.action is RecommendedAction.STOP_WITH_WINNER
    assert blue.e_value >= result.e_value_threshold == pytest.approx(1 / 0.05)
    assert green.e_value == pytest.approx(blue.e_value)  # two arms: one pair
    assert result.recommendation.startswith(
        f"Stop: 'Green' wins; it beats 'Blue' (e-value {blue.e_value:.3g}) (e-value "
        "threshold 20: under continuous monitoring the chance of ever concluding wrongly "
        "is at most 5.0%). P(best)="
    )
    assert result.failing_variant_ids == ("blue-id",)
    assert blue.lift is None
    assert green.lift is not None
    assert green.lift_interval is not None
    assert green.lift_interval.lower < green.lift < green.lift_interval.upper
    assert green.conversion_rate == pytest.approx(85 / 1000)
    assert green.confidence_interval == credible_interval(84, 998)


def test_fail_fast_needs_min_samples() -> None:
    arms = [_arm("a", 998, 44), _arm("b", 998, 84)]
    result = compute_insights(arms, FailFast(0.95, 1000), draws=DRAWS)
    assert not any(v.fails_fast for v in result.insights)
    assert result.action is RecommendedAction.KEEP_RUNNING
    assert result.recommendation.startswith(
        "Keep running: need 2 more on 'A', 2 more on 'B' (min_samples=1000)."
    )
    assert "Leader so far: 'B' with P(best)=" in result.recommendation


def test_a_clearly_worse_variant_is_dropped_while_the_others_run() -> None:
    arms = [_arm("a", 3000, 300), _arm("b", 3000, 305), _arm("c", 3000, 210)]
    result = compute_insights(arms, FailFast(0.95, 100), draws=DRAWS)
    assert [v.fails_fast for v in result.insights] == [False, False, True]
    assert result.failing_variant_ids == ("c",)
    assert result.action is RecommendedAction.DROP_VARIANTS
    p = result.insights[2].prob_worse_than_best
    e = result.insights[2].e_value
    assert e >= result.e_value_threshold == pytest.approx(3 / 0.05)
    assert result.recommendation == (
        f"Drop 'C' (worse than another variant, e-value {e:.3g}; P(worse than 'B')="
        f"{100 * p:.1f}%) (e-value threshold 60: under continuous monitoring the chance of "
        "ever concluding wrongly is at most 5.0%; guardrail threshold 95.0%); keep running "
        "the others."
    )


def test_no_variant_above_threshold_yet() -> None:
    arms = [_arm("a", 3000, 300), _arm("b", 3000, 310), _arm("c", 3000, 295)]
    result = compute_insights(arms, draws=DRAWS)
    assert result.action is RecommendedAction.KEEP_RUNNING
    assert result.recommendation.startswith(
        "Keep running: no difference decided yet: 'B' leads with P(best)="
    )
    assert result.recommendation.endswith("< 60 (error rate 5.0%).")
    assert result.failing_variant_ids == ()


def test_equal_variants_do_not_fail_fast() -> None:
    arms = [_arm(f"v{i}", 5000, 500) for i in range(8)]
    result = compute_insights(arms, draws=DRAWS)
    assert not any(v.fails_fast for v in result.insights)
    for v in result.insights:
        assert v.prob_worse_than_best == pytest.approx(0.5, abs=0.03)


def test_a_winner_needs_every_active_variant_at_min_samples() -> None:
    arms = [_arm("a", 5000, 250), _arm("b", 5000, 500), _arm("c", 90, 3)]
    result = compute_insights(arms, FailFast(0.95, 100), draws=DRAWS)
    assert result.insights[1].prob_best >= 0.95
    assert result.action is RecommendedAction.DROP_VARIANTS  # a fails; c is short
    assert result.failing_variant_ids == ("a",)
    without_a = [dataclasses.replace(arms[0], state=VariantState.DROPPED), *arms[1:]]
    waiting = compute_insights(without_a, FailFast(0.95, 100), draws=DRAWS)
    assert waiting.action is RecommendedAction.KEEP_RUNNING
    assert waiting.recommendation.startswith("Keep running: need 10 more on 'C'")


def test_the_last_active_variant_is_the_winner() -> None:
    arms = [
        _arm("a", 500, 20, state=VariantState.DROPPED),
        _arm("b", 500, 40),
        _arm("c", 500, 22, state=VariantState.DROPPED),
    ]
    result = compute_insights(arms, draws=DRAWS)
    assert result.action is RecommendedAction.STOP_WITH_WINNER
    assert result.recommendation == "Stop: 'B' is the only active variant left; ship it."
    assert result.leading_variant_id == "b"
    assert result.insights[1].prob_best == 1.0


def test_a_dropped_variant_neither_leads_nor_caps_the_leader() -> None:
    """Dropped early on 120 samples, 'old' keeps a wide posterior that would keep the
    leader's P(best) under the threshold forever if it still counted."""
    arms = [
        _arm("old", 120, 14, state=VariantState.DROPPED),
        _arm("a", 20_000, 1600),
        _arm("b", 20_000, 2000),
    ]
    result = compute_insights(arms, draws=DRAWS)
    old, _, b = result.insights
    assert old.state is VariantState.DROPPED
    assert old.prob_best == 0.0
    assert b.prob_best > 0.99
    assert result.action is RecommendedAction.STOP_WITH_WINNER
    assert "old" not in result.failing_variant_ids
    assert (
        bayes.monte_carlo_pass(
            np.array([15.0, 1601.0, 2001.0]), np.array([107.0, 18401.0, 18001.0]), DRAWS, 1
        )[0][2]
        < 0.95
    )


def test_stopped_archived_and_draft_experiments() -> None:
    arms = [_arm("a", 100, 10), _arm("b", 100, 12)]
    for status in (ExperimentStatus.STOPPED, ExperimentStatus.ARCHIVED):
        result = compute_insights(arms, status=status, draws=DRAWS)
        assert result.action is RecommendedAction.CONCLUDED
        assert result.recommendation == f"The experiment is {status}: nothing to decide."
    draft = compute_insights([_arm("a", 0, 0), _arm("b", 0, 0)], status=ExperimentStatus.DRAFT)
    assert draft.action is RecommendedAction.UNSPECIFIED
    assert draft.leading_variant_id == ""


def test_no_data_yet() -> None:
    result = compute_insights([_arm("a", 0, 0), _arm("b", 0, 0)], draws=DRAWS)
    assert result.leading_variant_id == ""
    assert result.recommendation == (
        "Keep running: need 100 more on 'A', 100 more on 'B' (min_samples=100)."
    )
    assert result.insights[0].confidence_interval == pytest.approx((0.025, 0.975))


# --- guardrails --------------------------------------------------------------------------------


def _quad_prob_greater(a1: float, b1: float, a2: float, b2: float) -> float:
    """P(X1 > X2) = integral of f_1(x) F_2(x) dx, numerically."""
    lo, hi = 0.0, 1.0
    points = sorted({a1 / (a1 + b1), a2 / (a2 + b2)})
    value = integrate.quad(
        lambda x: stats.beta.pdf(x, a1, b1) * stats.beta.cdf(x, a2, b2),
        lo,
        hi,
        points=points,
        limit=400,
        epsabs=1e-12,
    )[0]
    return float(value)


@pytest.mark.parametrize(
    ("a1", "b1", "a2", "b2"),
    [
        (1, 1, 1, 1),
        (3, 8, 2, 9),
        (2, 9, 3, 8),
        (46, 956, 21, 981),
        (21, 981, 46, 956),
        (1, 5001, 3, 4999),
        (301, 9701, 280, 9722),
        (120, 30, 118, 35),
    ],
)
def test_prob_greater_matches_numerical_integration(a1: int, b1: int, a2: int, b2: int) -> None:
    got = prob_greater(a1, b1, a2, b2)
    assert got == pytest.approx(_quad_prob_greater(a1, b1, a2, b2), abs=1e-7)
    assert got + prob_greater(a2, b2, a1, b1) == pytest.approx(1.0, abs=1e-12)


def test_a_high_refund_rate_is_flagged_against_the_best_variant() -> None:
    arms = [
        _arm("a", 1000, 100, refunded_subjects=20, churned_subjects=10),
        _arm("b", 1000, 102, refunded_subjects=45, churned_subjects=11),
        _arm("c", 1000, 101, refunded_subjects=24, churned_subjects=30),
    ]
    result = compute_insights(arms, draws=DRAWS)
    a, b, c = result.insights
    refund_a, churn_a = a.guardrails
    refund_b, churn_b = b.guardrails
    refund_c, churn_c = c.guardrails
    assert (refund_a.metric, churn_a.metric) == ("refund", "churn")
    # Refunds: a has the lowest rate; b and c are compared with a, a with the runner-up c.
    assert refund_b.prob_worse_than_best == pytest.approx(_quad_prob_greater(46, 956, 21, 981))
    assert refund_c.prob_worse_than_best == pytest.approx(_quad_prob_greater(25, 977, 21, 981))
    assert refund_a.prob_worse_than_best == pytest.approx(_quad_prob_greater(21, 981, 25, 977))
    # Churn: a is best again; c churns three times as much.
    assert churn_c.prob_worse_than_best == pytest.approx(_quad_prob_greater(31, 971, 11, 991))
    # The same numbers from a Monte Carlo pass on the mirrored posteriors 1 - R.
    events = np.array([20.0, 45.0, 24.0])
    mc = bayes.monte_carlo_pass(1001.0 - events, 1.0 + events, 100_000, 5)[1]
    got = [g.prob_worse_than_best for g in (refund_a, refund_b, refund_c)]
    np.testing.assert_allclose(mc, got, atol=4 * math.sqrt(0.25 / 100_000))
    assert [refund_a.flagged, refund_b.flagged, refund_c.flagged] == [False, True, False]
    assert [churn_a.flagged, churn_b.flagged, churn_c.flagged] == [False, False, True]
    assert refund_b.subjects == 45
    assert refund_b.rate == pytest.approx(46 / 1002)
    assert refund_b.credible_interval == credible_interval(45, 1000)
    assert result.failing_variant_ids == ("b", "c")
    assert result.action is RecommendedAction.DROP_VARIANTS
    assert "'B' (refund rate P(worse than best)=" in result.recommendation
    assert "'C' (churn rate P(worse than best)=" in result.recommendation
    few = compute_insights(arms, FailFast(0.95, 5000), draws=DRAWS)
    assert not any(g.flagged for v in few.insights for g in v.guardrails)


def test_every_active_variant_failing_asks_for_a_review() -> None:
    """a converts better but refunds more; b refunds less but converts worse."""
    arms = [
        _arm("a", 2000, 300, refunded_subjects=120),
        _arm("b", 2000, 200, refunded_subjects=40),
    ]
    result = compute_insights(arms, draws=DRAWS)
    assert set(result.failing_variant_ids) == {"a", "b"}
    assert result.action is RecommendedAction.KEEP_RUNNING
    assert result.recommendation.startswith("Every active variant fails")


# --- lift --------------------------------------------------------------------------------------


def test_lift_matches_the_exact_ratio_distribution() -> None:
    """Z = X_b / X_a: P(Z <= z) = integral of f_a(y) F_b(z y) dy; its quantiles by root
    finding, its density for the Monte Carlo standard error of a quantile."""
    a_a, b_a, a_b, b_b = 61, 941, 76, 926
    arms = [
        ArmCounts("a", 1000, 60, is_control=True),
        ArmCounts("b", 1000, 75),
    ]
    result = compute_insights(arms, draws=100_000)
    lift = result.insights[1]
    lo, hi = stats.beta.ppf([1e-10, 1 - 1e-10], a_a, b_a)

    def cdf(z: float) -> float:
        return float(
            integrate.quad(
                lambda y: stats.beta.pdf(y, a_a, b_a) * stats.beta.cdf(z * y, a_b, b_b), lo, hi
            )[0]
        )

    def density(z: float) -> float:
        return float(
            integrate.quad(
                lambda y: y * stats.beta.pdf(y, a_a, b_a) * stats.beta.pdf(z * y, a_b, b_b),
                lo,
                hi,
            )[0]
        )

    assert lift.lift is not None
    assert lift.lift_interval is not None
    for q, got in (
        (0.025, lift.lift_interval.lower),
        (0.5, lift.lift),
        (0.975, lift.lift_interval.upper),
    ):
        z = optimize.brentq(lambda z, q=q: cdf(z) - q, 0.2, 5.0, xtol=1e-12)
        se = math.sqrt(q * (1 - q) / result.draws) / density(z)
        assert abs((1 + got) - z) <= 4 * se, (q, got, z - 1)


# --- determinism and the proto contract --------------------------------------------------------


def test_the_same_counts_give_the_same_insights() -> None:
    arms = [_arm("a", 800, 70, refunded_subjects=9), _arm("b", 820, 80, churned_subjects=4)]
    assert compute_insights(arms, draws=DRAWS) == compute_insights(arms, draws=DRAWS)


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="no variant"):
        compute_insights([])
    with pytest.raises(ValueError, match="control"):
        compute_insights(
            [ArmCounts("a", 1, 0, is_control=True), ArmCounts("b", 1, 0, is_control=True)]
        )
    with pytest.raises(ValueError, match="seed"):
        compute_insights([_arm("a", 1, 0)], seed=-1)


def _names(message: object) -> set[str]:
    return set(message.DESCRIPTOR.fields_by_name)  # type: ignore[attr-defined]


def test_dataclasses_map_one_to_one_onto_the_proto() -> None:
    def fields(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    assert fields(VariantInsight) == _names(pb.VariantInsight)
    assert fields(GuardrailInsight) == _names(pb.GuardrailInsight)
    assert fields(SrmCheck) == _names(pb.SrmCheck)
    assert set(Interval._fields) == _names(pb.Interval)
    servicer_fields = {"experiment_id", "status", "compute_time"}
    assert fields(ExperimentInsights) == _names(pb.GetInsightsResponse) - servicer_fields
    assert {a.value for a in RecommendedAction} == set(pb.RecommendedAction.keys())
