"""Protobuf <-> domain translation for the lifecycle API. No validation and no I/O:
requests become unchecked `ExperimentInput` (validated by `domain.validation`),
domain objects become response messages.

proto3 has no "unset" for plain scalars, so a few zero values mean "unset" on input:
``Variant.weight == 0`` (default 1), ``UNSPECIFIED`` enums (their documented default),
an empty ``primary_metric`` ("conversion"). ``exposure_percent`` and the fail-fast
settings are ``optional`` and use presence instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from sira.experiments.v1 import experiment_pb2, lifecycle_service_pb2
from sira_server.domain.experiment import (
    Allocation,
    AuditEvent,
    Experiment,
    ExperimentStatus,
    JsonObject,
    Reward,
    Variant,
    VariantState,
)
from sira_server.domain.targeting import TargetingRule
from sira_server.domain.validation import ExperimentInput, VariantInput
from sira_server.errors import FieldViolation, InvalidArgument

__all__ = [
    "STATUS_TO_PROTO",
    "VARIANT_STATE_TO_PROTO",
    "audit_event_to_proto",
    "experiment_input_from_proto",
    "experiment_to_proto",
    "json_to_struct",
    "status_from_proto",
    "struct_to_json",
    "targeting_json_from_proto",
    "targeting_to_proto",
]

STATUS_TO_PROTO: Mapping[ExperimentStatus, experiment_pb2.ExperimentStatus.ValueType] = {
    ExperimentStatus.DRAFT: experiment_pb2.EXPERIMENT_STATUS_DRAFT,
    ExperimentStatus.RUNNING: experiment_pb2.EXPERIMENT_STATUS_RUNNING,
    ExperimentStatus.STOPPED: experiment_pb2.EXPERIMENT_STATUS_STOPPED,
    ExperimentStatus.ARCHIVED: experiment_pb2.EXPERIMENT_STATUS_ARCHIVED,
}
_STATUS_FROM_PROTO: Mapping[int, ExperimentStatus] = {
    int(number): status for status, number in STATUS_TO_PROTO.items()
}
_ALLOCATION_TO_PROTO: Mapping[Allocation, experiment_pb2.AllocationStrategy.ValueType] = {
    Allocation.THOMPSON_SAMPLING: experiment_pb2.ALLOCATION_STRATEGY_THOMPSON_SAMPLING,
    Allocation.FIXED_WEIGHTS: experiment_pb2.ALLOCATION_STRATEGY_FIXED_WEIGHTS,
}
_ALLOCATION_FROM_PROTO: Mapping[int, Allocation | Reward] = {
    int(number): value for value, number in _ALLOCATION_TO_PROTO.items()
}
_REWARD_TO_PROTO: Mapping[Reward, experiment_pb2.RewardDefinition.ValueType] = {
    Reward.CONVERSION: experiment_pb2.REWARD_DEFINITION_CONVERSION,
    Reward.CONVERSION_NOT_REFUNDED: experiment_pb2.REWARD_DEFINITION_CONVERSION_NOT_REFUNDED,
}
_REWARD_FROM_PROTO: Mapping[int, Allocation | Reward] = {
    int(number): value for value, number in _REWARD_TO_PROTO.items()
}
VARIANT_STATE_TO_PROTO: Mapping[VariantState, experiment_pb2.VariantState.ValueType] = {
    VariantState.ACTIVE: experiment_pb2.VARIANT_STATE_ACTIVE,
    VariantState.DROPPED: experiment_pb2.VARIANT_STATE_DROPPED,
}
# Struct numbers are doubles; integral ones read back as ints up to 2**53 (exact there).
_MAX_EXACT_INT = 2**53


# --- requests -> domain ---------------------------------------------------------------


def experiment_input_from_proto(msg: experiment_pb2.Experiment) -> ExperimentInput:
    """The unchecked input of a Create/Update request (output-only fields ignored)."""
    fail_fast = msg.fail_fast
    return ExperimentInput(
        name=msg.name,
        key=msg.key,
        description=msg.description,
        targeting=targeting_json_from_proto(msg.targeting) if msg.HasField("targeting") else None,
        allocation=_enum_input(msg.allocation, _ALLOCATION_FROM_PROTO),
        exposure_percent=msg.exposure_percent if msg.HasField("exposure_percent") else None,
        primary_metric=msg.primary_metric,
        fail_fast_threshold=fail_fast.threshold if fail_fast.HasField("threshold") else None,
        fail_fast_min_samples=(
            fail_fast.min_samples if fail_fast.HasField("min_samples") else None
        ),
        auto_stop=fail_fast.auto_stop,
        fail_fast_error_rate=(fail_fast.error_rate if fail_fast.HasField("error_rate") else None),
        fail_fast_min_effect=(fail_fast.min_effect if fail_fast.HasField("min_effect") else None),
        reward=_enum_input(msg.reward, _REWARD_FROM_PROTO),
        variants=[
            VariantInput(
                key=v.key,
                name=v.name,
                config=struct_to_json(v.config) if v.HasField("config") else None,
                is_control=v.is_control,
                weight=v.weight or None,  # proto3 0 = unset -> default 1
            )
            for v in msg.variants
        ],
    )


def _enum_input(number: int, known: Mapping[int, Allocation | Reward]) -> str | None:
    """UNSPECIFIED -> None (the default); an unknown number -> a string validation rejects."""
    if number == 0:
        return None
    value = known.get(number)
    return value.value if value is not None else str(number)


def targeting_json_from_proto(msg: experiment_pb2.Targeting) -> JsonObject:
    """The canonical targeting JSON of a `Targeting` message (not yet validated)."""
    return {
        "countries": list(msg.countries),
        "languages": list(msg.languages),
        "devices": list(msg.devices),
        "user_segments": list(msg.user_segments),
        "min_txn": msg.min_txn if msg.HasField("min_txn") else None,
        "attributes": {name: list(values.values) for name, values in msg.attributes.items()},
    }


def status_from_proto(number: int, *, field: str = "status") -> ExperimentStatus | None:
    """UNSPECIFIED -> None (no filter); an unknown number -> InvalidArgument."""
    if number == 0:
        return None
    status = _STATUS_FROM_PROTO.get(number)
    if status is None:
        raise InvalidArgument.from_violations(
            [FieldViolation(field, f"unknown ExperimentStatus value {number}")]
        )
    return status


def struct_to_json(msg: struct_pb2.Struct) -> JsonObject:
    """A Struct as plain JSON; integral numbers come back as ints (Struct has only
    doubles, so ``{"discount_percent": 5}`` would otherwise read ``5.0``)."""
    plain: JsonObject = _integral_to_int(json_format.MessageToDict(msg))
    return plain


def _integral_to_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT_INT:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_to_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_to_int(v) for v in value]
    return value


# --- domain -> responses --------------------------------------------------------------


def json_to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    msg = struct_pb2.Struct()
    msg.update(value)
    return msg


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    msg = timestamp_pb2.Timestamp()
    msg.FromDatetime(value)
    return msg


def targeting_to_proto(rule: TargetingRule) -> experiment_pb2.Targeting:
    msg = experiment_pb2.Targeting(
        countries=sorted(rule.countries),
        languages=sorted(rule.languages),
        devices=sorted(rule.devices),
        user_segments=sorted(rule.user_segments),
    )
    if rule.min_txn is not None:
        msg.min_txn = rule.min_txn
    for name in sorted(rule.attributes):
        msg.attributes[name].values.extend(sorted(rule.attributes[name]))
    return msg


def _variant_to_proto(variant: Variant) -> experiment_pb2.Variant:
    msg = experiment_pb2.Variant(
        id=variant.id,
        key=variant.key,
        name=variant.name,
        config=json_to_struct(variant.config),
        is_control=variant.is_control,
        weight=variant.weight,
        state=VARIANT_STATE_TO_PROTO[variant.state],
    )
    if variant.dropped_at is not None:
        msg.drop_time.CopyFrom(_timestamp(variant.dropped_at))
    return msg


def experiment_to_proto(experiment: Experiment) -> experiment_pb2.Experiment:
    e = experiment
    msg = experiment_pb2.Experiment(
        id=e.id,
        key=e.key,
        name=e.name,
        description=e.description,
        status=STATUS_TO_PROTO[e.status],
        targeting=targeting_to_proto(e.targeting),
        allocation=_ALLOCATION_TO_PROTO[e.allocation],
        exposure_percent=e.exposure_percent,
        primary_metric=e.primary_metric,
        fail_fast=experiment_pb2.FailFastSettings(
            threshold=e.fail_fast.threshold,
            min_samples=e.fail_fast.min_samples,
            auto_stop=e.fail_fast.auto_stop,
            error_rate=e.fail_fast.error_rate,
            min_effect=e.fail_fast.min_effect,
        ),
        reward=_REWARD_TO_PROTO[e.reward],
        variants=[_variant_to_proto(v) for v in e.variants],
        create_time=_timestamp(e.created_at),
        update_time=_timestamp(e.updated_at),
        created_by=e.created_by,
        winner_variant_id=e.winner_variant_id or "",
        stop_reason=e.stop_reason,
        version=e.version,
    )
    for field, value in (
        ("start_time", e.started_at),
        ("stop_time", e.stopped_at),
        ("archive_time", e.archived_at),
    ):
        if value is not None:
            getattr(msg, field).CopyFrom(_timestamp(value))
    return msg


def audit_event_to_proto(event: AuditEvent) -> lifecycle_service_pb2.AuditEvent:
    return lifecycle_service_pb2.AuditEvent(
        id=event.id,
        experiment_id=event.experiment_id or "",
        actor=event.actor,
        action=event.action,
        details=json_to_struct(event.details),
        create_time=_timestamp(event.created_at),
    )
