"""Experiment files (the seed's JSON shape, or the same in YAML) -> `Experiment`.

This is a faithful translation, not a validator: business rules (at least two
variants, one control, slugs, ranges) are the server's to check, so a file the
server would reject still loads here. What is refused is what cannot be
translated at all: unknown keys, wrong types, unknown enum words.

    name: Checkout Button Color
    targeting: {country: [SN, FR], lang: fr}
    variants:
      - {name: Blue Button, config: {button_color: "#0A84FF"}, is_control: true}
      - {name: Green Button, config: {button_color: "#34C759"}}

Targeting keys accept the seed's singular spellings and a string for a list:
country/countries, lang/language/languages, device/devices,
user_segment/user_segments, plus min_txn and attributes ({name: value or
[values]}). Variant weights may be any positive numbers, e.g. percentages
(50, or "50%"): only their ratios matter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sira.experiments.v1 import experiment_pb2

__all__ = ["SpecFileError", "load_experiment", "parse_experiment"]

_T = TypeVar("_T")

_EXPERIMENT_KEYS = (
    "key",
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
_VARIANT_KEYS = ("key", "name", "config", "is_control", "weight")
_FAIL_FAST_KEYS = ("threshold", "min_samples", "auto_stop", "error_rate", "min_effect")
# Targeting field -> every spelling accepted in a file.
_TARGETING_LISTS = {
    "countries": ("country", "countries"),
    "languages": ("lang", "language", "languages"),
    "devices": ("device", "devices"),
    "user_segments": ("user_segment", "user_segments"),
}
_TARGETING_KEYS = (*(k for ks in _TARGETING_LISTS.values() for k in ks), "min_txn", "attributes")

_ALLOCATIONS = {
    "thompson_sampling": experiment_pb2.ALLOCATION_STRATEGY_THOMPSON_SAMPLING,
    "bandit": experiment_pb2.ALLOCATION_STRATEGY_THOMPSON_SAMPLING,
    "fixed_weights": experiment_pb2.ALLOCATION_STRATEGY_FIXED_WEIGHTS,
    "fixed": experiment_pb2.ALLOCATION_STRATEGY_FIXED_WEIGHTS,
}
_REWARDS = {
    "conversion": experiment_pb2.REWARD_DEFINITION_CONVERSION,
    "conversion_not_refunded": experiment_pb2.REWARD_DEFINITION_CONVERSION_NOT_REFUNDED,
}


class SpecFileError(ValueError):
    """The file cannot be read or translated; the message names file and key."""


def load_experiment(path: str | Path) -> experiment_pb2.Experiment:
    """Read a .json / .yaml / .yml file (other names: sniffed) into an Experiment."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SpecFileError(f"{path}: not a UTF-8 text file") from None
    return parse_experiment(_decode(text, path), str(path))


def parse_experiment(data: object, source: str = "<spec>") -> experiment_pb2.Experiment:
    """Translate already-decoded data; `source` names it in error messages."""
    return _Translator(source).experiment(data)


def _decode(text: str, path: Path) -> object:
    suffix = path.suffix.lower()
    as_json = suffix == ".json" or (
        suffix not in (".yaml", ".yml") and text.lstrip().startswith(("{", "["))
    )
    if as_json:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecFileError(
                f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecFileError(f"{path}: invalid YAML{where}: {problem}") from None


class _Translator:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> SpecFileError:
        return SpecFileError(f"{self.source}: {where}: {problem}")

    def mapping(self, value: object, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected an object, got {_kind(value)}")
        for key in value:
            if key not in allowed:
                raise self.fail(
                    where, f"unknown key {str(key)!r} (expected one of: {', '.join(allowed)})"
                )
        return value

    def text(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"expected a string, got {_kind(value)}")
        return value

    def boolean(self, value: object, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {_kind(value)}")
        return value

    def integer(self, value: object, where: str) -> int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, got {_kind(value)}")
        return value

    def number(self, value: object, where: str, *, percent: bool = False) -> float:
        """A number; with `percent`, also a string like "50%" (read as 50)."""
        if percent and isinstance(value, str) and value.strip().endswith("%"):
            try:
                return float(value.strip()[:-1])
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, f"expected a number, got {_kind(value)}")
        return float(value)

    def strings(self, value: object, where: str) -> list[str]:
        """A string or a list of strings."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        hint = ""
        if isinstance(value, bool) or (
            isinstance(value, list) and any(isinstance(v, bool) for v in value)
        ):
            hint = " (in YAML, quote words like NO, yes or off to keep them strings)"
        raise self.fail(where, f"expected a string or a list of strings, got {_kind(value)}{hint}")

    def choice(self, value: object, where: str, words: Mapping[str, _T]) -> _T:
        word = self.text(value, where).strip().lower().replace("-", "_")
        if word not in words:
            raise self.fail(where, f"unknown value {value!r} (expected one of: {', '.join(words)})")
        return words[word]

    def experiment(self, data: object) -> experiment_pb2.Experiment:
        spec = self.mapping(data, "top level", _EXPERIMENT_KEYS)
        exp = experiment_pb2.Experiment()
        for field in ("key", "name", "description", "primary_metric"):
            if field in spec:
                setattr(exp, field, self.text(spec[field], field))
        if "targeting" in spec:
            exp.targeting.CopyFrom(self.targeting(spec["targeting"]))
        if "allocation" in spec:
            exp.allocation = self.choice(spec["allocation"], "allocation", _ALLOCATIONS)
        if "exposure_percent" in spec:
            exp.exposure_percent = self.number(
                spec["exposure_percent"], "exposure_percent", percent=True
            )
        if "fail_fast" in spec:
            exp.fail_fast.CopyFrom(self.fail_fast(spec["fail_fast"]))
        if "reward" in spec:
            exp.reward = self.choice(spec["reward"], "reward", _REWARDS)
        if "variants" in spec:
            variants = spec["variants"]
            if not isinstance(variants, list):
                raise self.fail("variants", f"expected a list, got {_kind(variants)}")
            for index, variant in enumerate(variants):
                exp.variants.append(self.variant(variant, f"variants[{index}]"))
        return exp

    def targeting(self, data: object) -> experiment_pb2.Targeting:
        spec = self.mapping(data, "targeting", _TARGETING_KEYS)
        targeting = experiment_pb2.Targeting()
        for field, spellings in _TARGETING_LISTS.items():
            given = [k for k in spellings if k in spec]
            if len(given) > 1:
                raise self.fail("targeting", f"{' and '.join(given)} name the same field")
            if given:
                values = self.strings(spec[given[0]], f"targeting.{given[0]}")
                getattr(targeting, field).extend(values)
        if "min_txn" in spec:
            targeting.min_txn = self.integer(spec["min_txn"], "targeting.min_txn")
        if "attributes" in spec:
            attributes = spec["attributes"]
            if not isinstance(attributes, Mapping):
                raise self.fail(
                    "targeting.attributes", f"expected an object, got {_kind(attributes)}"
                )
            for name, value in attributes.items():
                where = f"targeting.attributes.{name}"
                targeting.attributes[self.text(name, where)].values.extend(
                    self.strings(value, where)
                )
        return targeting

    def fail_fast(self, data: object) -> experiment_pb2.FailFastSettings:
        spec = self.mapping(data, "fail_fast", _FAIL_FAST_KEYS)
        settings = experiment_pb2.FailFastSettings()
        if "threshold" in spec:
            settings.threshold = self.number(spec["threshold"], "fail_fast.threshold")
        if "min_samples" in spec:
            settings.min_samples = self.integer(spec["min_samples"], "fail_fast.min_samples")
        if "auto_stop" in spec:
            settings.auto_stop = self.boolean(spec["auto_stop"], "fail_fast.auto_stop")
        if "error_rate" in spec:
            settings.error_rate = self.number(spec["error_rate"], "fail_fast.error_rate")
        if "min_effect" in spec:
            settings.min_effect = self.number(spec["min_effect"], "fail_fast.min_effect")
        return settings

    def variant(self, data: object, where: str) -> experiment_pb2.Variant:
        spec = self.mapping(data, where, _VARIANT_KEYS)
        variant = experiment_pb2.Variant()
        for field in ("key", "name"):
            if field in spec:
                setattr(variant, field, self.text(spec[field], f"{where}.{field}"))
        if "config" in spec:
            config = spec["config"]
            if not isinstance(config, Mapping):
                raise self.fail(f"{where}.config", f"expected an object, got {_kind(config)}")
            try:
                variant.config.update(config)
            except (TypeError, ValueError) as exc:
                raise self.fail(f"{where}.config", f"not representable as JSON: {exc}") from None
        if "is_control" in spec:
            variant.is_control = self.boolean(spec["is_control"], f"{where}.is_control")
        if "weight" in spec:
            variant.weight = self.number(spec["weight"], f"{where}.weight", percent=True)
        return variant


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
