"""Experiment validation, key derivation, the state machine table and proto translation."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf import struct_pb2

from sira.experiments.v1 import experiment_pb2
from sira_server.api.convert import (
    experiment_input_from_proto,
    experiment_to_proto,
    status_from_proto,
    struct_to_json,
)
from sira_server.domain.experiment import (
    Allocation,
    Experiment,
    ExperimentSpec,
    ExperimentStatus,
    FailFast,
    Operation,
    Reward,
    Variant,
    VariantState,
)
from sira_server.domain.targeting import TargetingRule
from sira_server.domain.validation import (
    MAX_CONFIG_BYTES,
    UPDATABLE_FIELDS,
    ExperimentInput,
    VariantInput,
    input_from_spec,
    merge_update,
    require_reference,
    slugify,
    validate_experiment,
    validate_older_than_days,
    validate_page_size,
    validate_stop_reason,
    validate_update_mask,
)
from sira_server.errors import FailedPrecondition, InvalidArgument

# The seed's three use cases, as written there ("Cas d'usage").
SEED_PRICING: dict[str, Any] = {
    "name": "Premium User Pricing Strategy",
    "targeting": {"user_segment": "premium", "min_txn": 10},
    "variants": [
        {"name": "Control (No offer)", "config": {}, "is_control": True},
        {"name": "5% Discount", "config": {"discount_percent": 5}},
        {"name": "Loyalty Points", "config": {"points_multiplier": 2}},
    ],
}
SEED_CHECKOUT: dict[str, Any] = {
    "name": "Checkout Button Color",
    "targeting": {"country": ["SN", "FR"]},
    "variants": [
        {"name": "Blue Button", "config": {"button_color": "#0A84FF"}, "is_control": True},
        {"name": "Green Button", "config": {"button_color": "#34C759"}},
    ],
}
SEED_PAYMENT: dict[str, Any] = {
    "name": "Payment Method Priority",
    "targeting": {"country": ["SN"], "device": "mobile"},
    "variants": [
        {
            "name": "Mobile Money First",
            "config": {"priority": ["mobile_money", "card", "bank"]},
        },
        {"name": "Card First", "config": {"priority": ["card", "mobile_money", "bank"]}},
    ],
}


def seed_input(seed: dict[str, Any]) -> ExperimentInput:
    """The seed JSON as a domain input, unchanged (the seed's targeting shorthand)."""
    return ExperimentInput(
        name=seed["name"],
        targeting=seed["targeting"],
        variants=[
            VariantInput(
                name=v["name"], config=v.get("config"), is_control=v.get("is_control", False)
            )
            for v in seed["variants"]
        ],
    )


def seed_proto(seed: dict[str, Any]) -> experiment_pb2.Experiment:
    """The seed JSON as an API client sends it (shorthand keys spelled as in the proto)."""
    t = seed["targeting"]

    def as_list(value: str | list[str] | None) -> list[str]:
        return [] if value is None else [value] if isinstance(value, str) else value

    targeting = experiment_pb2.Targeting(
        countries=as_list(t.get("country")),
        devices=as_list(t.get("device")),
        user_segments=as_list(t.get("user_segment")),
    )
    if "min_txn" in t:
        targeting.min_txn = t["min_txn"]
    variants = []
    for v in seed["variants"]:
        config = struct_pb2.Struct()
        config.update(v.get("config", {}))
        variants.append(
            experiment_pb2.Variant(
                name=v["name"], config=config, is_control=v.get("is_control", False)
            )
        )
    return experiment_pb2.Experiment(name=seed["name"], targeting=targeting, variants=variants)


def two_variants() -> list[VariantInput]:
    return [VariantInput(name="Blue", is_control=True), VariantInput(name="Green")]


def valid_input(**changes: Any) -> ExperimentInput:
    data = ExperimentInput(name="Checkout Button Color", variants=two_variants())
    for name, value in changes.items():
        setattr(data, name, value)
    return data


def violations_of(data: ExperimentInput) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_experiment(data)
    assert caught.value.reason == "ERROR_REASON_INVALID_ARGUMENT"
    return {v.field: v.description for v in caught.value.violations}


# --- key derivation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Checkout Button Color", "checkout-button-color"),
        ("Control (No offer)", "control-no-offer"),
        ("5% Discount", "5-discount"),
        ("  Café déjà vu  ", "cafe-deja-vu"),
        ("Über_Test--2", "uber-test-2"),
        ("ALLCAPS", "allcaps"),
        ("a" * 100, "a" * 64),
        ("x" * 63 + " yz", "x" * 63),  # cut at 64 leaves a trailing '-': trimmed
        ("!!!", ""),
        ("日本語", ""),
    ],
)
def test_slugify(name: str, key: str) -> None:
    assert slugify(name) == key


def test_keys_are_derived_from_names_when_empty() -> None:
    spec = validate_experiment(valid_input())
    assert spec.key == "checkout-button-color"
    assert [v.key for v in spec.variants] == ["blue", "green"]


def test_explicit_keys_are_kept_as_given() -> None:
    variants = [VariantInput(key="a_1", name="Blue"), VariantInput(key="b-2", name="Green")]
    spec = validate_experiment(valid_input(key="my_exp-1", variants=variants))
    assert spec.key == "my_exp-1"
    assert [v.key for v in spec.variants] == ["a_1", "b-2"]


def test_defaults_are_applied() -> None:
    spec = validate_experiment(valid_input())
    assert spec.description == ""
    assert spec.targeting == TargetingRule()
    assert spec.allocation is Allocation.THOMPSON_SAMPLING
    assert spec.exposure_percent == 100.0
    assert spec.primary_metric == "conversion"
    assert spec.fail_fast == FailFast(threshold=0.95, min_samples=100, auto_stop=False)
    assert spec.reward is Reward.CONVERSION
    assert [v.weight for v in spec.variants] == [1.0, 1.0]
    assert [v.config for v in spec.variants] == [{}, {}]
    assert [v.is_control for v in spec.variants] == [True, False]


def test_name_is_trimmed() -> None:
    assert validate_experiment(valid_input(name="  Spaced  ")).name == "Spaced"


# --- every rule ---------------------------------------------------------------------


def _variants(n: int) -> list[VariantInput]:
    return [VariantInput(name=f"Variant {i}") for i in range(n)]


def _with_variant(i: int, **changes: Any) -> Callable[[ExperimentInput], None]:
    def mutate(data: ExperimentInput) -> None:
        for name, value in changes.items():
            setattr(data.variants[i], name, value)

    return mutate


def _set(**changes: Any) -> Callable[[ExperimentInput], None]:
    def mutate(data: ExperimentInput) -> None:
        for name, value in changes.items():
            setattr(data, name, value)

    return mutate


INVALID: list[tuple[str, Callable[[ExperimentInput], None], str, str]] = [
    ("name empty", _set(name=""), "experiment.name", "required"),
    ("name blank", _set(name="   "), "experiment.name", "required"),
    ("name too long", _set(name="n" * 201), "experiment.name", "at most 200"),
    ("key with spaces", _set(key="Bad Key"), "experiment.key", "not a valid experiment key"),
    ("key upper case", _set(key="ABC"), "experiment.key", "not a valid experiment key"),
    ("key starts with -", _set(key="-abc"), "experiment.key", "not a valid"),
    ("key too long", _set(key="k" * 65), "experiment.key", "not a valid"),
    ("key not derivable", _set(name="!!!"), "experiment.key", "cannot derive a key"),
    ("description too long", _set(description="d" * 2001), "experiment.description", "2000"),
    ("one variant", _set(variants=_variants(1)), "experiment.variants", "at least 2"),
    ("no variant", _set(variants=[]), "experiment.variants", "at least 2"),
    ("21 variants", _set(variants=_variants(21)), "experiment.variants", "at most 20"),
    (
        "duplicate explicit variant keys",
        _set(variants=[VariantInput(key="a", name="A"), VariantInput(key="a", name="B")]),
        "experiment.variants[1].key",
        "duplicate variant key 'a'",
    ),
    (
        "duplicate derived variant keys",
        _set(variants=[VariantInput(name="Green!"), VariantInput(name="green")]),
        "experiment.variants[1].key",
        "duplicate variant key 'green'",
    ),
    ("variant name empty", _with_variant(1, name=""), "experiment.variants[1].name", "required"),
    (
        "variant name too long",
        _with_variant(0, name="v" * 201),
        "experiment.variants[0].name",
        "at most 200",
    ),
    (
        "variant key invalid",
        _with_variant(1, key="Not A Key"),
        "experiment.variants[1].key",
        "not a valid variant key",
    ),
    (
        "two controls",
        _with_variant(1, is_control=True),
        "experiment.variants[1].is_control",
        "at most one control",
    ),
    ("weight negative", _with_variant(1, weight=-1.0), "experiment.variants[1].weight", "positive"),
    ("weight zero", _with_variant(1, weight=0.0), "experiment.variants[1].weight", "positive"),
    ("weight inf", _with_variant(0, weight=math.inf), "experiment.variants[0].weight", "finite"),
    ("weight nan", _with_variant(0, weight=math.nan), "experiment.variants[0].weight", "finite"),
    (
        "config a list",
        _with_variant(0, config=[1, 2]),
        "experiment.variants[0].config",
        "JSON object",
    ),
    (
        "config a string",
        _with_variant(0, config="{}"),
        "experiment.variants[0].config",
        "JSON object",
    ),
    (
        "config non-string keys",
        _with_variant(0, config={1: "x"}),
        "experiment.variants[0].config",
        "JSON object",
    ),
    (
        "config with NaN",
        _with_variant(0, config={"x": math.nan}),
        "experiment.variants[0].config",
        "finite",
    ),
    (
        "config over 16 KiB",
        _with_variant(0, config={"blob": "x" * MAX_CONFIG_BYTES}),
        "experiment.variants[0].config",
        "at most 16384 bytes",
    ),
    (
        "targeting not an object",
        _set(targeting=["SN"]),
        "experiment.targeting",
        "JSON object",
    ),
    (
        "targeting bad country",
        _set(targeting={"countries": ["SN", "XX"]}),
        "experiment.targeting.countries[1]",
        "ISO 3166-1",
    ),
    (
        "targeting unknown key",
        _set(targeting={"contry": ["SN"]}),
        "experiment.targeting.contry",
        "did you mean 'country'",
    ),
    ("exposure zero", _set(exposure_percent=0.0), "experiment.exposure_percent", "(0, 100]"),
    ("exposure negative", _set(exposure_percent=-5.0), "experiment.exposure_percent", "(0, 100]"),
    ("exposure over 100", _set(exposure_percent=100.01), "experiment.exposure_percent", "(0, 100]"),
    ("exposure nan", _set(exposure_percent=math.nan), "experiment.exposure_percent", "(0, 100]"),
    (
        "threshold 0.5",
        _set(fail_fast_threshold=0.5),
        "experiment.fail_fast.threshold",
        "(0.5, 1)",
    ),
    ("threshold 1", _set(fail_fast_threshold=1.0), "experiment.fail_fast.threshold", "(0.5, 1)"),
    (
        "threshold nan",
        _set(fail_fast_threshold=math.nan),
        "experiment.fail_fast.threshold",
        "(0.5, 1)",
    ),
    (
        "min_samples zero",
        _set(fail_fast_min_samples=0),
        "experiment.fail_fast.min_samples",
        "at least 1",
    ),
    (
        "min_samples negative",
        _set(fail_fast_min_samples=-10),
        "experiment.fail_fast.min_samples",
        "at least 1",
    ),
    (
        "primary metric with spaces",
        _set(primary_metric="Checkout Done"),
        "experiment.primary_metric",
        "not an event type",
    ),
    (
        "primary metric starts with a digit",
        _set(primary_metric="1st_purchase"),
        "experiment.primary_metric",
        "not an event type",
    ),
    ("unknown allocation", _set(allocation="round_robin"), "experiment.allocation", "accepted"),
    ("unknown reward", _set(reward="revenue"), "experiment.reward", "accepted"),
]


@pytest.mark.parametrize(
    ("mutate", "field", "snippet"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_input_names_the_field(
    mutate: Callable[[ExperimentInput], None], field: str, snippet: str
) -> None:
    data = valid_input()
    mutate(data)
    violations = violations_of(data)
    assert field in violations, violations
    assert snippet in violations[field]


VALID_EDGES: list[tuple[str, Callable[[ExperimentInput], None]]] = [
    ("name 200 chars", _set(name="n" * 200)),
    ("key 64 chars", _set(key="k" * 64)),
    ("key with _ and -", _set(key="0_a-b")),
    ("description 2000 chars", _set(description="d" * 2000)),
    ("20 variants", _set(variants=_variants(20))),
    ("no control", _set(variants=[VariantInput(name="A"), VariantInput(name="B")])),
    ("exposure 100", _set(exposure_percent=100.0)),
    ("exposure tiny", _set(exposure_percent=0.001)),
    ("threshold just above 0.5", _set(fail_fast_threshold=0.5001)),
    ("threshold just below 1", _set(fail_fast_threshold=0.9999)),
    ("min_samples 1", _set(fail_fast_min_samples=1)),
    ("weight tiny", _with_variant(0, weight=1e-9)),
    ("weight large", _with_variant(0, weight=1e9)),
    ("config exactly 16 KiB", _with_variant(0, config={"b": "x" * (MAX_CONFIG_BYTES - 8)})),
    ("nested config", _with_variant(0, config={"a": {"b": [1, 2.5, None, True, "s"]}})),
    ("fixed weights", _set(allocation="fixed_weights")),
    ("not refunded", _set(reward="conversion_not_refunded")),
    ("metric slug", _set(primary_metric="checkout_completed-v2")),
]


@pytest.mark.parametrize("mutate", [c[1] for c in VALID_EDGES], ids=[c[0] for c in VALID_EDGES])
def test_edge_values_are_accepted(mutate: Callable[[ExperimentInput], None]) -> None:
    data = valid_input()
    mutate(data)
    validate_experiment(data)


def test_every_problem_is_reported_at_once() -> None:
    data = ExperimentInput(
        name="",
        exposure_percent=0.0,
        fail_fast_threshold=2.0,
        variants=[VariantInput(name="A", weight=-1.0), VariantInput(name="A", is_control=True)],
    )
    assert set(violations_of(data)) == {
        "experiment.name",
        "experiment.exposure_percent",
        "experiment.fail_fast.threshold",
        "experiment.variants[0].weight",
        "experiment.variants[1].key",
    }


def test_violation_paths_use_the_given_prefix() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_experiment(valid_input(name=""), prefix="body")
    assert [v.field for v in caught.value.violations] == ["body.name"]


# --- the seed's use cases ------------------------------------------------------------


@pytest.mark.parametrize(
    "translate", [seed_input, lambda s: experiment_input_from_proto(seed_proto(s))]
)
def test_seed_pricing_strategy(translate: Callable[[dict[str, Any]], ExperimentInput]) -> None:
    spec = validate_experiment(translate(SEED_PRICING))
    assert spec.key == "premium-user-pricing-strategy"
    assert [v.key for v in spec.variants] == ["control-no-offer", "5-discount", "loyalty-points"]
    assert [v.is_control for v in spec.variants] == [True, False, False]
    assert [v.config for v in spec.variants] == [
        {},
        {"discount_percent": 5},
        {"points_multiplier": 2},
    ]
    assert spec.targeting == TargetingRule(user_segments=frozenset({"premium"}), min_txn=10)


@pytest.mark.parametrize(
    "translate", [seed_input, lambda s: experiment_input_from_proto(seed_proto(s))]
)
def test_seed_checkout_button_color(
    translate: Callable[[dict[str, Any]], ExperimentInput],
) -> None:
    spec = validate_experiment(translate(SEED_CHECKOUT))
    assert spec.key == "checkout-button-color"
    assert [v.key for v in spec.variants] == ["blue-button", "green-button"]
    assert spec.variants[0].is_control
    assert spec.variants[1].config == {"button_color": "#34C759"}
    assert spec.targeting == TargetingRule(countries=frozenset({"SN", "FR"}))


@pytest.mark.parametrize(
    "translate", [seed_input, lambda s: experiment_input_from_proto(seed_proto(s))]
)
def test_seed_payment_method_priority_has_no_control(
    translate: Callable[[dict[str, Any]], ExperimentInput],
) -> None:
    spec = validate_experiment(translate(SEED_PAYMENT))
    assert spec.key == "payment-method-priority"
    assert not any(v.is_control for v in spec.variants)
    assert spec.variants[0].config == {"priority": ["mobile_money", "card", "bank"]}
    assert spec.targeting == TargetingRule(
        countries=frozenset({"SN"}), devices=frozenset({"mobile"})
    )


# --- updates -------------------------------------------------------------------------


def test_empty_update_mask_means_every_field() -> None:
    assert validate_update_mask([]) == frozenset(UPDATABLE_FIELDS)


def test_update_mask_rejects_unknown_and_immutable_paths() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_update_mask(["name", "colour", "key"])
    violations = {v.field: v.description for v in caught.value.violations}
    assert set(violations) == {"update_mask.paths[1]", "update_mask.paths[2]"}
    assert "cannot be updated" in violations["update_mask.paths[1]"]
    assert "immutable" in violations["update_mask.paths[2]"]


def _checkout_spec() -> ExperimentSpec:
    return validate_experiment(seed_input(SEED_CHECKOUT))


def test_merge_update_replaces_only_masked_fields() -> None:
    current = validate_experiment(
        valid_input(
            description="old",
            exposure_percent=50.0,
            fail_fast_threshold=0.99,
            fail_fast_min_samples=500,
        )
    )
    patch = ExperimentInput(name="New name", description="new", exposure_percent=20.0)
    merged = merge_update(current, patch, frozenset({"name", "description"}))
    assert merged.name == "New name"
    assert merged.description == "new"
    assert merged.key == current.key  # keys never change
    assert merged.exposure_percent == 50.0
    assert merged.fail_fast == current.fail_fast
    assert merged.variants == current.variants


def test_merge_update_replaces_a_whole_message() -> None:
    current = validate_experiment(valid_input(fail_fast_threshold=0.99, auto_stop=True))
    patch = ExperimentInput(fail_fast_min_samples=7)
    merged = merge_update(current, patch, frozenset({"fail_fast"}))
    assert merged.fail_fast == FailFast(threshold=0.95, min_samples=7, auto_stop=False)


def test_merge_update_validates_the_result() -> None:
    current = _checkout_spec()
    patch = ExperimentInput(variants=[VariantInput(name="Only one")])
    with pytest.raises(InvalidArgument) as caught:
        merge_update(current, patch, frozenset({"variants"}))
    assert [v.field for v in caught.value.violations] == ["experiment.variants"]


def test_merge_with_every_field_from_the_same_spec_changes_nothing() -> None:
    current = _checkout_spec()
    assert merge_update(current, input_from_spec(current), frozenset(UPDATABLE_FIELDS)) == current


# --- request scalars -----------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [(0, 50), (1, 1), (50, 50), (1000, 1000)])
def test_page_size(given: int, expected: int) -> None:
    assert validate_page_size(given, default=50) == expected


@pytest.mark.parametrize("given", [-1, 1001, 2**31 - 1])
def test_page_size_out_of_range(given: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_page_size(given, default=50)
    assert caught.value.violations[0].field == "page_size"


@pytest.mark.parametrize(("given", "expected"), [(0, 90), (1, 1), (365, 365), (36_500, 36_500)])
def test_older_than_days(given: int, expected: int) -> None:
    assert validate_older_than_days(given) == expected


@pytest.mark.parametrize("given", [-1, -90, 36_501, 2**31 - 1])
def test_older_than_days_in_range(given: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_older_than_days(given)
    assert caught.value.violations[0].field == "older_than_days"


def test_references_and_reasons() -> None:
    assert require_reference("  checkout ") == "checkout"
    with pytest.raises(InvalidArgument) as caught:
        require_reference(" ")
    assert caught.value.violations[0].field == "experiment"
    assert validate_stop_reason(" green wins ") == "green wins"
    with pytest.raises(InvalidArgument):
        validate_stop_reason("r" * 2001)


# --- the state machine ---------------------------------------------------------------

ALLOWED = {
    Operation.UPDATE: {"draft"},
    Operation.START: {"draft"},
    Operation.STOP: {"running"},
    Operation.ARCHIVE: {"stopped"},
    Operation.DELETE: {"draft", "stopped"},
}


@pytest.mark.parametrize("operation", list(Operation))
@pytest.mark.parametrize("status", list(ExperimentStatus))
def test_state_machine_table(operation: Operation, status: ExperimentStatus) -> None:
    allowed = status.value in ALLOWED[operation]
    assert operation.allows(status) is allowed
    if allowed:
        operation.check("exp", status)
    else:
        with pytest.raises(FailedPrecondition) as caught:
            operation.check("exp", status)
        assert caught.value.reason == "ERROR_REASON_INVALID_EXPERIMENT_STATE"
        assert caught.value.metadata == {
            "experiment": "exp",
            "status": status.value,
            "allowed_statuses": ",".join(sorted(ALLOWED[operation], key=_order)),
        }


def _order(status: str) -> int:
    return [s.value for s in ExperimentStatus].index(status)


def test_wrong_state_message() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        Operation.UPDATE.check("checkout-button-color", ExperimentStatus.RUNNING)
    assert caught.value.message == (
        "experiment 'checkout-button-color' is running; only draft experiments can be updated"
    )
    with pytest.raises(FailedPrecondition) as caught:
        Operation.DELETE.check("checkout-button-color", ExperimentStatus.RUNNING)
    assert caught.value.message.endswith("only draft or stopped experiments can be deleted")


def test_transition_targets() -> None:
    assert Operation.START.target is ExperimentStatus.RUNNING
    assert Operation.STOP.target is ExperimentStatus.STOPPED
    assert Operation.ARCHIVE.target is ExperimentStatus.ARCHIVED
    assert Operation.UPDATE.target is None
    assert Operation.DELETE.target is None
    assert {op.audit_action.value for op in Operation} == {
        "updated",
        "started",
        "stopped",
        "archived",
        "deleted",
    }


# --- proto translation ---------------------------------------------------------------


def _stored(spec: ExperimentSpec) -> Experiment:
    now = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)
    return Experiment(
        id="6f1c0a52-3f5e-4a8e-9a53-1d2b8c1f0e11",
        key=spec.key,
        name=spec.name,
        description=spec.description,
        status=ExperimentStatus.STOPPED,
        targeting=spec.targeting,
        allocation=spec.allocation,
        exposure_percent=spec.exposure_percent,
        primary_metric=spec.primary_metric,
        fail_fast=spec.fail_fast,
        reward=spec.reward,
        variants=tuple(
            Variant(
                id=f"00000000-0000-4000-8000-00000000000{i}",
                key=v.key,
                name=v.name,
                config=v.config,
                is_control=v.is_control,
                weight=v.weight,
                position=i,
                state=VariantState.DROPPED if i == 1 else VariantState.ACTIVE,
                dropped_at=now if i == 1 else None,
            )
            for i, v in enumerate(spec.variants)
        ),
        created_by="alice",
        created_at=now,
        updated_at=now,
        version=4,
        started_at=now,
        stopped_at=now,
        winner_variant_id="00000000-0000-4000-8000-000000000000",
        stop_reason="blue wins",
    )


def test_proto_round_trip_keeps_the_definition() -> None:
    spec = validate_experiment(
        ExperimentInput(
            name="Premium User Pricing Strategy",
            description="pricing",
            targeting={
                "countries": ["SN"],
                "languages": ["fr"],
                "min_txn": 10,
                "attributes": {"plan": ["gold", "silver"]},
            },
            allocation="fixed_weights",
            exposure_percent=25.0,
            primary_metric="purchase",
            fail_fast_threshold=0.9,
            fail_fast_min_samples=250,
            auto_stop=True,
            reward="conversion_not_refunded",
            variants=[
                VariantInput(name="Control", is_control=True, weight=2.0),
                VariantInput(key="five", name="5% Discount", config={"discount_percent": 5}),
                VariantInput(name="Points", config={"nested": {"m": 2.5, "l": [1, "a", None]}}),
            ],
        )
    )
    message = experiment_to_proto(_stored(spec))
    assert message.status == experiment_pb2.EXPERIMENT_STATUS_STOPPED
    assert message.variants[1].state == experiment_pb2.VARIANT_STATE_DROPPED
    assert message.variants[1].HasField("drop_time")
    assert not message.HasField("archive_time")
    assert message.start_time.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 19, 10, tzinfo=UTC)
    assert message.winner_variant_id == "00000000-0000-4000-8000-000000000000"
    assert message.version == 4
    assert validate_experiment(experiment_input_from_proto(message)) == spec


def test_unset_proto_fields_mean_defaults() -> None:
    message = experiment_pb2.Experiment(
        name="X", variants=[experiment_pb2.Variant(name="A"), experiment_pb2.Variant(name="B")]
    )
    data = experiment_input_from_proto(message)
    assert data.targeting is None
    assert data.exposure_percent is None
    assert data.fail_fast_threshold is None
    assert data.fail_fast_min_samples is None
    assert data.allocation is None
    assert data.reward is None
    assert [v.weight for v in data.variants] == [None, None]  # 0 = unset
    assert [v.config for v in data.variants] == [None, None]
    spec = validate_experiment(data)
    assert spec.exposure_percent == 100.0
    assert [v.weight for v in spec.variants] == [1.0, 1.0]


def test_unknown_proto_enum_numbers_are_rejected() -> None:
    message = experiment_pb2.Experiment(name="X", allocation=7, reward=9)  # type: ignore[arg-type]
    violations = violations_of(experiment_input_from_proto(message))
    assert "experiment.allocation" in violations
    assert "experiment.reward" in violations
    assert status_from_proto(0) is None
    assert status_from_proto(experiment_pb2.EXPERIMENT_STATUS_RUNNING) is ExperimentStatus.RUNNING
    with pytest.raises(InvalidArgument):
        status_from_proto(42)


def test_struct_numbers_come_back_as_ints_when_integral() -> None:
    config = struct_pb2.Struct()
    config.update({"a": 5, "b": 2.5, "c": [1, 2.0, {"d": 3}], "e": 2**60})
    assert struct_to_json(config) == {"a": 5, "b": 2.5, "c": [1, 2, {"d": 3}], "e": float(2**60)}


def test_experiment_helpers_for_the_decision_path() -> None:
    experiment = _stored(validate_experiment(seed_input(SEED_PRICING)))
    control, discount, points = experiment.variants
    assert experiment.control == control
    assert experiment.active_variants == (control, points)  # discount was dropped
    assert experiment.winner == control
    assert experiment.find_variant(discount.id.upper()) == discount
    assert experiment.find_variant("loyalty-points") == points
    assert experiment.find_variant("nope") is None
    assert experiment.spec().variants[1].key == "5-discount"
