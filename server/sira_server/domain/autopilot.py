"""What fail-fast does on its own (auto-stop on): pure planning from the insights.

- A variant failing fail-fast or a guardrail stops receiving new subjects (dropped);
  its subjects keep it (sticky). Fail-fast is the always-valid stopping rule
  (`domain.stopping`): the variant was decided worse than another active one, with the
  chance of ever deciding so wrongly bounded by the experiment's error rate.
- When one active variant remains, the experiment concludes with it.

A plan acts on the verdict (`domain.verdict`: action, reason enum, variant ids), never
on words. The evidence goes to the audit log as data: the verdict with the numbers it
rests on (the rule's e-values, e-value threshold and error rate among them) and every
variant's statistics. The prose (`reason`, the recommendation rendered from the verdict)
is only the stop reason people read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sira_server.domain.experiment import Experiment, ExperimentStatus
from sira_server.domain.insights import ExperimentInsights, verdict_of
from sira_server.domain.verdict import RecommendedAction, Verdict

AUTOPILOT_ACTOR = "sira"
"""Audit actor of the server's own decisions."""


@dataclass(frozen=True, slots=True)
class Plan:
    drop: tuple[str, ...] = ()
    """Variant ids to drop."""
    winner: str | None = None
    """Conclude the experiment with this winner (after the drops)."""
    reason: str = ""
    """For people: the stop reason (the recommendation's words)."""
    evidence: dict[str, Any] = field(default_factory=dict)
    """For the audit log: `evidence` of the insights, the verdict included."""
    verdict: Verdict | None = None

    @property
    def empty(self) -> bool:
        return not self.drop and self.winner is None


def evidence(insights: ExperimentInsights, verdict: Verdict) -> dict[str, Any]:
    """The verdict and the numbers behind it, as they go into the audit log."""
    return {
        "verdict": verdict.as_json(),
        "rule": "pairwise mixture SPRT (always valid), see docs/statistics.md",
        "error_rate": insights.error_rate,
        "e_value_threshold": insights.e_value_threshold,
        "threshold": insights.threshold,
        "min_samples": insights.min_samples,
        "draws": insights.draws,
        "leading_variant_id": insights.leading_variant_id,
        "variants": [
            {
                "variant_id": v.variant_id,
                "variant_key": v.variant_key,
                "samples": v.samples,
                "conversions": v.conversions,
                "conversion_rate": v.conversion_rate,
                "credible_interval": list(v.confidence_interval),
                "prob_best": v.prob_best,
                "prob_worse_than_best": v.prob_worse_than_best,
                "expected_loss": v.expected_loss,
                "e_value": v.e_value,
                "fails_fast": v.fails_fast,
                "guardrails_flagged": [g.metric for g in v.guardrails if g.flagged],
            }
            for v in insights.insights
        ],
    }


def plan(experiment: Experiment, insights: ExperimentInsights) -> Plan:
    """The steps auto-stop takes now; an empty plan when there is nothing to do."""
    if not experiment.fail_fast.auto_stop or experiment.status is not ExperimentStatus.RUNNING:
        return Plan()
    verdict = verdict_of(insights, experiment.status)
    active = [v.id for v in experiment.variants if v.is_active]
    failing = tuple(v for v in insights.failing_variant_ids if v in active)
    remaining = [v for v in active if v not in failing]
    proof = evidence(insights, verdict)
    if failing and len(remaining) == 1:
        winner = remaining[0]
        name = next(v.name for v in experiment.variants if v.id == winner)
        return Plan(
            drop=failing,
            winner=winner,
            reason=f"auto-stop: every other variant failed; '{name}' wins. "
            + insights.recommendation,
            evidence=proof,
            verdict=verdict,
        )
    if (
        verdict.action is RecommendedAction.STOP_WITH_WINNER
        and len(active) == 1
        and verdict.leader_variant_id == verdict.winner_variant_id
    ):
        return Plan(
            winner=verdict.winner_variant_id,
            reason=insights.recommendation,
            evidence=proof,
            verdict=verdict,
        )
    if failing and remaining:
        return Plan(drop=failing, reason=insights.recommendation, evidence=proof, verdict=verdict)
    return Plan()
