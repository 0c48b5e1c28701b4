"""Insights: what the Beta posteriors say about each variant, and what to do next.

Pure functions, dataclasses in and out; the gRPC servicer maps `ExperimentInsights` field
for field onto ``GetInsightsResponse`` (experiment id, status and compute time are its own).
Formulas and where they differ from the seed: ``docs/statistics.md``.

    counts per variant --reward_successes--> successes
        --> Beta(1 + successes, 1 + samples - successes) per variant
        --> exact credible intervals, one Monte Carlo pass (P(best), P(worse than the
            leader), expected loss, lift vs control)
        --> guardrails: exact pairwise comparisons of refund and churn rates
        --> the always-valid stopping rule (domain.stopping): fail-fast and the winner
        --> the verdict (domain.verdict): action, reason, variant ids, the numbers
        --> its words (domain.recommendation), for people only; SRM check
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import special, stats

from sira_server.domain import bayes, stopping
from sira_server.domain.experiment import (
    Allocation,
    ExperimentStatus,
    FailFast,
    Reward,
    Variant,
    VariantState,
)
from sira_server.domain.recommendation import words
from sira_server.domain.verdict import (
    FlaggedGuardrail,
    RecommendedAction,
    Rule,
    VariantEvidence,
    Verdict,
    decide,
)

__all__ = [
    "CREDIBLE_LEVEL",
    "DEFAULT_DRAWS",
    "DEFAULT_SEED",
    "GUARDRAIL_METRICS",
    "SRM_P_VALUE",
    "ArmCounts",
    "ExperimentInsights",
    "GuardrailInsight",
    "Interval",
    "PosteriorStatistics",
    "RecommendedAction",
    "SrmCheck",
    "VariantInsight",
    "compute_insights",
    "credible_interval",
    "guardrails",
    "posterior_mean",
    "posterior_statistics",
    "prob_greater",
    "reward_successes",
    "srm_check",
    "verdict_of",
]

FloatArray = npt.NDArray[np.float64]

CREDIBLE_LEVEL = 0.95
DEFAULT_DRAWS = 100_000
"""Monte Carlo draws per pass: standard error of a probability at most 0.0016."""
DEFAULT_SEED = 147
"""Fixed by default so that the same counts always give the same insights."""
SRM_P_VALUE = 0.001
"""An SRM check with a smaller p-value is flagged."""
GUARDRAIL_METRICS = ("refund", "churn")
_SEED_SPACE = 1 << 63


# --- inputs ------------------------------------------------------------------------------


def reward_successes(reward: Reward, converted_subjects: int, refunded_converted: int) -> int:
    """Successes of one variant under the experiment's reward.

    ``converted_subjects``: subjects with at least one conversion. ``refunded_converted``:
    those of them with a refund after a conversion. CONVERSION counts every converted
    subject; CONVERSION_NOT_REFUNDED does not count a refunded one, so a variant cannot
    win by selling what comes back. Counting subjects, not events, keeps successes <=
    trials (a Beta posterior needs it) whatever the number of conversions per subject.
    """
    if converted_subjects < 0 or refunded_converted < 0:
        raise ValueError("counts must be non-negative")
    if refunded_converted > converted_subjects:
        raise ValueError(
            f"refunded converted subjects ({refunded_converted}) exceed converted subjects "
            f"({converted_subjects})"
        )
    if reward is Reward.CONVERSION_NOT_REFUNDED:
        return converted_subjects - refunded_converted
    return converted_subjects


@dataclass(frozen=True, slots=True)
class ArmCounts:
    """What the store counted for one variant, and what the insights need to know of it.
    Every count is of distinct subjects."""

    variant_id: str
    assigned_subjects: int
    """Trials: subjects assigned to the variant."""
    converted_subjects: int = 0
    """Subjects with at least one conversion."""
    refunded_converted_subjects: int = 0
    """Converted subjects with a refund after a conversion (the reward integrity count)."""
    refunded_subjects: int = 0
    """Subjects with at least one refund (refund guardrail)."""
    churned_subjects: int = 0
    """Subjects with at least one churn event (churn guardrail)."""
    variant_key: str = ""
    name: str = ""
    is_control: bool = False
    state: VariantState = VariantState.ACTIVE
    weight: float = 1.0
    """Configured weight (used by the SRM check of fixed-weight allocation)."""

    def __post_init__(self) -> None:
        counts = (
            self.assigned_subjects,
            self.converted_subjects,
            self.refunded_converted_subjects,
            self.refunded_subjects,
            self.churned_subjects,
        )
        if min(counts) < 0:
            raise ValueError(f"variant {self.variant_id}: counts must be non-negative")
        for label, value in (
            ("converted", self.converted_subjects),
            ("refunded", self.refunded_subjects),
            ("churned", self.churned_subjects),
        ):
            if value > self.assigned_subjects:
                raise ValueError(
                    f"variant {self.variant_id}: {label} subjects ({value}) exceed assigned "
                    f"subjects ({self.assigned_subjects})"
                )

    @classmethod
    def from_variant(
        cls,
        variant: Variant,
        *,
        assigned_subjects: int,
        converted_subjects: int = 0,
        refunded_converted_subjects: int = 0,
        refunded_subjects: int = 0,
        churned_subjects: int = 0,
    ) -> ArmCounts:
        return cls(
            variant_id=variant.id,
            assigned_subjects=assigned_subjects,
            converted_subjects=converted_subjects,
            refunded_converted_subjects=refunded_converted_subjects,
            refunded_subjects=refunded_subjects,
            churned_subjects=churned_subjects,
            variant_key=variant.key,
            name=variant.name,
            is_control=variant.is_control,
            state=variant.state,
            weight=variant.weight,
        )

    @property
    def label(self) -> str:
        """How the recommendation names the variant."""
        return self.name or self.variant_key or self.variant_id


# --- outputs (one dataclass per proto message) -------------------------------------------


class Interval(NamedTuple):
    """A (lower, upper) pair; unpacks like a tuple."""

    lower: float
    upper: float


@dataclass(frozen=True, slots=True)
class GuardrailInsight:
    metric: str
    """"refund" or "churn" (lower is better)."""
    subjects: int
    """Subjects with at least one such event."""
    rate: float
    """Posterior mean of the rate, Beta(1 + subjects, 1 + samples - subjects)."""
    credible_interval: Interval
    prob_worse_than_best: float
    """P(rate > rate of the active variant with the lowest posterior mean); for that
    variant itself, P(its rate > the runner-up's). Exact (closed form), not Monte Carlo."""
    flagged: bool
    """prob_worse_than_best > threshold and samples >= min_samples."""


@dataclass(frozen=True, slots=True)
class VariantInsight:
    variant_id: str
    variant_key: str
    variant: str
    is_control: bool
    state: VariantState
    samples: int
    conversions: int
    """Successes under the experiment's reward."""
    conversion_rate: float
    """Posterior mean."""
    confidence_interval: Interval
    """Exact equal-tailed 95 % credible interval."""
    prob_best: float
    """P(highest rate among active variants); 0 for a dropped variant."""
    prob_worse_than_best: float
    """P(rate < the leader's rate); for the leader, P(its rate < the runner-up's)."""
    expected_loss: float
    """E[max over active variants - this variant's rate]."""
    lift: float | None
    """Posterior median of rate / control rate - 1; None for the control or without one."""
    lift_interval: Interval | None
    guardrails: tuple[GuardrailInsight, ...]
    fails_fast: bool
    """The stopping rule decided this variant (active or dropped) worse than an active
    one; only active ones are dropped."""
    e_value: float = 0.0
    """The stopping rule's statistic (`StoppingVerdict.log_e_value`, exponentiated):
    evidence this variant is worse than another (for the leader: that it beats all)."""


@dataclass(frozen=True, slots=True)
class SrmCheck:
    applicable: bool
    chi_square: float = 0.0
    degrees_of_freedom: int = 0
    p_value: float = 1.0
    flagged: bool = False


@dataclass(frozen=True, slots=True)
class ExperimentInsights:
    insights: tuple[VariantInsight, ...]
    leading_variant_id: str
    """Active variant with the highest posterior mean; "" before any sample."""
    action: RecommendedAction
    recommendation: str
    failing_variant_ids: tuple[str, ...]
    """Active variants failing fail-fast or a guardrail."""
    threshold: float
    min_samples: int
    srm: SrmCheck
    draws: int
    error_rate: float = stopping.DEFAULT_ERROR_RATE
    """The stopping rule's bound on ever concluding wrongly."""
    e_value_threshold: float = 0.0
    """A pair of variants is decided when its e-value reaches this (pairs / error_rate)."""


# --- building blocks ---------------------------------------------------------------------


def _check_counts(successes: int, trials: int) -> None:
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} and {trials}")


def posterior_mean(successes: int, trials: int) -> float:
    """Mean of Beta(1 + successes, 1 + trials - successes): the seed's Beta(1, 1) prior."""
    _check_counts(successes, trials)
    return (1.0 + successes) / (2.0 + trials)


def credible_interval(successes: int, trials: int, level: float = CREDIBLE_LEVEL) -> Interval:
    """Equal-tailed interval of Beta(1 + successes, 1 + trials - successes) from its exact
    quantiles (the seed's mean +- 1.96 sd is wrong near 0 and 1 and for small counts)."""
    _check_counts(successes, trials)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a, b = 1.0 + successes, 1.0 + trials - successes
    tail = (1.0 - level) / 2.0
    return Interval(
        float(special.betaincinv(a, b, tail)), float(special.betaincinv(a, b, 1 - tail))
    )


def srm_check(assigned: Sequence[int], weights: Sequence[float]) -> SrmCheck:
    """Pearson chi-square of assigned counts against the split the weights promise.
    Not applicable with fewer than two arms or no subject; flagged at p < `SRM_P_VALUE`."""
    if len(assigned) != len(weights):
        raise ValueError("assigned and weights must have the same length")
    observed = np.asarray(assigned, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if observed.size < 2 or observed.sum() <= 0 or not bool(np.all(w > 0)):
        return SrmCheck(applicable=False)
    expected = observed.sum() * w / w.sum()
    chi_square = float(np.sum((observed - expected) ** 2 / expected))
    dof = observed.size - 1
    p_value = float(stats.chi2.sf(chi_square, dof))
    return SrmCheck(True, chi_square, dof, p_value, p_value < SRM_P_VALUE)


def prob_greater(a1: int, b1: int, a2: int, b2: int) -> float:
    """Exact P(X1 > X2) for independent X1 ~ Beta(a1, b1), X2 ~ Beta(a2, b2) with integer
    parameters (Evan Miller's sum, over the smaller of a1 and a2)."""
    if min(a1, b1, a2, b2) < 1:
        raise ValueError("Beta parameters must be positive integers")
    if a1 > a2:
        return 1.0 - prob_greater(a2, b2, a1, b1)
    i = np.arange(a1, dtype=np.float64)
    log_terms = (
        special.betaln(a2 + i, b1 + b2)
        - np.log(b1 + i)
        - special.betaln(1.0 + i, b1)
        - special.betaln(a2, b2)
    )
    return float(np.clip(np.exp(log_terms).sum(), 0.0, 1.0))


def _prob_higher_than_lowest(
    events: npt.NDArray[np.int64], samples: npt.NDArray[np.int64], active: npt.NDArray[np.bool_]
) -> FloatArray:
    """Per variant, P(rate > rate of the active variant with the lowest posterior mean);
    for that variant itself, against the active runner-up. Exact, so guardrails need no
    Monte Carlo pass. 0 where there is nothing to compare with."""
    alpha = 1 + events
    beta = 1 + samples - events
    # Lowest mean first, ties to the lower index (as the reward's leader).
    live = [i for i in np.argsort(alpha / (alpha + beta), kind="stable") if active[i]]
    out = np.zeros(events.size)
    if len(live) < 2:
        return out
    best, runner = int(live[0]), int(live[1])
    for i in range(events.size):
        other = runner if i == best else best
        out[i] = prob_greater(int(alpha[i]), int(beta[i]), int(alpha[other]), int(beta[other]))
    return out


# --- part 1: posterior statistics --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PosteriorStatistics:
    """Per variant, in the order of the arms: counts, Beta parameters and what one Monte
    Carlo pass says about them."""

    samples: npt.NDArray[np.int64]
    successes: npt.NDArray[np.int64]
    active: npt.NDArray[np.bool_]
    control: int
    """Index of the control, -1 without one."""
    alpha: FloatArray
    beta: FloatArray
    prob_best: FloatArray
    prob_worse: FloatArray
    expected_loss: FloatArray
    lift_quantiles: FloatArray
    """Rows: 2.5 %, 50 %, 97.5 % quantiles of the lift vs control (no column without one)."""

    @property
    def leader(self) -> int:
        """Leading active variant (highest posterior mean), -1 before any sample."""
        leader, _ = bayes.leader_and_runner_up(self.alpha, self.beta, self.active)
        return leader if bool(self.samples[self.active].sum() > 0) else -1

    def lift(self, i: int) -> tuple[float | None, Interval | None]:
        if self.control < 0 or i == self.control:
            return None, None
        q = self.lift_quantiles
        return float(q[1, i]), Interval(float(q[0, i]), float(q[2, i]))


def posterior_statistics(
    arms: Sequence[ArmCounts], reward: Reward, draws: int, seed: int
) -> PosteriorStatistics:
    """Beta posteriors of the reward and one Monte Carlo pass over the active variants."""
    samples = np.array([arm.assigned_subjects for arm in arms], dtype=np.int64)
    successes = np.array(
        [
            reward_successes(reward, arm.converted_subjects, arm.refunded_converted_subjects)
            for arm in arms
        ],
        dtype=np.int64,
    )
    active = np.array([arm.state is VariantState.ACTIVE for arm in arms], dtype=np.bool_)
    control = next((i for i, arm in enumerate(arms) if arm.is_control), -1)
    alpha = 1.0 + successes.astype(np.float64)
    beta = 1.0 + (samples - successes).astype(np.float64)
    prob_best, prob_worse, loss, lift_draws = bayes.monte_carlo_core(
        alpha, beta, active, control, draws, seed
    )
    lift_q = np.empty((3, 0))
    if control >= 0:  # the draws are ours to reorder: no copy
        lift_q = np.quantile(lift_draws, [0.025, 0.5, 0.975], axis=1, overwrite_input=True)
    return PosteriorStatistics(
        samples, successes, active, control, alpha, beta, prob_best, prob_worse, loss, lift_q
    )


# --- part 2: guardrails ------------------------------------------------------------------


def guardrails(
    arms: Sequence[ArmCounts],
    samples: npt.NDArray[np.int64],
    active: npt.NDArray[np.bool_],
    rule: FailFast,
) -> tuple[tuple[GuardrailInsight, ...], ...]:
    """Per variant, one `GuardrailInsight` per metric of `GUARDRAIL_METRICS`."""
    per_arm: list[list[GuardrailInsight]] = [[] for _ in arms]
    for metric in GUARDRAIL_METRICS:
        events = np.array(
            [arm.refunded_subjects if metric == "refund" else arm.churned_subjects for arm in arms],
            dtype=np.int64,
        )
        g_worse = _prob_higher_than_lowest(events, samples, active)
        for i in range(len(arms)):
            per_arm[i].append(
                GuardrailInsight(
                    metric=metric,
                    subjects=int(events[i]),
                    rate=posterior_mean(int(events[i]), int(samples[i])),
                    credible_interval=credible_interval(int(events[i]), int(samples[i])),
                    prob_worse_than_best=float(g_worse[i]),
                    flagged=bool(g_worse[i] > rule.threshold and samples[i] >= rule.min_samples),
                )
            )
    return tuple(tuple(g) for g in per_arm)


# --- the whole picture -------------------------------------------------------------------


def compute_insights(
    arms: Sequence[ArmCounts],
    fail_fast: FailFast | None = None,
    *,
    reward: Reward = Reward.CONVERSION,
    allocation: Allocation = Allocation.THOMPSON_SAMPLING,
    status: ExperimentStatus = ExperimentStatus.RUNNING,
    draws: int = DEFAULT_DRAWS,
    seed: int = DEFAULT_SEED,
) -> ExperimentInsights:
    """Every statistic of `ExperimentInsights`, in the order of ``arms``: posterior
    statistics, guardrails, the stopping rule, then the verdict (`domain.verdict`) and its
    words (`domain.recommendation`).

    Probabilities compare *active* variants: a dropped variant is never the best nor the
    leader (it no longer gets subjects, so its stale posterior would otherwise cap the
    leader's P(best) forever), but it still gets its rates, intervals and comparison with
    the active leader. The Monte Carlo pass uses a fixed default ``seed``: the same counts
    always give the same answer.
    """
    rule = fail_fast or FailFast()
    _check_inputs(arms, draws, seed)
    post = posterior_statistics(arms, reward, draws, seed)
    samples, successes, active = post.samples, post.successes, post.active
    guards = guardrails(arms, samples, active, rule)
    decision = stopping.verdict(
        successes,
        samples,
        active,
        error_rate=rule.error_rate,
        min_effect=rule.min_effect,
        min_samples=rule.min_samples,
    )
    insights = _variant_insights(arms, post, guards, decision)
    leader = post.leader
    leading = arms[leader].variant_id if leader >= 0 else ""
    rule_of_verdict = Rule(decision.threshold, rule.error_rate, rule.threshold, rule.min_samples)
    judged = _judge(insights, leading, status, rule_of_verdict)
    failing = [v.variant_id for v in judged.variants if v.active and (v.fails_fast or v.flagged)]
    srm = SrmCheck(applicable=False)
    if allocation is Allocation.FIXED_WEIGHTS:
        # Active variants only: their relative split stays w_i / sum(active w) before and
        # after any drop, so dropping a variant does not fake a mismatch.
        live = [i for i in range(len(arms)) if active[i]]
        srm = srm_check([int(samples[i]) for i in live], [arms[i].weight for i in live])
    return ExperimentInsights(
        insights=insights,
        leading_variant_id=judged.leader_variant_id,
        action=judged.action,
        recommendation=words(judged),
        failing_variant_ids=tuple(failing),
        threshold=rule.threshold,
        min_samples=rule.min_samples,
        srm=srm,
        draws=draws,
        error_rate=rule.error_rate,
        e_value_threshold=decision.threshold,
    )


def _variant_insights(
    arms: Sequence[ArmCounts],
    post: PosteriorStatistics,
    guards: tuple[tuple[GuardrailInsight, ...], ...],
    decision: stopping.StoppingVerdict,
) -> tuple[VariantInsight, ...]:
    samples, successes = post.samples, post.successes
    e_values = decision.e_values
    return tuple(
        VariantInsight(
            variant_id=arm.variant_id,
            variant_key=arm.variant_key,
            variant=arm.name,
            is_control=arm.is_control,
            state=arm.state,
            samples=int(samples[i]),
            conversions=int(successes[i]),
            conversion_rate=posterior_mean(int(successes[i]), int(samples[i])),
            confidence_interval=credible_interval(int(successes[i]), int(samples[i])),
            prob_best=float(post.prob_best[i]),
            prob_worse_than_best=float(post.prob_worse[i]),
            expected_loss=float(post.expected_loss[i]),
            lift=post.lift(i)[0],
            lift_interval=post.lift(i)[1],
            guardrails=guards[i],
            fails_fast=bool(decision.worse[i]),  # dropped ones too, for the record
            e_value=e_values[i],
        )
        for i, arm in enumerate(arms)
    )


def _check_inputs(arms: Sequence[ArmCounts], draws: int, seed: int) -> None:
    if not arms:
        raise ValueError("no variant")
    if sum(arm.is_control for arm in arms) > 1:
        raise ValueError("at most one control variant")
    if draws < 1:
        raise ValueError("draws must be at least 1")
    if not 0 <= seed < _SEED_SPACE:
        raise ValueError("seed must be a non-negative 63-bit integer")


def verdict_of(insights: ExperimentInsights, status: ExperimentStatus) -> Verdict:
    """The verdict behind ``insights.action`` and ``insights.recommendation``, as data:
    the reason, the variants it names and the numbers (no Monte Carlo: cheap)."""
    rule = Rule(
        insights.e_value_threshold, insights.error_rate, insights.threshold, insights.min_samples
    )
    return _judge(insights.insights, insights.leading_variant_id, status, rule)


def _judge(
    insights: Sequence[VariantInsight], leading: str, status: ExperimentStatus, rule: Rule
) -> Verdict:
    return decide(
        [_evidence(v) for v in insights], status=status, leader_variant_id=leading, rule=rule
    )


def _evidence(insight: VariantInsight) -> VariantEvidence:
    return VariantEvidence(
        variant_id=insight.variant_id,
        label=insight.variant or insight.variant_key or insight.variant_id,
        active=insight.state is VariantState.ACTIVE,
        samples=insight.samples,
        prob_best=insight.prob_best,
        prob_worse_than_best=insight.prob_worse_than_best,
        e_value=insight.e_value,
        fails_fast=insight.fails_fast,
        flagged=tuple(
            FlaggedGuardrail(g.metric, g.prob_worse_than_best)
            for g in insight.guardrails
            if g.flagged
        ),
    )
