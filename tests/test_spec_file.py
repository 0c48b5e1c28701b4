"""Experiment files: the seed's three use cases translate exactly; bad files fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import json_format

from sira.experiments.v1 import experiment_pb2
from sira.spec_file import SpecFileError, load_experiment, parse_experiment

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def _config(variant: experiment_pb2.Variant) -> dict[str, object]:
    return json_format.MessageToDict(variant.config)


def test_premium_pricing_translates_exactly() -> None:
    exp = load_experiment(EXAMPLES / "premium-pricing.json")
    assert exp.name == "Premium User Pricing Strategy"
    assert list(exp.targeting.user_segments) == ["premium"]
    assert exp.targeting.HasField("min_txn")
    assert exp.targeting.min_txn == 10
    assert not exp.targeting.countries
    assert [v.name for v in exp.variants] == ["Control (No offer)", "5% Discount", "Loyalty Points"]
    assert [v.is_control for v in exp.variants] == [True, False, False]
    assert [_config(v) for v in exp.variants] == [
        {},
        {"discount_percent": 5},
        {"points_multiplier": 2},
    ]
    # Nothing the file does not say is invented (the server applies defaults).
    assert exp.key == ""
    assert exp.allocation == experiment_pb2.ALLOCATION_STRATEGY_UNSPECIFIED
    assert not exp.HasField("exposure_percent")
    assert all(v.weight == 0 and v.key == "" for v in exp.variants)


def test_checkout_button_color_translates_exactly() -> None:
    exp = load_experiment(EXAMPLES / "checkout-button-color.json")
    expected = experiment_pb2.Experiment(
        name="Checkout Button Color",
        targeting=experiment_pb2.Targeting(countries=["SN", "FR"]),
        variants=[
            experiment_pb2.Variant(name="Blue Button", is_control=True),
            experiment_pb2.Variant(name="Green Button"),
        ],
    )
    expected.variants[0].config.update({"button_color": "#0A84FF"})
    expected.variants[1].config.update({"button_color": "#34C759"})
    assert exp == expected


def test_payment_method_priority_translates_exactly() -> None:
    exp = load_experiment(EXAMPLES / "payment-method-priority.json")
    assert exp.name == "Payment Method Priority"
    assert list(exp.targeting.countries) == ["SN"]
    assert list(exp.targeting.devices) == ["mobile"]  # a string becomes a one-item list
    assert [v.name for v in exp.variants] == ["Mobile Money First", "Card First"]
    assert not any(v.is_control for v in exp.variants)
    assert _config(exp.variants[0]) == {"priority": ["mobile_money", "card", "bank"]}
    assert _config(exp.variants[1]) == {"priority": ["card", "mobile_money", "bank"]}


def test_yaml_variant_matches_the_json_plus_its_extra_settings() -> None:
    from_yaml = load_experiment(EXAMPLES / "checkout-button-color.yaml")
    from_json = load_experiment(EXAMPLES / "checkout-button-color.json")
    assert from_yaml.name == from_json.name
    assert list(from_yaml.targeting.countries) == list(from_json.targeting.countries)
    assert [_config(v) for v in from_yaml.variants] == [_config(v) for v in from_json.variants]
    assert from_yaml.key == "checkout-button-color"
    assert list(from_yaml.targeting.languages) == ["fr"]
    assert from_yaml.allocation == experiment_pb2.ALLOCATION_STRATEGY_THOMPSON_SAMPLING
    assert from_yaml.exposure_percent == 100
    assert from_yaml.primary_metric == "conversion"
    assert from_yaml.reward == experiment_pb2.REWARD_DEFINITION_CONVERSION
    assert from_yaml.fail_fast.threshold == 0.95
    assert from_yaml.fail_fast.min_samples == 100
    assert from_yaml.fail_fast.auto_stop is False
    assert [(v.key, v.weight, v.is_control) for v in from_yaml.variants] == [
        ("blue-button", 50.0, True),
        ("green-button", 50.0, False),
    ]


def test_every_optional_key_and_spelling() -> None:
    exp = parse_experiment(
        {
            "key": "k",
            "name": "n",
            "description": "d",
            "targeting": {
                "countries": "SN",
                "language": ["fr", "wo"],
                "devices": ["mobile"],
                "user_segments": "premium",
                "min_txn": 3,
                "attributes": {"tier": "gold", "app": ["ios", "android"]},
            },
            "allocation": "Fixed-Weights",
            "exposure_percent": "25%",
            "fail_fast": {"auto_stop": True, "error_rate": 0.01, "min_effect": 0.005},
            "reward": "conversion_not_refunded",
            "variants": [{"name": "a", "weight": "70%"}, {"name": "b", "weight": 30}],
        }
    )
    assert exp.key == "k"
    assert exp.description == "d"
    assert list(exp.targeting.countries) == ["SN"]
    assert list(exp.targeting.languages) == ["fr", "wo"]
    assert list(exp.targeting.user_segments) == ["premium"]
    assert list(exp.targeting.attributes["tier"].values) == ["gold"]
    assert list(exp.targeting.attributes["app"].values) == ["ios", "android"]
    assert exp.allocation == experiment_pb2.ALLOCATION_STRATEGY_FIXED_WEIGHTS
    assert exp.exposure_percent == 25
    assert exp.fail_fast.auto_stop
    assert not exp.fail_fast.HasField("threshold")
    assert exp.fail_fast.error_rate == 0.01
    assert exp.fail_fast.min_effect == 0.005
    assert exp.reward == experiment_pb2.REWARD_DEFINITION_CONVERSION_NOT_REFUNDED
    assert [v.weight for v in exp.variants] == [70, 30]
    assert parse_experiment({"allocation": "bandit"}).allocation == (
        experiment_pb2.ALLOCATION_STRATEGY_THOMPSON_SAMPLING
    )
    assert parse_experiment({"allocation": "fixed"}).allocation == (
        experiment_pb2.ALLOCATION_STRATEGY_FIXED_WEIGHTS
    )


def test_business_rules_are_left_to_the_server() -> None:
    # One variant, two controls, a negative weight: translated, not judged.
    exp = parse_experiment(
        {"name": "", "variants": [{"name": "x", "is_control": True, "weight": -1}]}
    )
    assert len(exp.variants) == 1
    assert exp.variants[0].weight == -1


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"nmae": "x"}, "top level: unknown key 'nmae'"),
        ({"variants": [{"name": "a"}, {"name": "b", "colour": 1}]}, "variants[1]: unknown key"),
        ({"targeting": {"region": "dakar"}}, "targeting: unknown key 'region'"),
        ({"fail_fast": {"thresh": 0.9}}, "fail_fast: unknown key 'thresh'"),
        ({"targeting": {"country": "SN", "countries": ["FR"]}}, "country and countries"),
        ({"targeting": {"country": 221}}, "targeting.country: expected a string or a list"),
        ({"targeting": {"min_txn": "ten"}}, "targeting.min_txn: expected an integer"),
        ({"allocation": "random"}, "allocation: unknown value 'random'"),
        ({"reward": "revenue"}, "reward: unknown value 'revenue'"),
        ({"variants": {"name": "a"}}, "variants: expected a list"),
        ({"variants": [{"config": "blue"}]}, "variants[0].config: expected an object"),
        ({"variants": [{"is_control": "yes"}]}, "variants[0].is_control: expected true or false"),
        ({"variants": [{"weight": "half"}]}, "variants[0].weight: expected a number"),
        (["not", "an", "object"], "top level: expected an object"),
    ],
)
def test_untranslatable_input_names_file_and_key(data: object, fragment: str) -> None:
    with pytest.raises(SpecFileError) as info:
        parse_experiment(data, "exp.json")
    assert str(info.value).startswith("exp.json: ")
    assert fragment in str(info.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("name: x\nvariantz: []\n")
    with pytest.raises(SpecFileError, match=r"typo\.yaml: top level: unknown key 'variantz'"):
        load_experiment(path)


def test_bad_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "name": "x",\n  "variants": [\n}\n')
    with pytest.raises(SpecFileError, match=r"broken\.json: invalid JSON at line 4 column 1"):
        load_experiment(path)


def test_bad_yaml_reports_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecFileError, match=r"broken\.yml: invalid YAML"):
        load_experiment(path)


def test_yaml_norway_problem_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "nordic.yaml"
    path.write_text("name: x\ntargeting:\n  country: [SE, NO]\n")
    with pytest.raises(SpecFileError, match="quote words like NO"):
        load_experiment(path)


def test_format_is_sniffed_without_a_known_extension(tmp_path: Path) -> None:
    as_json = tmp_path / "exp.txt"
    as_json.write_text(json.dumps({"name": "from json", "targeting": {"lang": "fr"}}))
    assert load_experiment(as_json).name == "from json"
    as_yaml = tmp_path / "exp"
    as_yaml.write_text("name: from yaml\ntargeting:\n  lang: [fr]\n")
    exp = load_experiment(as_yaml)
    assert exp.name == "from yaml"
    assert list(exp.targeting.languages) == ["fr"]


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(SpecFileError, match="cannot read"):
        load_experiment(tmp_path / "absent.json")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SpecFileError, match="top level: expected an object, got null"):
        load_experiment(empty)
