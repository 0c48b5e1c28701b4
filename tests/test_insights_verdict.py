# ruff: noqa: E501  (golden recommendation texts are kept whole, one per line)
"""The recommendation is words over a verdict: the same counts give the same English as
before the split (golden texts recorded from the pre-split `compute_insights`), and the
verdict carries the action, the reason, the variant ids and the numbers behind them."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from sira_server.domain import bayes
from sira_server.domain.experiment import ExperimentStatus, FailFast, Reward, VariantState
from sira_server.domain.insights import (
    ArmCounts,
    RecommendedAction,
    compute_insights,
    verdict_of,
)
from sira_server.domain.recommendation import words
from sira_server.domain.verdict import VerdictReason

DRAWS = 20_000
D = VariantState.DROPPED


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    bayes.warm_up()


def arm(vid: str, n: int, s: int, **extra: Any) -> ArmCounts:
    return ArmCounts(
        variant_id=vid, name=vid.upper(), assigned_subjects=n, converted_subjects=s, **extra
    )


FF = FailFast(0.95, 100)
CASES: dict[str, tuple[list[ArmCounts], dict[str, Any]]] = {
    "stopped": ([arm("a", 100, 10), arm("b", 100, 20)], {"status": ExperimentStatus.STOPPED}),
    "archived": ([arm("a", 100, 10), arm("b", 100, 20)], {"status": ExperimentStatus.ARCHIVED}),
    "draft": ([arm("a", 0, 0), arm("b", 0, 0)], {"status": ExperimentStatus.DRAFT}),
    "none_active": ([arm("a", 100, 10, state=D), arm("b", 100, 20, state=D)], {}),
    "one_left": ([arm("a", 100, 10, state=D), arm("b", 100, 20)], {}),
    "winner": ([arm("a", 2000, 100, is_control=True), arm("b", 2000, 300)], {"fail_fast": FF}),
    "winner_with_dropped": (
        [arm("a", 2000, 100, state=D), arm("b", 2000, 200), arm("c", 2000, 400)],
        {"fail_fast": FF},
    ),
    "drop": ([arm("a", 3000, 300), arm("b", 3000, 310), arm("c", 3000, 100)], {"fail_fast": FF}),
    "drop_guardrail": (
        [arm("a", 1000, 100), arm("b", 1000, 101), arm("c", 1000, 99, refunded_subjects=200)],
        {"fail_fast": FF},
    ),
    "drop_churn_and_fail": (
        [arm("a", 3000, 300), arm("b", 3000, 305), arm("c", 3000, 100, churned_subjects=500)],
        {"fail_fast": FF},
    ),
    "drop_two": ([arm("a", 3000, 400), arm("b", 3000, 100), arm("c", 3000, 90)], {"fail_fast": FF}),
    "all_failing": (
        [arm("a", 1000, 100), arm("b", 1000, 300, refunded_subjects=200)],
        {"fail_fast": FF},
    ),
    "short": ([arm("a", 40, 4), arm("b", 60, 9)], {"fail_fast": FailFast(0.95, 1000)}),
    "short_no_data": ([arm("a", 0, 0), arm("b", 0, 0)], {}),
    "undecided": ([arm("a", 1000, 100), arm("b", 1000, 104)], {"fail_fast": FF}),
    "not_refunded": (
        [arm("a", 2000, 300, refunded_converted_subjects=250), arm("b", 2000, 200)],
        {"fail_fast": FF, "reward": Reward.CONVERSION_NOT_REFUNDED},
    ),
}

GOLDEN: dict[str, tuple[str, str]] = {
    "stopped": ("CONCLUDED", "The experiment is stopped: nothing to decide."),
    "archived": ("CONCLUDED", "The experiment is archived: nothing to decide."),
    "draft": ("UNSPECIFIED", "Draft: start the experiment to collect data."),
    "none_active": ("UNSPECIFIED", "No active variant left: stop the experiment without a winner."),
    "one_left": ("STOP_WITH_WINNER", "Stop: 'B' is the only active variant left; ship it."),
    "winner": (
        "STOP_WITH_WINNER",
        "Stop: 'B' wins; it beats 'A' (e-value 1.93e+22) (e-value threshold 20: under continuous monitoring the chance of ever concluding wrongly is at most 5.0%). P(best)=100.0%.",
    ),
    "winner_with_dropped": (
        "STOP_WITH_WINNER",
        "Stop: 'C' wins; it beats 'B' (e-value 1.98e+15) (e-value threshold 60: under continuous monitoring the chance of ever concluding wrongly is at most 5.0%). P(best)=100.0%.",
    ),
    "drop": (
        "DROP_VARIANTS",
        "Drop 'C' (worse than another variant, e-value 2.23e+23; P(worse than 'B')=100.0%) (e-value threshold 60: under continuous monitoring the chance of ever concluding wrongly is at most 5.0%; guardrail threshold 95.0%); keep running the others.",
    ),
    "drop_guardrail": (
        "DROP_VARIANTS",
        "Drop 'C' (refund rate P(worse than best)=100.0%) (e-value threshold 60: under continuous monitoring the chance of ever concluding wrongly is at most 5.0%; guardrail threshold 95.0%); keep running the others.",
    ),
    "drop_churn_and_fail": (
        "DROP_VARIANTS",
        "Drop 'C' (worse than another variant, e-value 2.88e+22; P(worse than 'B')=100.0%, churn rate P(worse than best)=100.0%) (e-value threshold 60: under continuous monitoring the chance of ever concluding wrongly is at most 5.0%; guardrail threshold 95.0%); keep running the others.",
    ),
    "drop_two": (
        "STOP_WITH_WINNER",
        "Stop: 'A' wins; it beats 'B' (e-value 4.45e+40), 'C' (e-value 2.21e+44) (e-value threshold 60: under continuous monitoring the chance of ever concluding wrongly is at most 5.0%). P(best)=100.0%.",
    ),
    "all_failing": (
        "KEEP_RUNNING",
        "Every active variant fails fail-fast or a guardrail: review the guardrails before dropping anything.",
    ),
    "short": (
        "KEEP_RUNNING",
        "Keep running: need 960 more on 'A', 940 more on 'B' (min_samples=1000). Leader so far: 'B' with P(best)=74.5%.",
    ),
    "short_no_data": (
        "KEEP_RUNNING",
        "Keep running: need 100 more on 'A', 100 more on 'B' (min_samples=100).",
    ),
    "undecided": (
        "KEEP_RUNNING",
        "Keep running: no difference decided yet: 'B' leads with P(best)=62.0%, e-value 0.405 < 20 (error rate 5.0%).",
    ),
    "not_refunded": (
        "STOP_WITH_WINNER",
        "Stop: 'B' wins; it beats 'A' (e-value 1.33e+19) (e-value threshold 20: under continuous monitoring the chance of ever concluding wrongly is at most 5.0%). P(best)=100.0%.",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recommendation_text_is_unchanged(name: str) -> None:
    arms, options = CASES[name]
    result = compute_insights(arms, draws=DRAWS, **options)
    action, text = GOLDEN[name]
    assert result.action is RecommendedAction[action]
    assert result.recommendation == text


REASONS: dict[str, tuple[VerdictReason, list[str], str]] = {
    # case: (reason, variant ids it names, winner)
    "stopped": (VerdictReason.CONCLUDED, [], ""),
    "archived": (VerdictReason.CONCLUDED, [], ""),
    "draft": (VerdictReason.DRAFT, [], ""),
    "none_active": (VerdictReason.NO_ACTIVE_VARIANT, [], ""),
    "one_left": (VerdictReason.ONLY_ONE_ACTIVE, [], "b"),
    "winner": (VerdictReason.WINNER_DECIDED, ["a"], "b"),
    "winner_with_dropped": (VerdictReason.WINNER_DECIDED, ["b"], "c"),
    "drop": (VerdictReason.VARIANTS_FAILING, ["c"], ""),
    "drop_guardrail": (VerdictReason.VARIANTS_FAILING, ["c"], ""),
    "drop_churn_and_fail": (VerdictReason.VARIANTS_FAILING, ["c"], ""),
    "drop_two": (VerdictReason.WINNER_DECIDED, ["b", "c"], "a"),
    "all_failing": (VerdictReason.ALL_FAILING, ["a", "b"], ""),
    "short": (VerdictReason.NEEDS_SAMPLES, ["a", "b"], ""),
    "short_no_data": (VerdictReason.NEEDS_SAMPLES, ["a", "b"], ""),
    "undecided": (VerdictReason.UNDECIDED, [], ""),
    "not_refunded": (VerdictReason.WINNER_DECIDED, ["a"], "b"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_verdict_is_data_and_the_words_are_made_from_it(name: str) -> None:
    arms, options = CASES[name]
    result = compute_insights(arms, draws=DRAWS, **options)
    verdict = verdict_of(result, options.get("status", ExperimentStatus.RUNNING))
    reason, named, winner = REASONS[name]
    assert (verdict.reason, list(verdict.variant_ids), verdict.winner_variant_id) == (
        reason,
        named,
        winner,
    )
    assert verdict.action is result.action
    assert verdict.leader_variant_id == result.leading_variant_id
    assert words(verdict) == result.recommendation
    stored = json.loads(json.dumps(verdict.as_json()))  # what the audit log keeps
    assert stored["reason"] == reason.value
    assert stored["e_value_threshold"] == result.e_value_threshold
    assert stored["error_rate"] == result.error_rate
    assert [v["e_value"] for v in stored["variants"]] == [v.e_value for v in result.insights]


def test_the_words_follow_the_numbers_not_the_other_way_round() -> None:
    """Changing a number in the verdict changes the sentence: nothing is cached as text."""
    arms, options = CASES["undecided"]
    verdict = verdict_of(compute_insights(arms, draws=DRAWS, **options), ExperimentStatus.RUNNING)
    stricter = dataclasses.replace(verdict, error_rate=0.01, e_value_threshold=200.0)
    assert "< 200 (error rate 1.0%)" in words(stricter)
    assert "< 20 (error rate 5.0%)" in words(verdict)
