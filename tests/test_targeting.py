"""Targeting: compiled predicates per dimension and combined, normalization, JSON forms,
validation messages."""

from __future__ import annotations

import itertools
import json
from importlib import resources
from types import MappingProxyType
from typing import Any

import pytest

from sira_server.domain.targeting import (
    ISO_639_1,
    ISO_3166_1_ALPHA2,
    SubjectProfile,
    TargetingRule,
    compile_targeting,
    targeting_from_json,
    targeting_to_json,
    validate_targeting_json,
)
from sira_server.errors import FieldViolation, InvalidArgument


def matches(rule_json: dict[str, Any], **subject: Any) -> bool:
    return compile_targeting(targeting_from_json(rule_json))(SubjectProfile(**subject))


def violations(obj: object) -> dict[str, str]:
    return {v.field: v.description for v in validate_targeting_json(obj)}


# --- compiled predicates ----------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        {},
        {"country": "SN", "language": "fr", "device": "mobile", "user_segment": "premium"},
        {"transaction_count": 0, "attributes": {"plan": "gold"}},
    ],
)
def test_empty_rule_matches_everyone(subject: dict[str, Any]) -> None:
    assert TargetingRule().is_empty
    assert compile_targeting(TargetingRule())(SubjectProfile(**subject))
    assert matches({}, **subject)
    assert compile_targeting(targeting_from_json(None))(SubjectProfile(**subject))


@pytest.mark.parametrize(
    ("rule", "subject", "expected"),
    [
        # countries
        ({"countries": ["SN", "FR"]}, {"country": "SN"}, True),
        ({"countries": ["SN", "FR"]}, {"country": "FR"}, True),
        ({"countries": ["SN", "FR"]}, {"country": "CI"}, False),
        ({"countries": ["SN"]}, {}, False),
        ({"countries": []}, {"country": "CI"}, True),
        # languages
        ({"languages": ["fr"]}, {"language": "fr"}, True),
        ({"languages": ["fr"]}, {"language": "en"}, False),
        ({"languages": ["fr"]}, {}, False),
        ({"languages": ["fr", "wo"]}, {"language": "wo"}, True),
        # devices
        ({"devices": ["mobile"]}, {"device": "mobile"}, True),
        ({"devices": ["mobile"]}, {"device": "desktop"}, False),
        ({"devices": ["mobile", "tablet"]}, {"device": "tablet"}, True),
        ({"devices": ["mobile"]}, {}, False),
        # user segments
        ({"user_segments": ["premium"]}, {"user_segment": "premium"}, True),
        ({"user_segments": ["premium"]}, {"user_segment": "standard"}, False),
        ({"user_segments": ["premium"]}, {}, False),
        # min_txn (inclusive; unknown count fails)
        ({"min_txn": 10}, {"transaction_count": 10}, True),
        ({"min_txn": 10}, {"transaction_count": 11}, True),
        ({"min_txn": 10}, {"transaction_count": 9}, False),
        ({"min_txn": 10}, {}, False),
        ({"min_txn": 0}, {"transaction_count": 0}, True),
        ({"min_txn": 0}, {}, False),
        ({"min_txn": None}, {}, True),
        # attributes (exact, case-sensitive; missing fails)
        ({"attributes": {"plan": ["gold", "silver"]}}, {"attributes": {"plan": "gold"}}, True),
        ({"attributes": {"plan": ["gold"]}}, {"attributes": {"plan": "bronze"}}, False),
        ({"attributes": {"plan": ["gold"]}}, {"attributes": {"plan": "Gold"}}, False),
        ({"attributes": {"plan": ["gold"]}}, {"attributes": {"other": "gold"}}, False),
        ({"attributes": {"plan": ["gold"]}}, {}, False),
        ({"attributes": {"plan": []}}, {}, True),
        (
            {"attributes": {"plan": "gold", "app": ["3.2", "3.3"]}},
            {"attributes": {"plan": "gold", "app": "3.3"}},
            True,
        ),
        (
            {"attributes": {"plan": "gold", "app": ["3.2", "3.3"]}},
            {"attributes": {"plan": "gold", "app": "3.1"}},
            False,
        ),
        (
            {"attributes": {"plan": "gold"}},
            {"attributes": MappingProxyType({"plan": "gold"})},
            True,
        ),
    ],
)
def test_each_dimension(rule: dict[str, Any], subject: dict[str, Any], expected: bool) -> None:
    assert matches(rule, **subject) is expected


FULL_RULE: dict[str, Any] = {
    "countries": ["SN", "FR"],
    "languages": ["fr"],
    "devices": ["mobile"],
    "user_segments": ["premium"],
    "min_txn": 10,
    "attributes": {"plan": ["gold"]},
}
PASS: dict[str, Any] = {
    "country": "SN",
    "language": "fr",
    "device": "mobile",
    "user_segment": "premium",
    "transaction_count": 10,
    "attributes": {"plan": "gold"},
}
FAIL: dict[str, Any] = {
    "country": "CI",
    "language": "en",
    "device": "desktop",
    "user_segment": "standard",
    "transaction_count": 9,
    "attributes": {"plan": "bronze"},
}


@pytest.mark.parametrize("passing", list(itertools.product([True, False], repeat=6)))
def test_every_combination_requires_all_dimensions(passing: tuple[bool, ...]) -> None:
    predicate = compile_targeting(targeting_from_json(FULL_RULE))
    subject = {k: (PASS if ok else FAIL)[k] for k, ok in zip(PASS, passing, strict=True)}
    assert predicate(SubjectProfile(**subject)) is all(passing)


@pytest.mark.parametrize(("dimension", "subject_field"), list(zip(FULL_RULE, PASS, strict=True)))
def test_only_configured_dimensions_are_checked(dimension: str, subject_field: str) -> None:
    # A rule on one dimension ignores every other field of the subject.
    predicate = compile_targeting(targeting_from_json({dimension: FULL_RULE[dimension]}))
    for other in PASS:
        subject = dict(PASS)
        subject[other] = FAIL[other]
        assert predicate(SubjectProfile(**subject)) is (other != subject_field)


def test_many_attributes_use_the_generic_path() -> None:
    rule = {"attributes": {f"a{i}": [str(i)] for i in range(5)}, "countries": ["SN"]}
    good = {f"a{i}": str(i) for i in range(5)}
    assert matches(rule, country="SN", attributes=good)
    for i in range(5):
        assert not matches(rule, country="SN", attributes={**good, f"a{i}": "x"})
    assert not matches(rule, country="FR", attributes=good)


# --- normalization ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "subject", "expected"),
    [
        ({"countries": ["sn"]}, {"country": "SN"}, True),
        ({"countries": ["SN"]}, {"country": "sn"}, True),
        ({"countries": [" Sn "]}, {"country": " sN"}, True),
        ({"languages": ["FR"]}, {"language": "fr"}, True),
        ({"languages": ["fr"]}, {"language": "FR"}, True),
        # a primary code matches any region of it
        ({"languages": ["fr"]}, {"language": "fr-FR"}, True),
        ({"languages": ["fr"]}, {"language": "fr_SN"}, True),
        ({"languages": ["fr"]}, {"language": "FR-ca"}, True),
        ({"languages": ["fr"]}, {"language": "en-FR"}, False),
        ({"languages": ["zh"]}, {"language": "zh-Hant-TW"}, True),
        # a region-qualified code matches exactly that region
        ({"languages": ["fr-CA"]}, {"language": "fr-ca"}, True),
        ({"languages": ["fr_CA"]}, {"language": "fr-CA"}, True),
        ({"languages": ["fr-CA"]}, {"language": "fr"}, False),
        ({"languages": ["fr-CA"]}, {"language": "fr-FR"}, False),
        ({"languages": ["en", "fr-CA"]}, {"language": "en-US"}, True),
        ({"languages": ["en", "fr-CA"]}, {"language": "fr-CA"}, True),
        ({"languages": ["en", "fr-CA"]}, {"language": "fr-FR"}, False),
        ({"languages": ["es-419"]}, {"language": "es-419"}, True),
        ({"devices": ["Mobile"]}, {"device": "MOBILE"}, True),
        ({"user_segments": ["PREMIUM"]}, {"user_segment": "Premium "}, True),
    ],
)
def test_normalization(rule: dict[str, Any], subject: dict[str, Any], expected: bool) -> None:
    assert matches(rule, **subject) is expected


def test_rule_and_profile_normalize_on_construction() -> None:
    rule = TargetingRule(
        countries=frozenset({"sn", " fr"}),
        languages=frozenset({"FR_ca", "En"}),
        devices=frozenset({"Mobile"}),
        user_segments=frozenset({"VIP"}),
        attributes={"plan": frozenset({"Gold"}), "unused": frozenset()},
    )
    assert rule.countries == {"SN", "FR"}
    assert rule.languages == {"fr-ca", "en"}
    assert rule.devices == {"mobile"}
    assert rule.user_segments == {"vip"}
    assert dict(rule.attributes) == {"plan": {"Gold"}}  # values exact; empty sets dropped
    assert not rule.is_empty
    profile = SubjectProfile(country=" sn", language="FR_fr", device="Tablet", user_segment="VIP")
    assert (profile.country, profile.language, profile.device, profile.user_segment) == (
        "SN",
        "fr-fr",
        "tablet",
        "vip",
    )


def test_rule_attributes_are_read_only() -> None:
    rule = targeting_from_json({"attributes": {"plan": "gold"}})
    with pytest.raises(TypeError):
        rule.attributes["plan"] = frozenset({"x"})  # type: ignore[index]


# --- JSON forms -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed_json", "expected"),
    [
        (
            {"country": ["SN", "FR"], "lang": ["fr"]},
            TargetingRule(countries=frozenset({"SN", "FR"}), languages=frozenset({"fr"})),
        ),
        (
            {"user_segment": "premium", "min_txn": 10},
            TargetingRule(user_segments=frozenset({"premium"}), min_txn=10),
        ),
        ({"country": ["SN", "FR"]}, TargetingRule(countries=frozenset({"SN", "FR"}))),
        (
            {"country": ["SN"], "device": "mobile"},
            TargetingRule(countries=frozenset({"SN"}), devices=frozenset({"mobile"})),
        ),
        (
            {
                "country": ["SN", "FR"],
                "lang": ["fr"],
                "device": "mobile",
                "user_segment": "premium",
                "min_txn": 10,
            },
            TargetingRule(
                countries=frozenset({"SN", "FR"}),
                languages=frozenset({"fr"}),
                devices=frozenset({"mobile"}),
                user_segments=frozenset({"premium"}),
                min_txn=10,
            ),
        ),
    ],
)
def test_seed_formats(seed_json: dict[str, Any], expected: TargetingRule) -> None:
    assert targeting_from_json(seed_json) == expected


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("country", "SN", "countries"),
        ("countries", ["SN"], "countries"),
        ("lang", "fr", "languages"),
        ("language", "fr", "languages"),
        ("languages", ["fr"], "languages"),
        ("device", "mobile", "devices"),
        ("devices", ["mobile"], "devices"),
        ("user_segment", "premium", "user_segments"),
        ("user_segments", ["premium"], "user_segments"),
    ],
)
def test_every_alias_string_or_list(key: str, value: str | list[str], field: str) -> None:
    rule = targeting_from_json({key: value})
    expected = frozenset([value] if isinstance(value, str) else value)
    assert getattr(rule, field) == expected


def test_null_values_mean_unset() -> None:
    obj = {k: None for k in ("countries", "languages", "devices", "user_segments", "min_txn")}
    assert targeting_from_json({**obj, "attributes": None}) == TargetingRule()


def test_canonical_json() -> None:
    rule = targeting_from_json(
        {
            "country": ["sn", "FR", "SN"],
            "lang": "FR",
            "device": ["tablet", "Mobile"],
            "user_segment": "premium",
            "min_txn": 10,
            "attributes": {"plan": ["silver", "gold"], "app": "3.2"},
        }
    )
    assert targeting_to_json(rule) == {
        "countries": ["FR", "SN"],
        "languages": ["fr"],
        "devices": ["mobile", "tablet"],
        "user_segments": ["premium"],
        "min_txn": 10,
        "attributes": {"app": ["3.2"], "plan": ["gold", "silver"]},
    }
    assert list(targeting_to_json(rule)["attributes"]) == ["app", "plan"]


def test_canonical_json_of_empty_rule() -> None:
    assert targeting_to_json(TargetingRule()) == {
        "countries": [],
        "languages": [],
        "devices": [],
        "user_segments": [],
        "min_txn": None,
        "attributes": {},
    }


@pytest.mark.parametrize(
    "obj",
    [
        {},
        FULL_RULE,
        {"country": ["SN", "FR"], "lang": ["fr"]},
        {"languages": ["fr-CA", "en"], "min_txn": 0, "attributes": {"a": [], "b": ["x"]}},
    ],
)
def test_round_trip_through_postgres_json(obj: dict[str, Any]) -> None:
    rule = targeting_from_json(obj)
    canonical = targeting_to_json(rule)
    stored = json.loads(json.dumps(canonical))  # what jsonb gives back
    assert targeting_from_json(stored) == rule
    assert targeting_to_json(targeting_from_json(stored)) == canonical
    assert validate_targeting_json(stored) == []


def test_min_txn_accepts_integral_float() -> None:
    assert targeting_from_json({"min_txn": 10.0}).min_txn == 10
    assert targeting_from_json({"min_txn": 2**63 - 1}).min_txn == 2**63 - 1


# --- validation -------------------------------------------------------------------------


def test_valid_objects_have_no_violations() -> None:
    assert validate_targeting_json(None) == []
    assert validate_targeting_json({}) == []
    assert validate_targeting_json(FULL_RULE) == []
    assert validate_targeting_json({"lang": ["fr-SN", "es-419", "pt_BR"]}) == []


def test_unknown_key_is_rejected_with_a_suggestion() -> None:
    v = violations({"contry": ["SN"]})
    assert list(v) == ["targeting.contry"]
    assert "unknown targeting key 'contry'" in v["targeting.contry"]
    assert "did you mean 'country'?" in v["targeting.contry"]
    assert "countries (or country)" in v["targeting.contry"]
    assert "min_txn" in v["targeting.contry"]


def test_unknown_key_without_close_match_lists_accepted_keys() -> None:
    message = violations({"zzz": 1})["targeting.zzz"]
    assert "did you mean" not in message
    assert "accepted keys: countries (or country), languages (or language, lang)" in message


def test_same_dimension_twice_is_rejected() -> None:
    v = violations({"country": "SN", "countries": ["FR"]})
    expected = "given twice, as 'country' and 'countries'; use only 'countries'"
    assert v == {"targeting.countries": expected}


@pytest.mark.parametrize(
    ("obj", "field", "fragment"),
    [
        ({"country": "SEN"}, "targeting.country", "use two letters"),
        ({"country": ["SN", "S1"]}, "targeting.country[1]", "use two letters"),
        ({"countries": [""]}, "targeting.countries[0]", "use two letters"),
        ({"countries": ["ZZ"]}, "targeting.countries[0]", "'ZZ' is not an assigned"),
        ({"countries": ["UK"]}, "targeting.countries[0]", "not an assigned ISO 3166-1"),
        ({"countries": ["XK"]}, "targeting.countries[0]", "not an assigned ISO 3166-1"),
        ({"countries": ["ÉS"]}, "targeting.countries[0]", "use two letters"),
        ({"countries": 7}, "targeting.countries", "string or a list of strings, got a number"),
        ({"countries": {"SN": 1}}, "targeting.countries", "got an object"),
        ({"countries": ["SN", None]}, "targeting.countries[1]", "must be a string, got null"),
        ({"lang": "french"}, "targeting.lang", "ISO 639-1 two-letter code"),
        ({"lang": ["fr", "qq"]}, "targeting.lang[1]", "'qq' is not an ISO 639-1"),
        ({"languages": ["fr-XY"]}, "targeting.languages[0]", "'XY' in 'fr-XY' is not an"),
        ({"languages": ["fr-FRA"]}, "targeting.languages[0]", "optionally with a region"),
        ({"languages": ["fra"]}, "targeting.languages[0]", "ISO 639-1 two-letter"),
        ({"device": ""}, "targeting.device", "must not be empty"),
        ({"devices": ["smart tv"]}, "targeting.devices[0]", "is not a slug"),
        ({"devices": ["x" * 65]}, "targeting.devices[0]", "at most 64"),
        ({"user_segment": ["-vip"]}, "targeting.user_segment[0]", "starting with a letter"),
        ({"min_txn": -1}, "targeting.min_txn", "non-negative integer"),
        ({"min_txn": True}, "targeting.min_txn", "got True"),
        ({"min_txn": "10"}, "targeting.min_txn", "got '10'"),
        ({"min_txn": 1.5}, "targeting.min_txn", "non-negative integer"),
        ({"min_txn": 2**63}, "targeting.min_txn", "non-negative integer"),
        ({"attributes": ["plan"]}, "targeting.attributes", "must be an object"),
        ({"attributes": {"a b": "x"}}, "targeting.attributes.a b", "attribute name 'a b'"),
        ({"attributes": {"": "x"}}, "targeting.attributes.", "attribute name ''"),
        ({"attributes": {"plan": 3}}, "targeting.attributes.plan", "got a number"),
        ({"attributes": {"plan": ["gold", ""]}}, "targeting.attributes.plan[1]", "not be empty"),
        ({"attributes": {"plan": ["x" * 257]}}, "targeting.attributes.plan[0]", "at most 256"),
    ],
)
def test_violation_messages(obj: dict[str, Any], field: str, fragment: str) -> None:
    v = violations(obj)
    assert list(v) == [field]
    assert fragment in v[field]


@pytest.mark.parametrize("obj", [[], "SN", 3, True])
def test_non_object_is_rejected(obj: object) -> None:
    (violation,) = validate_targeting_json(obj)
    assert violation.field == "targeting"
    assert violation.description.startswith("must be a JSON object, got")


def test_all_violations_are_reported_at_once() -> None:
    v = violations({"country": ["XX", "SN", "FRA"], "lang": "qq", "min_txn": -3, "foo": 1})
    assert set(v) == {
        "targeting.country[0]",
        "targeting.country[2]",
        "targeting.lang",
        "targeting.min_txn",
        "targeting.foo",
    }


def test_field_prefix() -> None:
    (violation,) = validate_targeting_json({"country": "XX"}, field_prefix="experiment.targeting")
    assert violation.field == "experiment.targeting.country"


def test_from_json_raises_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as info:
        targeting_from_json({"country": "XX", "min_txn": -1})
    error = info.value
    assert error.status_name == "INVALID_ARGUMENT"
    assert error.reason == "ERROR_REASON_INVALID_ARGUMENT"
    assert [v.field for v in error.violations] == ["targeting.country", "targeting.min_txn"]
    assert all(isinstance(v, FieldViolation) for v in error.violations)
    assert "targeting.country" in error.message


# --- embedded ISO lists -----------------------------------------------------------------


def test_iso_lists() -> None:
    assert len(ISO_3166_1_ALPHA2) == 249
    assert {"SN", "FR", "CI", "ML", "US", "GB", "SS", "BQ", "CW", "SX"} <= ISO_3166_1_ALPHA2
    assert not {"UK", "XK", "EU", "ZZ", "AN", "YU"} & ISO_3166_1_ALPHA2
    assert len(ISO_639_1) == 184
    assert {"fr", "en", "wo", "ff", "ar", "pt", "zh", "sw", "yo", "ha"} <= ISO_639_1
    assert not {"fra", "xx", "zz"} & ISO_639_1


def test_country_list_matches_tzdata() -> None:
    # tzdata's iso3166.tab is an independent copy of the same official list.
    tzdata = pytest.importorskip("tzdata")
    tab = resources.files(tzdata).joinpath("zoneinfo", "iso3166.tab").read_text("utf-8")
    codes = {line.split("\t")[0] for line in tab.splitlines() if line and line[0] != "#"}
    assert codes == ISO_3166_1_ALPHA2
