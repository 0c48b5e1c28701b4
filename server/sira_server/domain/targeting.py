"""Who is eligible for an experiment: targeting rules, their JSON forms, compiled predicates.

A rule is checked on every Assign, so it is compiled once per experiment into a closure
that runs only the checks that are configured (an empty rule is a constant ``True``).

Semantics (``sira.experiments.v1.Targeting``): every non-empty list must contain the
subject's value; empty lists and an unset ``min_txn`` match everyone.

Normalization, applied to both rules and subjects:

- countries: ISO 3166-1 alpha-2, upper case (``"sn"`` -> ``"SN"``).
- languages: lower case, ``_`` read as ``-`` (``"fr_FR"`` -> ``"fr-fr"``). A rule entry
  is either a primary ISO 639-1 code (``"fr"``: matches ``"fr"``, ``"fr-fr"``,
  ``"fr-sn"``...) or a code with a region (``"fr-ca"``: matches only a subject that
  sends exactly that region). A subject that sends ``"fr"`` does not match ``"fr-ca"``.
- devices, user segments: lower case slugs.
- attributes: names and values compared exactly (case-sensitive); a subject without the
  attribute fails a rule on it.
- min_txn: inclusive; a subject whose transaction count is unknown fails it.

The canonical JSON (what Postgres stores in ``experiments.targeting``) always has the six
keys ``countries``, ``languages``, ``devices``, ``user_segments`` (sorted lists),
``min_txn`` (int or null) and ``attributes`` (name -> sorted list). ``targeting_from_json``
also reads the seed's shorthand: ``{"country": ["SN"], "lang": "fr", "device": "mobile",
"user_segment": "premium", "min_txn": 10}``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sira_server.errors import FieldViolation, InvalidArgument, excerpt

__all__ = [
    "ISO_639_1",
    "ISO_3166_1_ALPHA2",
    "SubjectProfile",
    "TargetingPredicate",
    "TargetingRule",
    "compile_targeting",
    "targeting_from_json",
    "targeting_to_json",
    "validate_targeting_json",
]


def _codes(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Officially assigned ISO 3166-1 alpha-2 codes (249; user-assigned codes such as XK are
# not included). Source: Debian iso-codes, identical to tzdata's iso3166.tab.
ISO_3166_1_ALPHA2: frozenset[str] = _codes(
    "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ "
    "BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM "
    "DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS "
    "GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN "
    "KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ "
    "MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM "
    "PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV "
    "SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI "
    "VN VU WF WS YE YT ZA ZM ZW"
)

# ISO 639-1 two-letter language codes (184, including the withdrawn "bh" that clients may
# still send). Source: Debian iso-codes (alpha_2 of ISO 639-2).
ISO_639_1: frozenset[str] = _codes(
    "aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv "
    "cy da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr "
    "ht hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw "
    "ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv "
    "ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr "
    "ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi "
    "yo za zh zu"
)

_MAX_INT64 = 2**63 - 1
_MAX_SLUG = 64
_MAX_ATTRIBUTE_VALUE = 256
_LANGUAGE_RE = re.compile(r"([a-z]{2})(?:-([a-z]{2}|[0-9]{3}))?")
_SLUG_RE = re.compile(r"[a-z0-9][a-z0-9_.:-]*")
_ATTRIBUTE_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]+")
_EMPTY_ATTRIBUTES: Mapping[str, Any] = MappingProxyType({})


def _no_attributes() -> Mapping[str, Any]:
    return _EMPTY_ATTRIBUTES


def _norm_country(value: str) -> str:
    return value.strip().upper()


def _norm_language(value: str) -> str:
    return value.strip().lower().replace("_", "-")


def _norm_slug(value: str) -> str:
    return value.strip().lower()


@dataclass(frozen=True, slots=True)
class TargetingRule:
    """Who an experiment is for. Values are normalized on construction."""

    countries: frozenset[str] = frozenset()
    """ISO 3166-1 alpha-2 codes, upper case. Empty: every country."""
    languages: frozenset[str] = frozenset()
    """ISO 639-1 codes, lower case, optionally with a region (``"fr-ca"``). Empty: all."""
    devices: frozenset[str] = frozenset()
    """Device classes, lower case. Empty: every device."""
    user_segments: frozenset[str] = frozenset()
    """User segments, lower case. Empty: every segment."""
    min_txn: int | None = None
    """Minimum number of past transactions, inclusive. None: no minimum."""
    attributes: Mapping[str, frozenset[str]] = field(default_factory=_no_attributes)
    """Free attribute name -> accepted values (exact match). Empty value sets are dropped."""

    def __post_init__(self) -> None:
        # Built once per experiment, so normalizing here costs nothing on the hot path.
        set_ = object.__setattr__
        set_(self, "countries", frozenset(_norm_country(c) for c in self.countries))
        set_(self, "languages", frozenset(_norm_language(lang) for lang in self.languages))
        set_(self, "devices", frozenset(_norm_slug(d) for d in self.devices))
        set_(self, "user_segments", frozenset(_norm_slug(s) for s in self.user_segments))
        attributes = {name: frozenset(values) for name, values in self.attributes.items() if values}
        set_(self, "attributes", MappingProxyType(attributes))

    @property
    def is_empty(self) -> bool:
        """True when the rule matches every subject."""
        return not (
            self.countries
            or self.languages
            or self.devices
            or self.user_segments
            or self.min_txn is not None
            or self.attributes
        )


@dataclass(frozen=True, slots=True)
class SubjectProfile:
    """What the caller told us about a subject (``SubjectContext``), normalized once per
    request so that every experiment's predicate compares plain strings."""

    country: str = ""
    language: str = ""
    device: str = ""
    user_segment: str = ""
    transaction_count: int | None = None
    """Number of past transactions; None (unknown) fails any ``min_txn`` rule."""
    attributes: Mapping[str, str] = field(default_factory=_no_attributes)
    """Free attributes, compared exactly. Not copied: the caller must not mutate it."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "country", _norm_country(self.country))
        set_(self, "language", _norm_language(self.language))
        set_(self, "device", _norm_slug(self.device))
        set_(self, "user_segment", _norm_slug(self.user_segment))


TargetingPredicate = Callable[[SubjectProfile], bool]
"""A compiled rule: True when the subject is eligible."""


def _match_all(_: SubjectProfile) -> bool:
    return True


def _attribute_check(name: str, values: frozenset[str]) -> TargetingPredicate:
    return lambda p: p.attributes.get(name) in values


def _all_of(checks: tuple[TargetingPredicate, ...]) -> TargetingPredicate:
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda p: first(p) and second(p)

    def check_all(p: SubjectProfile) -> bool:
        for check in checks:  # noqa: SIM110 - a plain loop is faster than all(<genexpr>)
            if not check(p):
                return False
        return True

    return check_all


def compile_targeting(rule: TargetingRule) -> TargetingPredicate:
    """Compile ``rule`` into a predicate on a `SubjectProfile`.

    Call once per experiment (definitions are cached); the predicate only runs the
    checks the rule configures, cheapest first.
    """
    checks: list[TargetingPredicate] = []
    if rule.countries:
        countries = rule.countries
        checks.append(lambda p: p.country in countries)
    if rule.languages:
        languages = rule.languages
        if any("-" in lang for lang in languages):
            checks.append(
                lambda p: p.language in languages or p.language.partition("-")[0] in languages
            )
        else:
            checks.append(lambda p: p.language.partition("-")[0] in languages)
    if rule.devices:
        devices = rule.devices
        checks.append(lambda p: p.device in devices)
    if rule.user_segments:
        segments = rule.user_segments
        checks.append(lambda p: p.user_segment in segments)
    if rule.min_txn is not None:
        min_txn = rule.min_txn
        checks.append(lambda p: p.transaction_count is not None and p.transaction_count >= min_txn)
    for name in sorted(rule.attributes):
        checks.append(_attribute_check(name, rule.attributes[name]))
    return _all_of(tuple(checks)) if checks else _match_all


# --- JSON forms -------------------------------------------------------------------------

# Canonical key -> accepted spellings (the seed uses singular shorthands).
_ALIASES: dict[str, tuple[str, ...]] = {
    "countries": ("countries", "country"),
    "languages": ("languages", "language", "lang"),
    "devices": ("devices", "device"),
    "user_segments": ("user_segments", "user_segment"),
    "min_txn": ("min_txn",),
    "attributes": ("attributes",),
}
_CANONICAL_OF: dict[str, str] = {
    alias: canonical for canonical, aliases in _ALIASES.items() for alias in aliases
}


def targeting_to_json(rule: TargetingRule) -> dict[str, Any]:
    """The canonical JSON object of ``rule`` (all six keys, sorted lists)."""
    return {
        "countries": sorted(rule.countries),
        "languages": sorted(rule.languages),
        "devices": sorted(rule.devices),
        "user_segments": sorted(rule.user_segments),
        "min_txn": rule.min_txn,
        "attributes": {name: sorted(rule.attributes[name]) for name in sorted(rule.attributes)},
    }


def validate_targeting_json(
    obj: object, *, field_prefix: str = "targeting"
) -> list[FieldViolation]:
    """Every problem with a targeting JSON object (canonical or seed form); [] when valid.

    ``None`` counts as an empty rule. Field paths start with ``field_prefix``.
    """
    return _parse(obj, field_prefix)[1]


def targeting_from_json(obj: object, *, field_prefix: str = "targeting") -> TargetingRule:
    """Parse a targeting JSON object (canonical or seed form) into a normalized rule.

    Raises `InvalidArgument` with one field violation per problem.
    """
    rule, violations = _parse(obj, field_prefix)
    if violations:
        raise InvalidArgument.from_violations(violations)
    return rule


def _parse(obj: object, prefix: str) -> tuple[TargetingRule, list[FieldViolation]]:
    violations: list[FieldViolation] = []
    if obj is None:
        return TargetingRule(), violations
    if not isinstance(obj, Mapping):
        violations.append(FieldViolation(prefix, f"must be a JSON object, got {_json_type(obj)}"))
        return TargetingRule(), violations

    # Resolve spellings first so each dimension is read from exactly one key.
    given: dict[str, str] = {}
    for key in obj:
        if not isinstance(key, str):
            violations.append(FieldViolation(prefix, f"keys must be strings, got {key!r}"))
            continue
        canonical = _CANONICAL_OF.get(key)
        if canonical is None:
            violations.append(FieldViolation(f"{prefix}.{key}", _unknown_key_message(key)))
        elif canonical in given:
            violations.append(
                FieldViolation(
                    f"{prefix}.{key}",
                    f"given twice, as '{given[canonical]}' and '{key}'; use only '{canonical}'",
                )
            )
        else:
            given[canonical] = key

    def read_list(canonical: str, check: Callable[[str], str | None]) -> frozenset[str]:
        key = given.get(canonical)
        if key is None:
            return frozenset()
        return _read_strings(obj[key], f"{prefix}.{key}", check, violations)

    rule = TargetingRule(
        countries=read_list("countries", _check_country),
        languages=read_list("languages", _check_language),
        devices=read_list("devices", _check_slug),
        user_segments=read_list("user_segments", _check_slug),
        min_txn=(
            _read_min_txn(obj[given["min_txn"]], f"{prefix}.min_txn", violations)
            if "min_txn" in given
            else None
        ),
        attributes=(
            _read_attributes(obj[given["attributes"]], f"{prefix}.attributes", violations)
            if "attributes" in given
            else {}
        ),
    )
    return rule, violations


def _unknown_key_message(key: str) -> str:
    accepted = ", ".join(
        f"{canonical} (or {', '.join(aliases[1:])})" if len(aliases) > 1 else canonical
        for canonical, aliases in _ALIASES.items()
    )
    close = difflib.get_close_matches(key, list(_CANONICAL_OF), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown targeting key '{excerpt(key)}'; {hint}accepted keys: {accepted}"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _read_strings(
    value: object,
    path: str,
    check: Callable[[str], str | None],
    violations: list[FieldViolation],
) -> frozenset[str]:
    """A string or a list of strings (null: empty); each entry checked by ``check``."""
    if value is None:
        return frozenset()
    items: Iterable[object]
    if isinstance(value, str):
        items, paths = [value], [path]
    elif isinstance(value, list | tuple):
        items, paths = value, [f"{path}[{i}]" for i in range(len(value))]
    else:
        violations.append(
            FieldViolation(path, f"must be a string or a list of strings, got {_json_type(value)}")
        )
        return frozenset()
    out: set[str] = set()
    for item, item_path in zip(items, paths, strict=True):
        if not isinstance(item, str):
            violations.append(
                FieldViolation(item_path, f"must be a string, got {_json_type(item)}")
            )
            continue
        problem = check(item)
        if problem is not None:
            violations.append(FieldViolation(item_path, problem))
        else:
            out.add(item)
    return frozenset(out)


def _check_country(raw: str) -> str | None:
    code = _norm_country(raw)
    if len(code) != 2 or not code.isascii() or not code.isalpha():
        return (
            f"'{excerpt(raw)}' is not an ISO 3166-1 alpha-2 country code: use two letters "
            "(e.g. 'SN' for Senegal, 'FR' for France)"
        )
    if code not in ISO_3166_1_ALPHA2:
        return f"'{excerpt(raw)}' is not an assigned ISO 3166-1 alpha-2 country code"
    return None


def _check_language(raw: str) -> str | None:
    tag = _norm_language(raw)
    match = _LANGUAGE_RE.fullmatch(tag)
    if match is None:
        return (
            f"'{excerpt(raw)}' is not a language code: use an ISO 639-1 two-letter code, "
            "optionally with a region (e.g. 'fr', 'en', 'fr-SN')"
        )
    primary, region = match.groups()
    if primary not in ISO_639_1:
        return f"'{primary}' is not an ISO 639-1 language code (e.g. 'fr', 'en', 'wo')"
    if region is not None and region.isalpha() and region.upper() not in ISO_3166_1_ALPHA2:
        return (
            f"'{region.upper()}' in '{excerpt(raw)}' is not an assigned ISO 3166-1 alpha-2 region"
        )
    return None


def _check_slug(raw: str) -> str | None:
    slug = _norm_slug(raw)
    if not slug:
        return "must not be empty"
    if len(slug) > _MAX_SLUG or _SLUG_RE.fullmatch(slug) is None:
        return (
            f"'{excerpt(raw)}' is not a slug: use at most {_MAX_SLUG} letters, digits, '_', '-', "
            "'.' or ':', starting with a letter or digit (e.g. 'mobile', 'premium')"
        )
    return None


def _read_min_txn(value: object, path: str, violations: list[FieldViolation]) -> int | None:
    if value is None:
        return None
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if number is None or number < 0 or number > _MAX_INT64:
        violations.append(
            FieldViolation(
                path,
                f"must be a non-negative integer (minimum past transactions, inclusive), "
                f"got {value!r}",
            )
        )
        return None
    return number


def _read_attributes(
    value: object, path: str, violations: list[FieldViolation]
) -> dict[str, frozenset[str]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        violations.append(
            FieldViolation(
                path,
                f"must be an object of attribute name -> string or list of strings, "
                f"got {_json_type(value)}",
            )
        )
        return {}
    out: dict[str, frozenset[str]] = {}
    for name, values in value.items():
        name_path = f"{path}.{name}"
        if (
            not isinstance(name, str)
            or len(name) > _MAX_SLUG
            or _ATTRIBUTE_NAME_RE.fullmatch(name) is None
        ):
            violations.append(
                FieldViolation(
                    name_path,
                    f"attribute name '{excerpt(str(name))}' is invalid: use 1 to {_MAX_SLUG} "
                    "letters, digits, '_', '-', '.' or ':'",
                )
            )
            continue
        out[name] = _read_strings(values, name_path, _check_attribute_value, violations)
    return out


def _check_attribute_value(raw: str) -> str | None:
    if not raw:
        return "must not be empty"
    if len(raw) > _MAX_ATTRIBUTE_VALUE:
        return f"must be at most {_MAX_ATTRIBUTE_VALUE} characters"
    return None
