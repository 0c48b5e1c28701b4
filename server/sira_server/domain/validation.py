"""Turn what an operator sent into a valid `ExperimentSpec`, or say everything wrong with it.

Every check runs and each problem becomes one `FieldViolation` whose path names the
field as the API spells it (``experiment.variants[1].weight``), so a client can show all
mistakes at once. Unset values get their documented defaults here, in one place:

- key (experiment and variant): derived from the name by `slugify` when empty;
- weight: unset (``None``; the API's ``0``, proto3's "not set") means 1;
- exposure_percent 100, primary_metric "conversion", fail_fast threshold 0.95,
  min_samples 100, error_rate 0.05 and min_effect 0.02, allocation Thompson sampling,
  reward conversion.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from sira_server.domain import limits
from sira_server.domain.experiment import (
    DEFAULT_ERROR_RATE,
    DEFAULT_EXPOSURE_PERCENT,
    DEFAULT_FAIL_FAST_MIN_SAMPLES,
    DEFAULT_FAIL_FAST_THRESHOLD,
    DEFAULT_MIN_EFFECT,
    DEFAULT_PRIMARY_METRIC,
    DEFAULT_VARIANT_WEIGHT,
    Allocation,
    ExperimentSpec,
    FailFast,
    JsonObject,
    Reward,
    VariantSpec,
)
from sira_server.domain.targeting import (
    targeting_from_json,
    targeting_to_json,
    validate_targeting_json,
)
from sira_server.errors import FieldViolation, InvalidArgument, excerpt

__all__ = [
    "DEFAULT_RETENTION_DAYS",
    "KEY_PATTERN",
    "MAX_CONFIG_BYTES",
    "MAX_DESCRIPTION_LENGTH",
    "MAX_KEY_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_RETENTION_DAYS",
    "MAX_VARIANTS",
    "METRIC_PATTERN",
    "MIN_VARIANTS",
    "UPDATABLE_FIELDS",
    "ExperimentInput",
    "VariantInput",
    "input_from_spec",
    "merge_update",
    "require_reference",
    "slugify",
    "validate_experiment",
    "validate_older_than_days",
    "validate_page_size",
    "validate_stop_reason",
    "validate_update_mask",
]

MAX_KEY_LENGTH = limits.MAX_KEY_CHARS
KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""Experiment and variant keys (same rule as the schema's CHECK)."""
METRIC_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,63}")
"""Primary metric: an event type (same rule as ``experiment_metrics.event_type``)."""
MAX_NAME_LENGTH = limits.MAX_NAME_CHARS
MAX_DESCRIPTION_LENGTH = limits.MAX_DESCRIPTION_CHARS
MIN_VARIANTS = limits.MIN_VARIANTS
MAX_VARIANTS = limits.MAX_VARIANTS
MAX_CONFIG_BYTES = limits.MAX_CONFIG_BYTES
DEFAULT_RETENTION_DAYS = 90
"""ArchiveStaleExperiments: stopped experiments older than this are archived."""
MAX_RETENTION_DAYS = 36_500
"""A century; larger ages would overflow Postgres timestamps (now() - N days)."""
"""A variant's config travels with every decision: keep it small (compact UTF-8 JSON)."""
_MAX_INT64 = 2**63 - 1

_Reporter = Callable[[str, str], None]
"""``bad(path, description)``: records one violation."""
_Choice = TypeVar("_Choice", Allocation, Reward)

UPDATABLE_FIELDS: tuple[str, ...] = (
    "name",
    "description",
    "targeting",
    "allocation",
    "exposure_percent",
    "primary_metric",
    "fail_fast",
    "reward",
    "variants",
)
"""Update mask paths; an empty mask means all of them. The key is immutable."""


@dataclass
class VariantInput:
    """A variant as received; nothing checked yet."""

    key: str = ""
    name: str = ""
    config: object = None
    """Must be a JSON object; None means ``{}``."""
    is_control: bool = False
    weight: float | None = None
    """None: unset (default 1)."""


@dataclass
class ExperimentInput:
    """An experiment as received; nothing checked yet. None means "unset"."""

    name: str = ""
    key: str = ""
    description: str = ""
    targeting: object = None
    """Targeting JSON (canonical or the seed's shorthand); None matches everyone."""
    allocation: str | None = None
    """An `Allocation` value; anything else is reported."""
    exposure_percent: float | None = None
    primary_metric: str = ""
    fail_fast_threshold: float | None = None
    fail_fast_min_samples: int | None = None
    auto_stop: bool = False
    fail_fast_error_rate: float | None = None
    fail_fast_min_effect: float | None = None
    reward: str | None = None
    """A `Reward` value; anything else is reported."""
    variants: list[VariantInput] = field(default_factory=list)


def slugify(name: str) -> str:
    """The key derived from a name: ASCII-folded, lower case, runs of anything but a-z/0-9
    turned into one '-', trimmed of '-', at most 64 characters. "" when nothing is left.

    >>> slugify("Checkout Button Color")
    'checkout-button-color'
    >>> slugify("Café: 5% Discount!")
    'cafe-5-discount'
    """
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    return slug[:MAX_KEY_LENGTH].rstrip("-")


def validate_experiment(data: ExperimentInput, *, prefix: str = "experiment") -> ExperimentSpec:
    """The validated spec of ``data``, defaults applied.

    Raises `InvalidArgument` with one field violation per problem.
    """
    violations: list[FieldViolation] = []

    def bad(path: str, description: str) -> None:
        violations.append(FieldViolation(f"{prefix}.{path}" if path else prefix, description))

    name = _check_name(data.name, "name", bad)
    key = _check_key(data.key, name, "key", "experiment", bad)
    if len(data.description) > MAX_DESCRIPTION_LENGTH:
        bad(
            "description",
            f"must be at most {MAX_DESCRIPTION_LENGTH} characters, got {len(data.description)}",
        )

    targeting_violations = validate_targeting_json(
        data.targeting, field_prefix=f"{prefix}.targeting"
    )
    violations.extend(targeting_violations)
    if not targeting_violations:
        size = _json_size(targeting_to_json(targeting_from_json(data.targeting)))
        if size > limits.MAX_TARGETING_BYTES:
            bad(
                "targeting",
                f"must be at most {limits.MAX_TARGETING_BYTES} bytes as compact JSON, got {size}",
            )

    allocation = _check_choice(data.allocation, Allocation, Allocation.THOMPSON_SAMPLING)
    if allocation is None:
        bad("allocation", _choice_message(data.allocation, Allocation))
    reward = _check_choice(data.reward, Reward, Reward.CONVERSION)
    if reward is None:
        bad("reward", _choice_message(data.reward, Reward))

    exposure = DEFAULT_EXPOSURE_PERCENT if data.exposure_percent is None else data.exposure_percent
    if not (0 < exposure <= 100):  # NaN fails too
        bad(
            "exposure_percent",
            f"must be in (0, 100] (percent of eligible subjects), got {exposure}",
        )

    metric = data.primary_metric or DEFAULT_PRIMARY_METRIC
    if METRIC_PATTERN.fullmatch(metric) is None:
        bad(
            "primary_metric",
            f"'{excerpt(metric)}' is not an event type: use 1 to 64 lower-case letters, "
            "digits, '_' or '-', starting with a letter (e.g. 'conversion')",
        )

    threshold = (
        DEFAULT_FAIL_FAST_THRESHOLD
        if data.fail_fast_threshold is None
        else data.fail_fast_threshold
    )
    if not (0.5 < threshold < 1):
        bad("fail_fast.threshold", f"must be in (0.5, 1) (a probability), got {threshold}")
    min_samples = (
        DEFAULT_FAIL_FAST_MIN_SAMPLES
        if data.fail_fast_min_samples is None
        else data.fail_fast_min_samples
    )
    if not (1 <= min_samples <= _MAX_INT64):
        bad("fail_fast.min_samples", f"must be at least 1, got {min_samples}")
    error_rate = (
        DEFAULT_ERROR_RATE if data.fail_fast_error_rate is None else data.fail_fast_error_rate
    )
    if not (0 < error_rate <= 0.5):  # NaN fails too
        bad(
            "fail_fast.error_rate",
            f"must be in (0, 0.5] (the chance of a wrong conclusion, e.g. 0.05), got {error_rate}",
        )
    min_effect = (
        DEFAULT_MIN_EFFECT if data.fail_fast_min_effect is None else data.fail_fast_min_effect
    )
    if not (0 < min_effect < 1):
        bad(
            "fail_fast.min_effect",
            "must be in (0, 1) (a difference in conversion rate, e.g. 0.02 for 2 points), "
            f"got {min_effect}",
        )

    variants = _check_variants(data.variants, bad)

    if violations:
        raise InvalidArgument.from_violations(violations)
    # Both were reported above when None.
    assert allocation is not None
    assert reward is not None
    return ExperimentSpec(
        key=key,
        name=name,
        variants=tuple(variants),
        description=data.description,
        targeting=targeting_from_json(data.targeting, field_prefix=f"{prefix}.targeting"),
        allocation=allocation,
        exposure_percent=float(exposure),
        primary_metric=metric,
        fail_fast=FailFast(
            float(threshold),
            int(min_samples),
            data.auto_stop,
            float(error_rate),
            float(min_effect),
        ),
        reward=reward,
    )


def _check_name(raw: str, path: str, bad: _Reporter) -> str:
    name = raw.strip()
    if not name:
        bad(path, "is required")
    elif len(name) > MAX_NAME_LENGTH:
        bad(path, f"must be at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    return name


def _check_key(raw: str, name: str, path: str, what: str, bad: _Reporter) -> str:
    if raw:
        if KEY_PATTERN.fullmatch(raw) is None:
            bad(
                path,
                f"'{excerpt(raw)}' is not a valid {what} key: use 1 to 64 lower-case letters, "
                "digits, '_' or '-', starting with a letter or digit",
            )
        return raw
    key = slugify(name)
    if name and not key:
        bad(path, f"cannot derive a key from the name '{excerpt(name)}'; set the key explicitly")
    return key


def _check_choice(raw: str | None, enum: type[_Choice], default: _Choice) -> _Choice | None:
    if raw is None:
        return default
    try:
        return enum(raw)
    except ValueError:
        return None


def _choice_message(raw: str | None, enum: type[Allocation] | type[Reward]) -> str:
    accepted = ", ".join(member.value for member in enum)
    return f"unknown value {raw!r}; accepted: {accepted}"


def _check_variants(items: Sequence[VariantInput], bad: _Reporter) -> list[VariantSpec]:
    if len(items) < MIN_VARIANTS:
        bad("variants", f"at least {MIN_VARIANTS} variants are required, got {len(items)}")
    elif len(items) > MAX_VARIANTS:
        bad("variants", f"at most {MAX_VARIANTS} variants are allowed, got {len(items)}")

    out: list[VariantSpec] = []
    first_with_key: dict[str, int] = {}
    control: int | None = None
    for i, item in enumerate(items):
        path = f"variants[{i}]"
        name = _check_name(item.name, f"{path}.name", bad)
        key = _check_key(item.key, name, f"{path}.key", "variant", bad)
        if key:
            if key in first_with_key:
                bad(
                    f"{path}.key",
                    f"duplicate variant key '{key}' (also variants[{first_with_key[key]}]); "
                    "variant keys, or the names they are derived from, must be unique",
                )
            else:
                first_with_key[key] = i
        if item.is_control:
            if control is not None:
                bad(
                    f"{path}.is_control",
                    f"at most one control per experiment; variants[{control}] is already "
                    "the control",
                )
            else:
                control = i
        weight = DEFAULT_VARIANT_WEIGHT if item.weight is None else item.weight
        if not (0 < weight <= limits.MAX_VARIANT_WEIGHT):  # NaN fails too
            bad(
                f"{path}.weight",
                f"must be positive, finite and at most {limits.MAX_VARIANT_WEIGHT:g} "
                f"(0 or unset means 1), got {weight}",
            )
        config = _check_config(item.config, f"{path}.config", bad)
        out.append(VariantSpec(key, name, config, item.is_control, float(weight)))
    return out


def _json_size(value: object) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON (as Postgres's jsonb receives it)."""
    encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return len(encoded.encode("utf-8"))


def _check_config(raw: object, path: str, bad: _Reporter) -> JsonObject:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
        bad(path, "must be a JSON object")
        return {}
    config = dict(raw)
    try:
        encoded = json.dumps(config, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError) as exc:
        bad(path, f"must be plain JSON with finite numbers: {exc}")
        return {}
    size = len(encoded.encode("utf-8"))
    if size > MAX_CONFIG_BYTES:
        bad(path, f"must be at most {MAX_CONFIG_BYTES} bytes as compact JSON, got {size}")
    return config


def validate_update_mask(paths: Sequence[str], *, field: str = "update_mask") -> frozenset[str]:
    """The fields an update replaces: ``paths``, or all `UPDATABLE_FIELDS` when empty."""
    if not paths:
        return frozenset(UPDATABLE_FIELDS)
    violations: list[FieldViolation] = []
    for i, path in enumerate(paths):
        if path in UPDATABLE_FIELDS:
            continue
        why = (
            "the key is immutable"
            if path == "key"
            else f"'{path}' cannot be updated; accepted: {', '.join(UPDATABLE_FIELDS)}"
        )
        violations.append(FieldViolation(f"{field}.paths[{i}]", why))
    if violations:
        raise InvalidArgument.from_violations(violations)
    return frozenset(paths)


def input_from_spec(spec: ExperimentSpec) -> ExperimentInput:
    """The input that validates back to ``spec`` (used to merge updates)."""
    return ExperimentInput(
        name=spec.name,
        key=spec.key,
        description=spec.description,
        targeting=targeting_to_json(spec.targeting),
        allocation=spec.allocation.value,
        exposure_percent=spec.exposure_percent,
        primary_metric=spec.primary_metric,
        fail_fast_threshold=spec.fail_fast.threshold,
        fail_fast_min_samples=spec.fail_fast.min_samples,
        auto_stop=spec.fail_fast.auto_stop,
        fail_fast_error_rate=spec.fail_fast.error_rate,
        fail_fast_min_effect=spec.fail_fast.min_effect,
        reward=spec.reward.value,
        variants=[
            VariantInput(v.key, v.name, v.config, v.is_control, v.weight) for v in spec.variants
        ],
    )


def merge_update(
    current: ExperimentSpec,
    patch: ExperimentInput,
    fields: frozenset[str],
    *,
    prefix: str = "experiment",
) -> ExperimentSpec:
    """``current`` with ``fields`` replaced by the values in ``patch``, validated whole.

    Replacement is per top-level field: a masked ``fail_fast`` replaces all of its
    settings (unset ones fall back to their defaults), as AIP-134 prescribes.
    """
    merged = input_from_spec(current)
    for name in fields:
        if name == "fail_fast":
            merged.fail_fast_threshold = patch.fail_fast_threshold
            merged.fail_fast_min_samples = patch.fail_fast_min_samples
            merged.auto_stop = patch.auto_stop
            merged.fail_fast_error_rate = patch.fail_fast_error_rate
            merged.fail_fast_min_effect = patch.fail_fast_min_effect
        else:
            setattr(merged, name, getattr(patch, name))
    merged.key = current.key
    return validate_experiment(merged, prefix=prefix)


def validate_page_size(value: int, *, default: int, field: str = "page_size") -> int:
    """``value`` when in 1..1000, ``default`` when 0 (unset)."""
    if value == 0:
        return default
    if not (1 <= value <= 1000):
        raise InvalidArgument.from_violations(
            [FieldViolation(field, f"must be between 1 and 1000 (0 means {default}), got {value}")]
        )
    return value


def require_reference(value: str, *, field: str = "experiment") -> str:
    """An experiment (or variant) reference: an id or a key, required."""
    ref = value.strip()
    if not ref:
        raise InvalidArgument.from_violations(
            [FieldViolation(field, "is required: an experiment id (UUID) or key")]
        )
    return ref


def validate_older_than_days(value: int, *, field: str = "older_than_days") -> int:
    """Retention age in days: 1..36500; 0 (unset) means `DEFAULT_RETENTION_DAYS`."""
    if value == 0:
        return DEFAULT_RETENTION_DAYS
    if not (1 <= value <= MAX_RETENTION_DAYS):
        raise InvalidArgument.from_violations(
            [
                FieldViolation(
                    field,
                    f"must be between 1 and {MAX_RETENTION_DAYS} days "
                    f"(0 means {DEFAULT_RETENTION_DAYS}), got {value}",
                )
            ]
        )
    return value


def validate_stop_reason(value: str, *, field: str = "reason") -> str:
    reason = value.strip()
    if len(reason) > MAX_DESCRIPTION_LENGTH:
        raise InvalidArgument.from_violations(
            [
                FieldViolation(
                    field, f"must be at most {MAX_DESCRIPTION_LENGTH} characters, got {len(reason)}"
                )
            ]
        )
    return reason
