"""A verdict in plain English, for people (GetInsights, the CLI, a stop reason).

Nothing decides here: `domain.verdict.decide` chose the action; this only says it.
"""

from __future__ import annotations

from sira_server.domain.verdict import Verdict, VerdictReason


def percent(p: float) -> str:
    return f"{100.0 * p:.1f}%"


def words(verdict: Verdict) -> str:
    """The recommendation sentence of ``verdict``."""
    v = verdict
    named = [v.evidence_of(i) for i in v.variant_ids]
    leader = v.evidence_of(v.leader_variant_id) if v.leader_variant_id else None
    leader_label = leader.label if leader is not None else ""
    guarantee = (
        f"e-value threshold {v.e_value_threshold:.0f}: under continuous monitoring the "
        f"chance of ever concluding wrongly is at most {percent(v.error_rate)}"
    )
    match v.reason:
        case VerdictReason.CONCLUDED:
            return f"The experiment is {v.status}: nothing to decide."
        case VerdictReason.DRAFT:
            return "Draft: start the experiment to collect data."
        case VerdictReason.NO_ACTIVE_VARIANT:
            return "No active variant left: stop the experiment without a winner."
        case VerdictReason.ONLY_ONE_ACTIVE:
            only = v.evidence_of(v.winner_variant_id).label
            return f"Stop: '{only}' is the only active variant left; ship it."
        case VerdictReason.WINNER_DECIDED:
            winner = v.evidence_of(v.winner_variant_id)
            beaten = ", ".join(f"'{b.label}' (e-value {b.e_value:.3g})" for b in named)
            return (
                f"Stop: '{winner.label}' wins; it beats {beaten} ({guarantee}). "
                f"P(best)={percent(winner.prob_best)}."
            )
        case VerdictReason.VARIANTS_FAILING:
            reasons = []
            for failing in named:
                why = []
                if failing.fails_fast:
                    why.append(
                        f"worse than another variant, e-value {failing.e_value:.3g}; "
                        f"P(worse than '{leader_label}')="
                        f"{percent(failing.prob_worse_than_best)}"
                    )
                why += [
                    f"{g.metric} rate P(worse than best)={percent(g.prob_worse_than_best)}"
                    for g in failing.flagged
                ]
                reasons.append(f"'{failing.label}' ({', '.join(why)})")
            return (
                f"Drop {', '.join(reasons)} ({guarantee}; guardrail threshold "
                f"{percent(v.guardrail_threshold)}); keep running the others."
            )
        case VerdictReason.ALL_FAILING:
            return (
                "Every active variant fails fail-fast or a guardrail: review the guardrails "
                "before dropping anything."
            )
        case VerdictReason.NEEDS_SAMPLES:
            needs = ", ".join(f"{v.min_samples - s.samples} more on '{s.label}'" for s in named)
            lead = (
                f" Leader so far: '{leader.label}' with P(best)={percent(leader.prob_best)}."
                if leader is not None
                else ""
            )
            return f"Keep running: need {needs} (min_samples={v.min_samples}).{lead}"
        case VerdictReason.UNDECIDED:
            # min_samples >= 1 (validation), so a leader exists; 0s if called without
            prob_best, e_value = (leader.prob_best, leader.e_value) if leader else (0.0, 0.0)
            return (
                f"Keep running: no difference decided yet: '{leader_label}' leads with "
                f"P(best)={percent(prob_best)}, e-value "
                f"{e_value:.3g} < {v.e_value_threshold:.0f} "
                f"(error rate {percent(v.error_rate)})."
            )
