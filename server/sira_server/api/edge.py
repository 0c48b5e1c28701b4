"""Edge validation: every field of every request, before any servicer runs.

`check_request` walks a request message by its descriptor and enforces the limits of
`sira_server.domain.limits` (`FIELD_RULES` names one rule per field):

- strings: no control characters (free-text fields may keep tab and new lines), a
  maximum length; repeated fields and maps: a maximum count;
- doubles: finite (NaN and +-Infinity rejected); timestamps: within 0001..9999 with
  valid nanos;
- google.protobuf.Struct (variant configs): bounded protobuf size and nesting depth,
  finite numbers, keys and strings without control characters.

Every problem becomes a `FieldViolation` naming the field as the API spells it
(``experiment.variants[1].config.color``); the request fails with INVALID_ARGUMENT and a
BadRequest before anything is read or written. Range rules that depend on meaning
(weights, percentages, page sizes, event values) stay with the domain validation that
gives them a precise message.

Undecodable request bytes never reach a servicer: `guard_deserializer` turns a parse
failure into an `Undecodable` marker that `check_request` reports as INVALID_ARGUMENT,
logging one line per `UNDECODABLE_LOG_INTERVAL` instead of a traceback per request.

A checker is compiled once per message type (a list of closures over the fields that
need checking), so the per-call cost is a few attribute reads and string scans (a few microseconds
for an Assign).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from sira_server.domain import limits as L  # noqa: N812 - read as a table of limits
from sira_server.domain.text_rules import Text, text_problem
from sira_server.errors import FieldViolation, InvalidArgument, excerpt

__all__ = [
    "FIELD_RULES",
    "UNDECODABLE_LOG_INTERVAL",
    "Count",
    "Text",
    "Undecodable",
    "check_message",
    "check_request",
    "guard_deserializer",
    "message_violations",
    "text_problem",
]

log = logging.getLogger("sira_server.api")

UNDECODABLE_LOG_INTERVAL = 60.0
"""Seconds between two log lines about undecodable requests."""


@dataclass(frozen=True, slots=True)
class Count:
    """A repeated field or a map: at most ``max_items`` entries. ``per_item``: the items
    are checked by the servicer, one at a time (TrackBatch answers each on its own)."""

    max_items: int
    per_item: bool = False


Rule = Text | Count

_V1 = "sira.experiments.v1."
_REFERENCE = Text(L.MAX_REFERENCE_CHARS)
_CONTEXT_VALUE = Text(L.MAX_CONTEXT_VALUE_CHARS)
_OUTPUT_ONLY = Text(L.MAX_OUTPUT_ONLY_CHARS)

FIELD_RULES: Mapping[str, Rule] = {
    # Lifecycle
    f"{_V1}GetExperimentRequest.experiment": _REFERENCE,
    f"{_V1}ListExperimentsRequest.page_token": Text(L.MAX_PAGE_TOKEN_CHARS),
    f"{_V1}StartExperimentRequest.experiment": _REFERENCE,
    f"{_V1}StopExperimentRequest.experiment": _REFERENCE,
    f"{_V1}StopExperimentRequest.winner_variant": _REFERENCE,
    f"{_V1}StopExperimentRequest.reason": Text(L.MAX_REASON_CHARS, multiline=True),
    f"{_V1}ArchiveExperimentRequest.experiment": _REFERENCE,
    f"{_V1}DeleteExperimentRequest.experiment": _REFERENCE,
    f"{_V1}ListAuditEventsRequest.experiment": _REFERENCE,
    f"{_V1}ListAuditEventsRequest.page_token": Text(L.MAX_PAGE_TOKEN_CHARS),
    "google.protobuf.FieldMask.paths": Count(L.MAX_FIELD_MASK_PATHS),
    "google.protobuf.FieldMask.paths[]": Text(L.MAX_FIELD_MASK_PATH_CHARS),
    # Experiment (Create/Update)
    f"{_V1}Experiment.id": _REFERENCE,
    f"{_V1}Experiment.key": Text(L.MAX_KEY_CHARS),
    f"{_V1}Experiment.name": Text(L.MAX_NAME_CHARS),
    f"{_V1}Experiment.description": Text(L.MAX_DESCRIPTION_CHARS, multiline=True),
    f"{_V1}Experiment.primary_metric": Text(L.MAX_EVENT_NAME_CHARS),
    f"{_V1}Experiment.variants": Count(L.MAX_VARIANTS),
    f"{_V1}Experiment.created_by": _OUTPUT_ONLY,
    f"{_V1}Experiment.winner_variant_id": _OUTPUT_ONLY,
    f"{_V1}Experiment.stop_reason": Text(L.MAX_OUTPUT_ONLY_CHARS, multiline=True),
    f"{_V1}Variant.id": _REFERENCE,
    f"{_V1}Variant.key": Text(L.MAX_KEY_CHARS),
    f"{_V1}Variant.name": Text(L.MAX_NAME_CHARS),
    f"{_V1}Targeting.countries": Count(L.MAX_TARGETING_VALUES),
    f"{_V1}Targeting.countries[]": _CONTEXT_VALUE,
    f"{_V1}Targeting.languages": Count(L.MAX_TARGETING_VALUES),
    f"{_V1}Targeting.languages[]": _CONTEXT_VALUE,
    f"{_V1}Targeting.devices": Count(L.MAX_TARGETING_VALUES),
    f"{_V1}Targeting.devices[]": _CONTEXT_VALUE,
    f"{_V1}Targeting.user_segments": Count(L.MAX_TARGETING_VALUES),
    f"{_V1}Targeting.user_segments[]": _CONTEXT_VALUE,
    f"{_V1}Targeting.attributes": Count(L.MAX_TARGETING_ATTRIBUTES),
    f"{_V1}Targeting.AttributesEntry.key": Text(L.MAX_ATTRIBUTE_KEY_CHARS),
    f"{_V1}AttributeValues.values": Count(L.MAX_TARGETING_ATTRIBUTE_VALUES),
    f"{_V1}AttributeValues.values[]": Text(L.MAX_ATTRIBUTE_VALUE_CHARS),
    # Assignment
    f"{_V1}AssignRequest.experiment": _REFERENCE,
    f"{_V1}AssignRequest.subject_id": Text(L.MAX_SUBJECT_ID_CHARS),
    f"{_V1}AssignAllRequest.subject_id": Text(L.MAX_SUBJECT_ID_CHARS),
    f"{_V1}SubjectContext.country": _CONTEXT_VALUE,
    f"{_V1}SubjectContext.language": _CONTEXT_VALUE,
    f"{_V1}SubjectContext.device": _CONTEXT_VALUE,
    f"{_V1}SubjectContext.user_segment": _CONTEXT_VALUE,
    f"{_V1}SubjectContext.attributes": Count(L.MAX_CONTEXT_ATTRIBUTES),
    f"{_V1}SubjectContext.AttributesEntry.key": Text(L.MAX_ATTRIBUTE_KEY_CHARS),
    f"{_V1}SubjectContext.AttributesEntry.value": Text(L.MAX_ATTRIBUTE_VALUE_CHARS),
    # Tracking
    f"{_V1}TrackBatchRequest.events": Count(L.MAX_BATCH_EVENTS, per_item=True),
    f"{_V1}TrackedEvent.experiment": _REFERENCE,
    f"{_V1}TrackedEvent.subject_id": Text(L.MAX_SUBJECT_ID_CHARS),
    f"{_V1}TrackedEvent.variant_id": _REFERENCE,
    f"{_V1}TrackedEvent.custom_event_name": Text(L.MAX_EVENT_NAME_CHARS),
    f"{_V1}TrackedEvent.currency": Text(L.MAX_CURRENCY_CHARS),
    f"{_V1}TrackedEvent.client_event_id": Text(L.MAX_EVENT_ID_CHARS),
    f"{_V1}TrackedEvent.tracking_token": Text(L.MAX_TRACKING_TOKEN_CHARS),
    # Insights
    f"{_V1}GetResultsRequest.experiment": _REFERENCE,
    f"{_V1}GetInsightsRequest.experiment": _REFERENCE,
    f"{_V1}GetInsightsHistoryRequest.experiment": _REFERENCE,
}
"""One rule per field, by full name; ``<field>[]`` is the rule of a repeated string's
items. A test keeps this table complete."""

_FALLBACK = Text(L.MAX_NAME_CHARS)
"""For a field added to the protos without a rule (a test fails until it has one)."""
_FALLBACK_COUNT = Count(L.MAX_VARIANTS)


# --- compiled checkers ------------------------------------------------------------------

Out = list[FieldViolation]
Checker = Callable[[Any, str, Out], None]
"""``check(message, path_prefix, out)``: appends one violation per problem."""

_CHECKERS: dict[str, Checker] = {}
_CHECKERS_LOCK = threading.Lock()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _count_problem(items: Any, rule: Count, path: str, out: Out) -> bool:
    if len(items) > rule.max_items:
        out.append(FieldViolation(path, f"at most {rule.max_items} entries, got {len(items)}"))
        return True
    return False


def _repeated_text_step(name: str, count: Count, rule: Text) -> Checker:
    def check(msg: Any, prefix: str, out: Out) -> None:
        items = getattr(msg, name)
        path = _join(prefix, name)
        if not items or _count_problem(items, count, path, out):
            return
        for i, value in enumerate(items):
            problem = text_problem(value, rule)
            if problem is not None:
                out.append(FieldViolation(f"{path}[{i}]", problem))

    return check


def _double_step(name: str, repeated: bool) -> Checker:
    def check(msg: Any, prefix: str, out: Out) -> None:
        values = getattr(msg, name)
        for i, value in enumerate(values if repeated else (values,)):
            if not math.isfinite(value):
                path = f"{_join(prefix, name)}[{i}]" if repeated else _join(prefix, name)
                out.append(FieldViolation(path, f"must be a finite number, got {value}"))

    return check


def _timestamp_problem(ts: Any) -> str | None:
    if not (L.MIN_TIMESTAMP_SECONDS <= ts.seconds <= L.MAX_TIMESTAMP_SECONDS):
        return "seconds must be within 0001-01-01 and 9999-12-31"
    if not (0 <= ts.nanos <= 999_999_999):
        return "nanos must be in 0..999999999"
    return None


def _message_step(name: str, descriptor: Descriptor) -> Checker:
    full_name = descriptor.full_name
    if full_name == "google.protobuf.Struct":

        def check_struct(msg: Any, prefix: str, out: Out) -> None:
            if msg.HasField(name):
                _check_struct(getattr(msg, name), _join(prefix, name), out)

        return check_struct
    if full_name == "google.protobuf.Timestamp":

        def check_timestamp(msg: Any, prefix: str, out: Out) -> None:
            if msg.HasField(name):
                problem = _timestamp_problem(getattr(msg, name))
                if problem is not None:
                    out.append(FieldViolation(_join(prefix, name), problem))

        return check_timestamp
    inner = _checker(descriptor)

    def check(msg: Any, prefix: str, out: Out) -> None:
        if msg.HasField(name):
            inner(getattr(msg, name), _join(prefix, name), out)

    return check


def _repeated_message_step(name: str, rule: Count, descriptor: Descriptor) -> Checker:
    inner = None if rule.per_item else _checker(descriptor)

    def check(msg: Any, prefix: str, out: Out) -> None:
        items = getattr(msg, name)
        path = _join(prefix, name)
        if not items or _count_problem(items, rule, path, out) or inner is None:
            return
        for i, item in enumerate(items):
            inner(item, f"{path}[{i}]", out)

    return check


def _map_step(field: FieldDescriptor) -> Checker:
    name = field.name
    count = _count_rule(field.full_name)
    entry = field.message_type
    assert entry is not None  # a map field's entry type
    key_rule = _text_rule(entry.fields_by_name["key"].full_name)
    value_field = entry.fields_by_name["value"]
    is_text = value_field.type == FieldDescriptor.TYPE_STRING
    value_rule = _text_rule(value_field.full_name) if is_text else None
    value_checker = (
        _checker(value_field.message_type)  # set when TYPE_MESSAGE
        if value_field.type == FieldDescriptor.TYPE_MESSAGE
        else None
    )

    def check(msg: Any, prefix: str, out: Out) -> None:
        items = getattr(msg, name)
        path = _join(prefix, name)
        if not items or _count_problem(items, count, path, out):
            return
        for key, value in items.items():
            key_problem = text_problem(key, key_rule)
            if key_problem is not None:
                out.append(FieldViolation(_entry(path, key), f"key {key_problem}"))
            elif value_rule is not None:
                problem = text_problem(value, value_rule)
                if problem is not None:
                    out.append(FieldViolation(_entry(path, key), problem))
            elif value_checker is not None:
                value_checker(value, _entry(path, key), out)

    return check


def _entry(path: str, key: str) -> str:
    """The path of one map entry: ``context.attributes['plan']``."""
    return f"{path}[{excerpt(key, 40)!r}]"


def _text_rule(full_name: str) -> Text:
    rule = FIELD_RULES.get(full_name, _FALLBACK)
    return rule if isinstance(rule, Text) else _FALLBACK


def _count_rule(full_name: str) -> Count:
    rule = FIELD_RULES.get(full_name, _FALLBACK_COUNT)
    return rule if isinstance(rule, Count) else _FALLBACK_COUNT


def _step(field: FieldDescriptor) -> Checker | None:
    repeated = field.is_repeated
    if field.type == FieldDescriptor.TYPE_STRING:  # singular ones: inline in `_checker`
        if not repeated:
            return None
        return _repeated_text_step(
            field.name, _count_rule(field.full_name), _text_rule(f"{field.full_name}[]")
        )
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _double_step(field.name, repeated)
    message_type = field.message_type
    if field.type == FieldDescriptor.TYPE_MESSAGE and message_type is not None:
        if message_type.GetOptions().map_entry:
            return _map_step(field)
        if repeated:
            return _repeated_message_step(field.name, _count_rule(field.full_name), message_type)
        return _message_step(field.name, message_type)
    return None  # ints, bools, enums: bounded by their type; meaning checked downstream


def _checker(descriptor: Any) -> Checker:
    """The compiled checker of a message type (a `Descriptor`), built on first use."""
    found = _CHECKERS.get(descriptor.full_name)
    if found is not None:
        return found
    texts: list[tuple[str, Text]] = []
    steps: list[Checker] = []

    def check(msg: Any, prefix: str, out: Out) -> None:
        # Singular strings inline (the common case on the hot path), the rest by step.
        for name, rule in texts:
            value = getattr(msg, name)
            if value:
                problem = text_problem(value, rule)
                if problem is not None:
                    out.append(FieldViolation(_join(prefix, name), problem))
        for step in steps:
            step(msg, prefix, out)

    # Registered before the fields are compiled: recursive message types terminate.
    with _CHECKERS_LOCK:
        _CHECKERS[descriptor.full_name] = check
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
            texts.append((field.name, _text_rule(field.full_name)))
            continue
        step = _step(field)
        if step is not None:
            steps.append(step)
    return check


# --- google.protobuf.Struct ---------------------------------------------------------------

_CONFIG_KEY = Text(L.MAX_CONFIG_KEY_CHARS)
_CONFIG_STRING = Text(L.MAX_CONFIG_BYTES, multiline=True)


def _check_struct(struct: Any, path: str, out: Out) -> None:
    size = struct.ByteSize()
    if size > L.MAX_CONFIG_WIRE_BYTES:
        out.append(
            FieldViolation(
                path, f"must be at most {L.MAX_CONFIG_WIRE_BYTES} bytes as protobuf, got {size}"
            )
        )
        return
    _check_fields(struct, path, 1, out)


def _check_fields(struct: Any, path: str, depth: int, out: Out) -> None:
    if depth > L.MAX_CONFIG_DEPTH:
        out.append(FieldViolation(path, f"nesting deeper than {L.MAX_CONFIG_DEPTH} levels"))
        return
    for key, value in struct.fields.items():
        item_path = f"{path}.{excerpt(key, 40)}"
        problem = text_problem(key, _CONFIG_KEY)
        if problem is not None:
            out.append(FieldViolation(item_path, f"key {problem}"))
            continue
        _check_value(value, item_path, depth, out)


def _check_value(value: Any, path: str, depth: int, out: Out) -> None:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        if not math.isfinite(value.number_value):
            out.append(FieldViolation(path, f"must be a finite number, got {value.number_value}"))
    elif kind == "string_value":
        problem = text_problem(value.string_value, _CONFIG_STRING)
        if problem is not None:
            out.append(FieldViolation(path, problem))
    elif kind == "struct_value":
        _check_fields(value.struct_value, path, depth + 1, out)
    elif kind == "list_value":
        if depth + 1 > L.MAX_CONFIG_DEPTH:
            out.append(FieldViolation(path, f"nesting deeper than {L.MAX_CONFIG_DEPTH} levels"))
            return
        for i, item in enumerate(value.list_value.values):
            _check_value(item, f"{path}[{i}]", depth + 1, out)
    elif kind is None:
        out.append(FieldViolation(path, "a Value must set one kind (null, number, string, ...)"))


# --- entry points --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands for a request whose bytes did not parse as the method's request message."""

    method: str


class _Throttle:
    """Lets one log line through per interval and counts the ones it held back."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = 0.0
        self._held = 0
        self._lock = threading.Lock()

    def allow(self) -> int | None:
        """None to stay quiet; else how many were held back since the last line."""
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._held += 1
                return None
            held, self._held = self._held, 0
            self._next = now + self._interval
            return held


_undecodable_log = _Throttle(UNDECODABLE_LOG_INTERVAL)


def guard_deserializer(deserialize: Any, method: str) -> Callable[[bytes], Any]:
    """``deserialize``, but a parse failure yields `Undecodable` instead of raising (grpc
    would answer UNKNOWN and log a traceback for every such request)."""
    if deserialize is None:
        return lambda raw: raw

    def guarded(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:
            held = _undecodable_log.allow()
            if held is not None:
                log.warning(
                    "undecodable %d-byte request for %s (%s); %d more since the last report",
                    len(raw),
                    method,
                    type(exc).__name__,
                    held,
                )
            return Undecodable(method)

    return guarded


def message_violations(message: Message, prefix: str = "") -> list[FieldViolation]:
    """Every edge-rule violation in ``message``; [] when it passes."""
    out: Out = []
    _checker(message.DESCRIPTOR)(message, prefix, out)
    return out


def check_message(message: Message, prefix: str = "") -> None:
    """Raise InvalidArgument (with a BadRequest) when ``message`` breaks an edge rule."""
    violations = message_violations(message, prefix)
    if violations:
        raise InvalidArgument.from_violations(violations)


def check_request(request: Any) -> None:
    """The edge check of one request, undecodable ones included."""
    if isinstance(request, Undecodable):
        raise InvalidArgument.from_violations(
            [
                FieldViolation(
                    "request",
                    f"the bytes are not a valid {request.method.rsplit('/', 1)[-1]} request "
                    "message (protobuf wire format); check the client's stubs",
                )
            ]
        )
    if isinstance(request, Message):
        check_message(request)
