"""Results and insights as protobuf: the translation layer of InsightsService."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import timestamp_pb2

from sira.experiments.v1 import insights_service_pb2 as pb
from sira_server.api.convert import STATUS_TO_PROTO, VARIANT_STATE_TO_PROTO
from sira_server.domain.experiment import ExperimentStatus, VariantState
from sira_server.domain.insights import ExperimentInsights, VariantInsight
from sira_server.store.hot_state import VariantCounters


def rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def variant_results(
    variant_id: str,
    variant_key: str,
    variant_name: str,
    is_control: bool,
    state: VariantState,
    c: VariantCounters,
) -> pb.VariantResults:
    n = c.assigned_subjects
    return pb.VariantResults(
        variant_id=variant_id,
        variant_key=variant_key,
        variant_name=variant_name,
        is_control=is_control,
        state=VARIANT_STATE_TO_PROTO[state],
        assigned_subjects=n,
        converted_subjects=c.converted_subjects,
        conversions=c.conversions,
        conversion_rate=rate(c.converted_subjects, n),
        revenue=[
            pb.Revenue(currency=cur, total=total, per_assigned_subject=total / n if n else 0.0)
            for cur, total in sorted(c.revenue.items())
        ],
        refunds=c.refunds,
        refunded_subjects=c.refunded_subjects,
        refund_rate=rate(c.refunded_subjects, n),
        churns=c.churns,
        churned_subjects=c.churned_subjects,
        churn_rate=rate(c.churned_subjects, n),
    )


def results_response(
    experiment_id: str,
    status: ExperimentStatus,
    rows: list[pb.VariantResults],
    computed: timestamp_pb2.Timestamp,
) -> pb.GetResultsResponse:
    return pb.GetResultsResponse(
        experiment_id=experiment_id,
        status=STATUS_TO_PROTO[status],
        variants=rows,
        compute_time=computed,
    )


def counters_for(counters: Mapping[str, VariantCounters], variant_id: str) -> VariantCounters:
    return counters.get(variant_id) or VariantCounters()


def _interval(value: tuple[float, float]) -> pb.Interval:
    return pb.Interval(lower=value[0], upper=value[1])


def variant_insight(v: VariantInsight) -> pb.VariantInsight:
    msg = pb.VariantInsight(
        variant_id=v.variant_id,
        variant_key=v.variant_key,
        variant=v.variant,
        is_control=v.is_control,
        state=VARIANT_STATE_TO_PROTO[v.state],
        samples=v.samples,
        conversions=v.conversions,
        conversion_rate=v.conversion_rate,
        confidence_interval=_interval(v.confidence_interval),
        prob_best=v.prob_best,
        prob_worse_than_best=v.prob_worse_than_best,
        expected_loss=v.expected_loss,
        guardrails=[
            pb.GuardrailInsight(
                metric=g.metric,
                subjects=g.subjects,
                rate=g.rate,
                credible_interval=_interval(g.credible_interval),
                prob_worse_than_best=g.prob_worse_than_best,
                flagged=g.flagged,
            )
            for g in v.guardrails
        ],
        fails_fast=v.fails_fast,
        e_value=v.e_value,
    )
    if v.lift is not None:
        msg.lift = v.lift
    if v.lift_interval is not None:
        msg.lift_interval.CopyFrom(_interval(v.lift_interval))
    return msg


def insights_response(
    experiment_id: str,
    status: ExperimentStatus,
    insights: ExperimentInsights,
    computed_at: float,
) -> pb.GetInsightsResponse:
    computed = timestamp_pb2.Timestamp()
    computed.FromNanoseconds(int(computed_at * 1e9))
    srm = insights.srm
    return pb.GetInsightsResponse(
        experiment_id=experiment_id,
        status=STATUS_TO_PROTO[status],
        insights=[variant_insight(v) for v in insights.insights],
        leading_variant_id=insights.leading_variant_id,
        action=pb.RecommendedAction.Value(insights.action.value),
        recommendation=insights.recommendation,
        failing_variant_ids=list(insights.failing_variant_ids),
        threshold=insights.threshold,
        min_samples=insights.min_samples,
        srm=pb.SrmCheck(
            applicable=srm.applicable,
            chi_square=srm.chi_square,
            degrees_of_freedom=srm.degrees_of_freedom,
            p_value=srm.p_value,
            flagged=srm.flagged,
        ),
        draws=insights.draws,
        compute_time=computed,
        error_rate=insights.error_rate,
        e_value_threshold=insights.e_value_threshold,
    )
