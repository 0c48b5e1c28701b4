"""Experiments as the rest of the server sees them, and their lifecycle state machine.

    DRAFT --start--> RUNNING --stop--> STOPPED --archive--> ARCHIVED
    update: DRAFT only; delete: DRAFT or STOPPED.

`ExperimentSpec` is what an operator defines (validated by `domain.validation`);
`Experiment` is a stored experiment: the spec plus ids, status, timestamps and version.
Pure data, no I/O. The repository enforces transitions with a conditional UPDATE;
`Operation.check` produces the error every layer reports for a wrong state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sira_server.domain.stopping import DEFAULT_ERROR_RATE as DEFAULT_STOP_ERROR_RATE
from sira_server.domain.stopping import DEFAULT_MIN_EFFECT as DEFAULT_STOP_MIN_EFFECT
from sira_server.domain.targeting import TargetingRule, targeting_to_json
from sira_server.errors import FailedPrecondition

__all__ = [
    "DEFAULT_ERROR_RATE",
    "DEFAULT_EXPOSURE_PERCENT",
    "DEFAULT_FAIL_FAST_MIN_SAMPLES",
    "DEFAULT_FAIL_FAST_THRESHOLD",
    "DEFAULT_MIN_EFFECT",
    "DEFAULT_PRIMARY_METRIC",
    "DEFAULT_VARIANT_WEIGHT",
    "Allocation",
    "AuditAction",
    "AuditEvent",
    "Experiment",
    "ExperimentSpec",
    "ExperimentStatus",
    "FailFast",
    "JsonObject",
    "Operation",
    "Reward",
    "Variant",
    "VariantSpec",
    "VariantState",
]

JsonObject = dict[str, Any]
"""A decoded JSON object (variant config, audit details)."""

DEFAULT_EXPOSURE_PERCENT = 100.0
DEFAULT_PRIMARY_METRIC = "conversion"
DEFAULT_FAIL_FAST_THRESHOLD = 0.95
DEFAULT_FAIL_FAST_MIN_SAMPLES = 100
DEFAULT_VARIANT_WEIGHT = 1.0
DEFAULT_ERROR_RATE = DEFAULT_STOP_ERROR_RATE
DEFAULT_MIN_EFFECT = DEFAULT_STOP_MIN_EFFECT


class ExperimentStatus(StrEnum):
    """Values match ``experiments.status``."""

    DRAFT = "draft"
    RUNNING = "running"
    STOPPED = "stopped"
    ARCHIVED = "archived"


class Allocation(StrEnum):
    """How new subjects are split; values match ``experiments.allocation``."""

    THOMPSON_SAMPLING = "thompson_sampling"
    FIXED_WEIGHTS = "fixed_weights"


class Reward(StrEnum):
    """What counts as a success; values match ``experiments.reward``."""

    CONVERSION = "conversion"
    CONVERSION_NOT_REFUNDED = "conversion_not_refunded"


class VariantState(StrEnum):
    """Values match ``experiment_variants.state``."""

    ACTIVE = "active"
    DROPPED = "dropped"


class AuditAction(StrEnum):
    """``experiment_audit_logs.action`` values written by the lifecycle."""

    CREATED = "created"
    UPDATED = "updated"
    STARTED = "started"
    STOPPED = "stopped"
    ARCHIVED = "archived"
    DELETED = "deleted"
    VARIANT_DROPPED = "variant_dropped"


@dataclass(frozen=True, slots=True)
class FailFast:
    """Fail-fast settings. Auto-stop acts on the always-valid stopping rule
    (`domain.stopping`): a variant decided worse than another at ``error_rate`` fails.
    ``threshold`` applies to the posterior probabilities reported next to it (guardrails)."""

    threshold: float = DEFAULT_FAIL_FAST_THRESHOLD
    """In (0.5, 1)."""
    min_samples: int = DEFAULT_FAIL_FAST_MIN_SAMPLES
    """At least 1."""
    auto_stop: bool = False
    """Drop failing variants and conclude automatically (else only report)."""
    error_rate: float = DEFAULT_ERROR_RATE
    """In (0, 0.5]: bound on the probability of ever dropping or crowning a variant wrongly."""
    min_effect: float = DEFAULT_MIN_EFFECT
    """In (0, 1): the absolute difference in conversion rate the test detects fastest."""


@dataclass(frozen=True, slots=True)
class VariantSpec:
    """One arm as defined by an operator (validated)."""

    key: str
    name: str
    config: JsonObject
    is_control: bool = False
    weight: float = DEFAULT_VARIANT_WEIGHT


@dataclass(frozen=True, slots=True)
class ExperimentSpec:
    """Everything an operator defines about an experiment (validated)."""

    key: str
    name: str
    variants: tuple[VariantSpec, ...]
    description: str = ""
    targeting: TargetingRule = field(default_factory=TargetingRule)
    allocation: Allocation = Allocation.THOMPSON_SAMPLING
    exposure_percent: float = DEFAULT_EXPOSURE_PERCENT
    primary_metric: str = DEFAULT_PRIMARY_METRIC
    fail_fast: FailFast = field(default_factory=FailFast)
    reward: Reward = Reward.CONVERSION

    def as_json(self) -> JsonObject:
        """Plain JSON of the spec (audit details, before/after comparisons)."""
        return {
            "key": self.key,
            "name": self.name,
            "description": self.description,
            "targeting": targeting_to_json(self.targeting),
            "allocation": self.allocation.value,
            "exposure_percent": self.exposure_percent,
            "primary_metric": self.primary_metric,
            "fail_fast": {
                "threshold": self.fail_fast.threshold,
                "min_samples": self.fail_fast.min_samples,
                "auto_stop": self.fail_fast.auto_stop,
                "error_rate": self.fail_fast.error_rate,
                "min_effect": self.fail_fast.min_effect,
            },
            "reward": self.reward.value,
            "variants": [
                {
                    "key": v.key,
                    "name": v.name,
                    "config": v.config,
                    "is_control": v.is_control,
                    "weight": v.weight,
                }
                for v in self.variants
            ],
        }


@dataclass(frozen=True, slots=True)
class Variant:
    """A stored arm. ``config`` is handed to the caller with every decision."""

    id: str
    """UUID, canonical text form."""
    key: str
    name: str
    config: JsonObject
    is_control: bool
    weight: float
    position: int
    """Order of definition (0-based); the order variants are listed in."""
    state: VariantState = VariantState.ACTIVE
    dropped_at: datetime | None = None

    @property
    def is_active(self) -> bool:
        """False once dropped: existing subjects keep it, new subjects never get it."""
        return self.state is VariantState.ACTIVE

    def spec(self) -> VariantSpec:
        return VariantSpec(self.key, self.name, self.config, self.is_control, self.weight)


@dataclass(frozen=True, slots=True)
class Experiment:
    """A stored experiment; ``version`` increases on every change (cache invalidation)."""

    id: str
    key: str
    name: str
    description: str
    status: ExperimentStatus
    targeting: TargetingRule
    allocation: Allocation
    exposure_percent: float
    primary_metric: str
    fail_fast: FailFast
    reward: Reward
    variants: tuple[Variant, ...]
    created_by: str
    created_at: datetime
    updated_at: datetime
    version: int
    started_at: datetime | None = None
    stopped_at: datetime | None = None
    archived_at: datetime | None = None
    winner_variant_id: str | None = None
    stop_reason: str = ""

    @property
    def active_variants(self) -> tuple[Variant, ...]:
        return tuple(v for v in self.variants if v.is_active)

    @property
    def control(self) -> Variant | None:
        return next((v for v in self.variants if v.is_control), None)

    @property
    def winner(self) -> Variant | None:
        if self.winner_variant_id is None:
            return None
        return next((v for v in self.variants if v.id == self.winner_variant_id), None)

    def find_variant(self, ref: str) -> Variant | None:
        """The variant whose id or key is ``ref`` (id first), else None."""
        by_id = next((v for v in self.variants if v.id == ref.lower()), None)
        return by_id or next((v for v in self.variants if v.key == ref), None)

    def spec(self) -> ExperimentSpec:
        """The operator-defined part, e.g. to merge an update into."""
        return ExperimentSpec(
            key=self.key,
            name=self.name,
            variants=tuple(v.spec() for v in self.variants),
            description=self.description,
            targeting=self.targeting,
            allocation=self.allocation,
            exposure_percent=self.exposure_percent,
            primary_metric=self.primary_metric,
            fail_fast=self.fail_fast,
            reward=self.reward,
        )


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One immutable audit record."""

    id: int
    experiment_id: str | None
    """None for events not tied to one experiment."""
    actor: str
    action: str
    details: JsonObject
    created_at: datetime


class Operation(StrEnum):
    """A lifecycle operation; knows which statuses allow it and where it leads."""

    UPDATE = "update"
    START = "start"
    STOP = "stop"
    ARCHIVE = "archive"
    DELETE = "delete"

    @property
    def allowed_from(self) -> tuple[ExperimentStatus, ...]:
        return _ALLOWED_FROM[self]

    @property
    def target(self) -> ExperimentStatus | None:
        """Status after the operation; None when it does not change the status."""
        return _TARGET.get(self)

    @property
    def audit_action(self) -> AuditAction:
        return _AUDIT_ACTION[self]

    def allows(self, status: ExperimentStatus) -> bool:
        return status in _ALLOWED_FROM[self]

    def check(self, experiment_key: str, status: ExperimentStatus) -> None:
        """Raise FailedPrecondition (INVALID_EXPERIMENT_STATE) unless allowed in ``status``."""
        if not self.allows(status):
            raise self.wrong_state(experiment_key, status)

    def wrong_state(self, experiment_key: str, status: ExperimentStatus) -> FailedPrecondition:
        allowed = self.allowed_from
        names = " or ".join(s.value for s in allowed)
        return FailedPrecondition(
            f"experiment '{experiment_key}' is {status.value}; "
            f"only {names} experiments can be {_PARTICIPLE[self]}",
            metadata={
                "experiment": experiment_key,
                "status": status.value,
                "allowed_statuses": ",".join(s.value for s in allowed),
            },
        )


_ALLOWED_FROM: Mapping[Operation, tuple[ExperimentStatus, ...]] = {
    Operation.UPDATE: (ExperimentStatus.DRAFT,),
    Operation.START: (ExperimentStatus.DRAFT,),
    Operation.STOP: (ExperimentStatus.RUNNING,),
    Operation.ARCHIVE: (ExperimentStatus.STOPPED,),
    Operation.DELETE: (ExperimentStatus.DRAFT, ExperimentStatus.STOPPED),
}
_TARGET: Mapping[Operation, ExperimentStatus] = {
    Operation.START: ExperimentStatus.RUNNING,
    Operation.STOP: ExperimentStatus.STOPPED,
    Operation.ARCHIVE: ExperimentStatus.ARCHIVED,
}
_PARTICIPLE: Mapping[Operation, str] = {
    Operation.UPDATE: "updated",
    Operation.START: "started",
    Operation.STOP: "stopped",
    Operation.ARCHIVE: "archived",
    Operation.DELETE: "deleted",
}
_AUDIT_ACTION: Mapping[Operation, AuditAction] = {
    Operation.UPDATE: AuditAction.UPDATED,
    Operation.START: AuditAction.STARTED,
    Operation.STOP: AuditAction.STOPPED,
    Operation.ARCHIVE: AuditAction.ARCHIVED,
    Operation.DELETE: AuditAction.DELETED,
}
