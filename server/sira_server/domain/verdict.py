"""The verdict: what to do with an experiment now, as data.

`decide` applies the rules in order (concluded, draft, nothing active, one left, a
winner, variants to drop, everything failing, too few samples, undecided) to numbers the
insights already computed; it writes no English. `domain.recommendation.words` turns a
verdict into the sentence people read; the autopilot and the audit log keep the verdict
itself (`Verdict.as_json`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sira_server.domain.experiment import ExperimentStatus


class RecommendedAction(StrEnum):
    """Values are the names of the proto enum ``RecommendedAction``."""

    UNSPECIFIED = "RECOMMENDED_ACTION_UNSPECIFIED"
    KEEP_RUNNING = "RECOMMENDED_ACTION_KEEP_RUNNING"
    STOP_WITH_WINNER = "RECOMMENDED_ACTION_STOP_WITH_WINNER"
    DROP_VARIANTS = "RECOMMENDED_ACTION_DROP_VARIANTS"
    CONCLUDED = "RECOMMENDED_ACTION_CONCLUDED"


class VerdictReason(StrEnum):
    """Why the action: the rule of `decide` that applied (values go to the audit log)."""

    CONCLUDED = "concluded"
    """Stopped or archived: nothing to decide."""
    DRAFT = "draft"
    NO_ACTIVE_VARIANT = "no_active_variant"
    ONLY_ONE_ACTIVE = "only_one_active"
    """Every other variant was dropped: the one left is the winner."""
    WINNER_DECIDED = "winner_decided"
    """The stopping rule decided every other active variant worse than the winner."""
    VARIANTS_FAILING = "variants_failing"
    """Some active variants fail fail-fast or a guardrail: drop them."""
    ALL_FAILING = "all_failing"
    """Every active variant fails something: a person should look first."""
    NEEDS_SAMPLES = "needs_samples"
    """Active variants below min_samples."""
    UNDECIDED = "undecided"
    """Enough samples, no difference decided yet."""


@dataclass(frozen=True, slots=True)
class FlaggedGuardrail:
    metric: str
    prob_worse_than_best: float


@dataclass(frozen=True, slots=True)
class VariantEvidence:
    """The numbers of one variant that a verdict may rest on."""

    variant_id: str
    label: str
    """How the recommendation names the variant."""
    active: bool
    samples: int
    prob_best: float
    prob_worse_than_best: float
    e_value: float
    fails_fast: bool
    flagged: tuple[FlaggedGuardrail, ...] = ()
    """Guardrails flagged for this variant, in `GUARDRAIL_METRICS` order."""


@dataclass(frozen=True, slots=True)
class Verdict:
    action: RecommendedAction
    reason: VerdictReason
    status: ExperimentStatus
    variant_ids: tuple[str, ...]
    """The variants the verdict is about: beaten by the winner (WINNER_DECIDED), to drop
    (VARIANTS_FAILING), failing (ALL_FAILING), short of samples (NEEDS_SAMPLES)."""
    winner_variant_id: str
    """The variant to ship (STOP_WITH_WINNER), else ""."""
    leader_variant_id: str
    """Active variant with the highest posterior mean; "" before any sample."""
    variants: tuple[VariantEvidence, ...]
    """Every variant, in the order of the insights."""
    e_value_threshold: float
    error_rate: float
    guardrail_threshold: float
    min_samples: int

    def evidence_of(self, variant_id: str) -> VariantEvidence:
        return next(v for v in self.variants if v.variant_id == variant_id)

    def as_json(self) -> dict[str, Any]:
        """The verdict for the audit log: enums by value, every number as is."""
        return {
            "action": self.action.value,
            "reason": self.reason.value,
            "status": self.status.value,
            "variant_ids": list(self.variant_ids),
            "winner_variant_id": self.winner_variant_id,
            "leader_variant_id": self.leader_variant_id,
            "e_value_threshold": self.e_value_threshold,
            "error_rate": self.error_rate,
            "guardrail_threshold": self.guardrail_threshold,
            "min_samples": self.min_samples,
            "variants": [
                {
                    "variant_id": v.variant_id,
                    "active": v.active,
                    "samples": v.samples,
                    "prob_best": v.prob_best,
                    "prob_worse_than_best": v.prob_worse_than_best,
                    "e_value": v.e_value,
                    "fails_fast": v.fails_fast,
                    "guardrails_flagged": {g.metric: g.prob_worse_than_best for g in v.flagged},
                }
                for v in self.variants
            ],
        }


@dataclass(frozen=True, slots=True)
class Rule:
    """The thresholds a verdict is judged by."""

    e_value_threshold: float
    error_rate: float
    guardrail_threshold: float
    min_samples: int


def decide(
    variants: Sequence[VariantEvidence],
    *,
    status: ExperimentStatus,
    leader_variant_id: str,
    rule: Rule,
) -> Verdict:
    """The first rule that applies, with the variants it names.

    ``leader_variant_id``: the leading active variant, "" before any sample. The stopping
    rule's winner is the only active variant not failing fail-fast when the others all
    do (as `domain.stopping.StoppingVerdict.winner`).
    """
    leader = next((i for i, v in enumerate(variants) if v.variant_id == leader_variant_id), -1)
    live = [i for i, v in enumerate(variants) if v.active]
    beaten = [i for i in live if variants[i].fails_fast]
    remaining = [i for i in live if not variants[i].fails_fast]
    winner = remaining[0] if beaten and len(remaining) == 1 else -1

    def verdict(
        action: RecommendedAction,
        reason: VerdictReason,
        named: Sequence[int] = (),
        winner_index: int = -1,
    ) -> Verdict:
        return Verdict(
            action=action,
            reason=reason,
            status=status,
            variant_ids=tuple(variants[i].variant_id for i in named),
            winner_variant_id=variants[winner_index].variant_id if winner_index >= 0 else "",
            leader_variant_id=variants[leader].variant_id if leader >= 0 else "",
            variants=tuple(variants),
            e_value_threshold=rule.e_value_threshold,
            error_rate=rule.error_rate,
            guardrail_threshold=rule.guardrail_threshold,
            min_samples=rule.min_samples,
        )

    if status in (ExperimentStatus.STOPPED, ExperimentStatus.ARCHIVED):
        return verdict(RecommendedAction.CONCLUDED, VerdictReason.CONCLUDED)
    if status is ExperimentStatus.DRAFT:
        return verdict(RecommendedAction.UNSPECIFIED, VerdictReason.DRAFT)
    if not live:
        return verdict(RecommendedAction.UNSPECIFIED, VerdictReason.NO_ACTIVE_VARIANT)
    if len(live) == 1:
        return verdict(
            RecommendedAction.STOP_WITH_WINNER,
            VerdictReason.ONLY_ONE_ACTIVE,
            winner_index=live[0],
        )
    if winner >= 0 and not variants[winner].flagged:
        return verdict(
            RecommendedAction.STOP_WITH_WINNER,
            VerdictReason.WINNER_DECIDED,
            beaten,
            winner_index=winner,
        )
    failing = [i for i in live if variants[i].fails_fast or variants[i].flagged]
    if failing and len(failing) < len(live):
        return verdict(RecommendedAction.DROP_VARIANTS, VerdictReason.VARIANTS_FAILING, failing)
    if failing:
        return verdict(RecommendedAction.KEEP_RUNNING, VerdictReason.ALL_FAILING, failing)
    short = [i for i in live if variants[i].samples < rule.min_samples]
    if short:
        return verdict(RecommendedAction.KEEP_RUNNING, VerdictReason.NEEDS_SAMPLES, short)
    return verdict(RecommendedAction.KEEP_RUNNING, VerdictReason.UNDECIDED)
