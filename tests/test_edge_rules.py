"""The edge rules as data: complete, documented in the protos, and cheap to report.

End-to-end behaviour through the real server is in `test_edge_validation.py`.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from sira.experiments.v1 import (
    assignment_service_pb2,
    insights_service_pb2,
    lifecycle_service_pb2,
    tracking_service_pb2,
)
from sira_server.api import edge
from sira_server.api.guards import error_status
from sira_server.config import ConfigError, Settings
from sira_server.domain import limits
from sira_server.errors import FieldViolation, InvalidArgument, NotFound, excerpt
from sira_server.store import page_tokens

PROTO_DIR = Path(__file__).resolve().parents[1] / "protos" / "sira" / "experiments" / "v1"
SERVICE_FILES = (
    assignment_service_pb2,
    insights_service_pb2,
    lifecycle_service_pb2,
    tracking_service_pb2,
)


def _request_types() -> Iterator[Descriptor]:
    for module in SERVICE_FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield method.input_type


def _fields_needing_rules() -> Iterator[tuple[str, type[edge.Text] | type[edge.Count]]]:
    """Every (rule key, rule kind) reachable from a request of the four services."""
    seen: set[str] = set()
    stack = list(_request_types())
    while stack:
        message = stack.pop()
        if message.full_name in seen or message.full_name.startswith("google.protobuf.Struct"):
            continue
        seen.add(message.full_name)
        for field in message.fields:
            name = field.full_name
            if field.type == FieldDescriptor.TYPE_STRING:
                if field.is_repeated:
                    yield name, edge.Count
                    yield f"{name}[]", edge.Text
                elif not message.GetOptions().map_entry or field.name == "key":
                    yield name, edge.Text
                else:
                    yield name, edge.Text  # a map's string value
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                assert field.message_type is not None
                if field.is_repeated:
                    yield name, edge.Count
                if field.message_type.full_name not in ("google.protobuf.Timestamp",):
                    stack.append(field.message_type)


def test_every_request_field_has_its_own_rule() -> None:
    missing = [
        (name, kind.__name__)
        for name, kind in _fields_needing_rules()
        if not isinstance(edge.FIELD_RULES.get(name), kind)
    ]
    assert missing == []


def test_no_rule_names_a_field_that_does_not_exist() -> None:
    known = {name for name, _ in _fields_needing_rules()}
    assert sorted(set(edge.FIELD_RULES) - known) == []


def _message_bodies() -> dict[str, str]:
    """Proto message name -> its source text (comments included)."""
    bodies: dict[str, str] = {}
    for path in PROTO_DIR.glob("*.proto"):
        text = path.read_text()
        for match in re.finditer(r"^message (\w+) \{\n(.*?)^\}", text, re.S | re.M):
            bodies[match.group(1)] = match.group(2)
    return bodies


def test_the_limits_are_written_in_the_proto_comments() -> None:
    bodies = _message_bodies()
    undocumented = []
    for name, rule in edge.FIELD_RULES.items():
        if not name.startswith("sira.experiments.v1.") or rule is edge.FIELD_RULES.get(
            "sira.experiments.v1.Experiment.created_by"
        ):
            continue  # google.protobuf types; output-only strings (ignored on input)
        message = name.split(".")[3]
        limit = rule.max_chars if isinstance(rule, edge.Text) else rule.max_items
        if message.endswith("Entry") or message not in bodies:
            continue  # map entries: documented with their map field
        if str(limit) not in bodies[message]:
            undocumented.append((name, limit))
    assert undocumented == []


# --- text rules ------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f", "\x85", "\x9f", "\n", "\t"])
def test_control_characters_are_refused(char: str) -> None:
    assert edge.text_problem(f"a{char}b", edge.Text(10)) is not None


@pytest.mark.parametrize("char", ["\n", "\t", "\r"])
def test_free_text_keeps_whitespace_but_not_nul(char: str) -> None:
    free = edge.Text(10, multiline=True)
    assert edge.text_problem(f"a{char}b", free) is None
    assert edge.text_problem("a\x00b", free) is not None


def test_printable_unicode_passes_and_length_counts_characters() -> None:
    assert edge.text_problem("é✓ Ω\u00a0" * 2, edge.Text(10)) is None
    assert edge.text_problem("é" * 11, edge.Text(10)) == "must be at most 10 characters, got 11"


def test_excerpt_quotes_at_most_a_hundred_characters() -> None:
    assert excerpt("a\x00b") == "a\\x00b"
    cut = excerpt("x" * 10_000)
    assert cut == "x" * 100 + "..."


# --- errors stay small -----------------------------------------------------------------------


def test_an_error_status_is_small_whatever_it_holds() -> None:
    huge = "Ω" * 100_000
    err = InvalidArgument.from_violations(
        [FieldViolation(f"field{i}{huge}", huge) for i in range(5_000)]
    )
    err.metadata = {f"k{i}": huge for i in range(100)}
    status = error_status(err)
    size = len(status.details.encode()) + sum(len(k) + len(v) for k, v in status.trailing_metadata)
    assert size < 8 * 1024
    (details_bin,) = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    bad = error_details_pb2.BadRequest()
    assert status_pb2.Status.FromString(details_bin).details[1].Unpack(bad)
    assert len(bad.field_violations) == limits.MAX_ERROR_VIOLATIONS
    assert status.details.endswith("(5000 field violations in all)")


def test_a_plain_error_keeps_its_words() -> None:
    status = error_status(NotFound("experiment 'k' not found", metadata={"experiment": "k"}))
    assert status.details == "experiment 'k' not found"


# --- undecodable bytes ---------------------------------------------------------------------------


def test_undecodable_bytes_become_a_marker_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    edge._undecodable_log = edge._Throttle(3600.0)
    parse = edge.guard_deserializer(
        tracking_service_pb2.TrackRequest.FromString, "/sira.experiments.v1.TrackingService/Track"
    )
    with caplog.at_level(logging.WARNING, logger="sira_server.api"):
        results = [parse(b"\xff\xff\xff") for _ in range(50)]
    assert all(isinstance(r, edge.Undecodable) for r in results)
    assert len(caplog.records) == 1
    assert "Traceback" not in caplog.text
    with pytest.raises(InvalidArgument) as caught:
        edge.check_request(results[0])
    assert caught.value.violations[0].field == "request"
    valid = tracking_service_pb2.TrackRequest().SerializeToString()
    assert isinstance(parse(valid), tracking_service_pb2.TrackRequest)


# --- page tokens ---------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


AUDIT = {"i": page_tokens.is_row_id}


def test_page_tokens_round_trip() -> None:
    token = page_tokens.encode("audit:", {"i": 42})
    assert page_tokens.decode(token, "audit:", AUDIT) == {"i": 42}
    with pytest.raises(InvalidArgument):
        page_tokens.decode(token, "audit:other", AUDIT)


@pytest.mark.parametrize(
    "token",
    [
        _b64(json.dumps({"q": "audit:", "i": 2**63}).encode()),
        _b64(json.dumps({"q": "audit:", "i": 0}).encode()),
        _b64(json.dumps({"q": "audit:", "i": 1.5}).encode()),
        _b64(json.dumps({"q": "audit:", "i": "7"}).encode()),
        _b64(json.dumps({"q": "audit:"}).encode()),
        _b64(json.dumps(["audit:", 7]).encode()),
        _b64(b"[" * 180),
        _b64(b"\x00\x01"),
        "abc=",
        "a" * (limits.MAX_PAGE_TOKEN_CHARS + 1),
    ],
)
def test_forged_page_tokens_are_invalid_page_token(token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        page_tokens.decode(token, "audit:", AUDIT)
    assert caught.value.reason == "ERROR_REASON_INVALID_PAGE_TOKEN"


# --- the setting ---------------------------------------------------------------------------------


def test_max_event_value_setting() -> None:
    assert Settings.from_env({}).limits.max_event_value == limits.DEFAULT_MAX_EVENT_VALUE
    assert Settings.from_env({"SIRA_MAX_EVENT_VALUE": "5000"}).limits.max_event_value == 5000
    for bad in ("0", "-1", "inf", "nan", "lots"):
        with pytest.raises(ConfigError, match="SIRA_MAX_EVENT_VALUE"):
            Settings.from_env({"SIRA_MAX_EVENT_VALUE": bad})


# --- checks behind the edge ---------------------------------------------------------------------


def test_track_patterns_match_whole_values_as_the_schema_does() -> None:
    """Python's ``$`` accepts a trailing new line that Postgres's CHECK refuses."""
    from sira_server.api.tracking import validate_event

    for fields, field in (
        ({"currency": "XOF\n", "value": 1.0}, "event.currency"),
        ({"event_type": tracking_service_pb2.EVENT_TYPE_CUSTOM, "custom_event_name": "x\n"}, None),
    ):
        base: dict[str, object] = {
            "experiment": "k",
            "subject_id": "s",
            "variant_id": "v",
            "event_type": tracking_service_pb2.EVENT_TYPE_CONVERSION,
        }
        event = tracking_service_pb2.TrackedEvent(**{**base, **fields})  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument) as caught:
            validate_event(event, 1_700_000_000_000)
        named = [v.field for v in caught.value.violations]
        assert named == [field or "event.custom_event_name"]


def test_values_without_a_kind_and_bad_timestamps_are_reported() -> None:
    request = lifecycle_service_pb2.CreateExperimentRequest()
    variant = request.experiment.variants.add(name="a")
    variant.config.fields["empty"].Clear()
    variant.config.fields["list"].list_value.values.add()
    request.experiment.variants[0].drop_time.nanos = -1
    fields = {v.field for v in edge.message_violations(request)}
    assert fields == {
        "experiment.variants[0].config.empty",
        "experiment.variants[0].config.list[0]",
        "experiment.variants[0].drop_time",
    }


def test_targeting_and_context_are_bounded_in_bytes() -> None:
    from sira_server.api.assignment import profile_from_context
    from sira_server.domain.validation import ExperimentInput, VariantInput, validate_experiment

    values = [f"{i:03d}" + "v" * 200 for i in range(limits.MAX_TARGETING_ATTRIBUTE_VALUES)]
    targeting = {"attributes": {"plan": values}}
    with pytest.raises(InvalidArgument) as caught:
        validate_experiment(
            ExperimentInput(
                name="n",
                targeting=targeting,
                variants=[VariantInput(name="a"), VariantInput(name="b")],
            )
        )
    assert [v.field for v in caught.value.violations] == ["experiment.targeting"]

    context = assignment_service_pb2.SubjectContext(
        attributes={f"a{i}": "v" * 256 for i in range(40)}
    )
    with pytest.raises(InvalidArgument) as caught:
        profile_from_context(context)
    assert [v.field for v in caught.value.violations] == ["context"]
    assert edge.message_violations(context) == []  # each entry alone is fine
