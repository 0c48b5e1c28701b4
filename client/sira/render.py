"""Human-readable views of API messages for the `sira` CLI (rich renderables).

Pure functions: message in, renderable out. The CLI prints them; `--json`
bypasses this module entirely.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from sira.experiments.v1 import (
    experiment_pb2,
    insights_service_pb2,
    lifecycle_service_pb2,
)

__all__ = [
    "audit_table",
    "conversion_chart",
    "details_summary",
    "enum_word",
    "experiment_view",
    "experiments_table",
    "insights_view",
    "percent",
    "results_view",
    "targeting_summary",
    "timestamp",
]

CHART_WIDTH = 40


def enum_word(name: str) -> str:
    """ "EXPERIMENT_STATUS_RUNNING" -> "running" (the prefix is the first two words)."""
    parts = name.split("_")
    # Every enum here has a two-word prefix (EXPERIMENT_STATUS_, VARIANT_STATE_, ...).
    return "_".join(parts[2:]).lower() if len(parts) > 2 else name.lower()


def _status(value: experiment_pb2.ExperimentStatus.ValueType) -> str:
    return enum_word(experiment_pb2.ExperimentStatus.Name(value))


def _state(value: experiment_pb2.VariantState.ValueType) -> str:
    return enum_word(experiment_pb2.VariantState.Name(value))


def timestamp(ts: timestamp_pb2.Timestamp) -> str:
    """UTC time to the second, "" when unset."""
    if ts.seconds == 0 and ts.nanos == 0:
        return ""
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def percent(rate: float, digits: int = 2) -> str:
    return f"{rate * 100:.{digits}f}%"


def _plain(value: Any) -> Any:
    """Struct numbers are doubles: show 5.0 as 5, as the file said it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _json(struct: struct_pb2.Struct) -> str:
    data = _plain(json_format.MessageToDict(struct))
    return json.dumps(data, ensure_ascii=False, sort_keys=True)


def details_summary(struct: struct_pb2.Struct) -> str:
    """Audit details on one line: scalars as key=value, nested values elided."""
    parts = []
    for key, value in sorted(_plain(json_format.MessageToDict(struct)).items()):
        if value in ("", None, [], {}):
            continue
        if isinstance(value, dict | list):
            value = f"{{{len(value)} fields}}" if isinstance(value, dict) else f"[{len(value)}]"
        elif isinstance(value, float):
            value = f"{value:.6g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def targeting_summary(targeting: experiment_pb2.Targeting) -> str:
    parts = []
    for label, values in (
        ("country", targeting.countries),
        ("language", targeting.languages),
        ("device", targeting.devices),
        ("segment", targeting.user_segments),
    ):
        if values:
            parts.append(f"{label} in {', '.join(values)}")
    if targeting.HasField("min_txn"):
        parts.append(f"min_txn >= {targeting.min_txn}")
    for name in sorted(targeting.attributes):
        parts.append(f"{name} in {', '.join(targeting.attributes[name].values)}")
    return "; ".join(parts) if parts else "everyone"


def experiments_table(
    experiments: Sequence[experiment_pb2.Experiment], title: str | None = None
) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("KEY", no_wrap=True)
    table.add_column("NAME")
    table.add_column("STATUS", no_wrap=True)
    table.add_column("ALLOCATION")
    table.add_column("VARIANTS", justify="right")
    table.add_column("CREATED", no_wrap=True)
    for exp in experiments:
        table.add_row(
            exp.key,
            exp.name,
            _status(exp.status),
            enum_word(experiment_pb2.AllocationStrategy.Name(exp.allocation)),
            str(len(exp.variants)),
            timestamp(exp.create_time),
        )
    return table


def experiment_view(exp: experiment_pb2.Experiment) -> RenderableType:
    """Every field of one experiment, then its variants."""
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column()
    winner = next(
        (v for v in exp.variants if exp.winner_variant_id and v.id == exp.winner_variant_id),
        None,
    )
    fail_fast = exp.fail_fast
    rows = [
        ("id", exp.id),
        ("key", exp.key),
        ("name", exp.name),
        ("description", exp.description),
        ("status", _status(exp.status)),
        ("targeting", targeting_summary(exp.targeting)),
        ("allocation", enum_word(experiment_pb2.AllocationStrategy.Name(exp.allocation))),
        (
            "exposure",
            f"{exp.exposure_percent:g}%" if exp.HasField("exposure_percent") else "",
        ),
        ("primary metric", exp.primary_metric),
        ("reward", enum_word(experiment_pb2.RewardDefinition.Name(exp.reward))),
        (
            "fail-fast",
            f"threshold {fail_fast.threshold:g}, min samples {fail_fast.min_samples}, "
            f"auto-stop {'on' if fail_fast.auto_stop else 'off'}, error rate "
            f"{fail_fast.error_rate:g}, min effect {fail_fast.min_effect:g}"
            if exp.HasField("fail_fast")
            else "",
        ),
        ("created", _by(timestamp(exp.create_time), exp.created_by)),
        ("started", timestamp(exp.start_time)),
        ("stopped", timestamp(exp.stop_time)),
        ("archived", timestamp(exp.archive_time)),
        ("winner", f"{winner.key} ({winner.name})" if winner else exp.winner_variant_id),
        ("stop reason", exp.stop_reason),
        ("version", str(exp.version)),
    ]
    for label, value in rows:
        if value:
            fields.add_row(label, value)
    variants = Table(title="variants", title_justify="left")
    variants.add_column("KEY", no_wrap=True)
    variants.add_column("NAME")
    variants.add_column("CONTROL", justify="center")
    variants.add_column("WEIGHT", justify="right")
    variants.add_column("STATE")
    variants.add_column("CONFIG", overflow="fold")
    for variant in exp.variants:
        variants.add_row(
            variant.key,
            variant.name,
            "yes" if variant.is_control else "",
            f"{variant.weight:g}",
            _state(variant.state),
            _json(variant.config),
        )
    return Group(fields, Text(), variants)


def _by(when: str, who: str) -> str:
    return f"{when} by {who}" if when and who else when or who


def audit_table(events: Sequence[lifecycle_service_pb2.AuditEvent]) -> Table:
    table = Table()
    table.add_column("TIME", no_wrap=True)
    table.add_column("ACTION", no_wrap=True)
    table.add_column("ACTOR")
    table.add_column("EXPERIMENT", overflow="fold")
    table.add_column("DETAILS", overflow="fold")
    for event in events:
        table.add_row(
            timestamp(event.create_time),
            event.action,
            event.actor,
            event.experiment_id,
            details_summary(event.details),
        )
    return table


def results_view(response: insights_service_pb2.GetResultsResponse) -> RenderableType:
    table = Table(
        title=f"results ({_status(response.status)}{_computed(response.compute_time)})",
        title_justify="left",
    )
    table.add_column("VARIANT")
    table.add_column("STATE")
    for name in ("ASSIGNED", "CONVERTED", "RATE", "REVENUE"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("REFUNDS", justify="right")
    table.add_column("CHURN", justify="right")
    for v in response.variants:
        revenue = "\n".join(
            f"{r.currency} {r.total:,.2f} ({r.per_assigned_subject:,.2f}/subject)"
            for r in v.revenue
        )
        table.add_row(
            _variant_label(v.variant_name or v.variant_key, v.is_control),
            _state(v.state),
            str(v.assigned_subjects),
            f"{v.converted_subjects} ({v.conversions} events)",
            percent(v.conversion_rate),
            revenue or "-",
            f"{v.refunded_subjects} ({percent(v.refund_rate)})",
            f"{v.churned_subjects} ({percent(v.churn_rate)})",
        )
    return table


def _computed(ts: timestamp_pb2.Timestamp) -> str:
    when = timestamp(ts)
    return f", computed {when}" if when else ""


def _variant_label(name: str, is_control: bool) -> str:
    return f"{name} (control)" if is_control else name


def insights_view(response: insights_service_pb2.GetInsightsResponse) -> RenderableType:
    """Statistics table, conversion chart with credible intervals, recommendation."""
    table = Table(
        title=f"insights ({_status(response.status)}, {response.draws} draws"
        f"{_computed(response.compute_time)})",
        title_justify="left",
    )
    table.add_column("VARIANT", ratio=1)
    for name in ("CONV/N", "RATE", "95% CI", "P(BEST)", "P(WORSE)", "LOSS", "LIFT [95%]"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("FLAGS", min_width=9, overflow="fold")
    for v in response.insights:
        ci = v.confidence_interval
        lift = ""
        if v.HasField("lift"):
            li = v.lift_interval
            lift = f"{v.lift * 100:+.1f}% [{li.lower * 100:+.0f}, {li.upper * 100:+.0f}]"
        flags = ["fail-fast"] if v.fails_fast else []
        if v.state == experiment_pb2.VARIANT_STATE_DROPPED:
            flags.append("dropped")
        flags += [f"{g.metric}!" for g in v.guardrails if g.flagged]
        if v.variant_id and v.variant_id == response.leading_variant_id:
            flags.insert(0, "leading")
        table.add_row(
            _variant_label(v.variant or v.variant_key, v.is_control),
            f"{v.conversions}/{v.samples}",
            percent(v.conversion_rate),
            f"[{percent(ci.lower)}, {percent(ci.upper)}]",
            percent(v.prob_best, 1),
            percent(v.prob_worse_than_best, 1),
            f"{v.expected_loss:.4f}",
            lift,
            " ".join(flags),
        )
    legend = (
        f"P(WORSE): probability of trailing the best. Fail-fast: a variant decided worse "
        f"by an always-valid test (e-value >= {response.e_value_threshold:.0f}, error rate "
        f"{response.error_rate:g}) with at least {response.min_samples} samples. "
        "LOSS: expected shortfall if chosen."
    )
    parts: list[RenderableType] = [table, Text(legend, style="dim"), Text()]
    parts.append(conversion_chart(response))
    action = enum_word(insights_service_pb2.RecommendedAction.Name(response.action))
    recommendation = Text()
    recommendation.append("recommendation: ", style="bold")
    recommendation.append(f"{action.replace('_', ' ')}")
    if response.recommendation:
        recommendation.append(f" — {response.recommendation}")
    parts += [Text(), recommendation]
    srm = response.srm
    if srm.applicable:
        verdict = "MISMATCH" if srm.flagged else "ok"
        parts.append(
            Text(
                f"sample ratio check: {verdict} (chi2 {srm.chi_square:.2f}, "
                f"df {srm.degrees_of_freedom}, p {srm.p_value:.4g})",
                style="red" if srm.flagged else "",
            )
        )
    return Group(*parts)


def conversion_chart(
    response: insights_service_pb2.GetInsightsResponse, width: int = CHART_WIDTH
) -> Text:
    """One bar per variant: solid to the interval's lower bound, ▓ from there to the
    posterior mean (│), ░ on to the upper bound; all on one shared scale."""
    insights = list(response.insights)
    chart = Text()
    chart.append("conversion rate, posterior mean and 95% credible interval\n", style="bold")
    if not insights:
        chart.append("(no variants)")
        return chart
    scale = max(max(v.confidence_interval.upper, v.conversion_rate) for v in insights)
    scale = scale if scale > 0 else 1.0
    label_width = max(len(v.variant or v.variant_key) for v in insights)
    for v in insights:
        lower = v.confidence_interval.lower / scale * width
        upper = v.confidence_interval.upper / scale * width
        mean = v.conversion_rate / scale * width
        mean_cell = min(width - 1, int(mean))
        cells = []
        for i in range(width):
            centre = i + 0.5
            if i == mean_cell:
                cells.append("│")
            elif centre <= lower:
                cells.append("█")
            elif centre < mean:
                cells.append("▓")
            elif centre <= upper:
                cells.append("░")
            else:
                cells.append(" ")
        leading = v.variant_id != "" and v.variant_id == response.leading_variant_id
        style = "red" if v.fails_fast else "green" if leading else ""
        chart.append(f"{(v.variant or v.variant_key):<{label_width}}  ")
        chart.append("".join(cells), style=style)
        ci = v.confidence_interval
        chart.append(f"  {percent(v.conversion_rate)} [{percent(ci.lower)}, {percent(ci.upper)}]\n")
    chart.append(f"{'':<{label_width}}  0{'':<{width - 2}}{percent(scale)}\n", style="dim")
    chart.append(
        "█ below the interval  ▓ lower bound to mean  │ mean  ░ mean to upper bound", style="dim"
    )
    return chart
