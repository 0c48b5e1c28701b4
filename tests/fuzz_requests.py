"""Hypothesis strategies for every request of every SIRA RPC, derived from the descriptors.

`request_strategy(method, pools)` walks the request message's fields
recursively: scalars of every width, enums (known and unknown numbers),
repeated fields, maps, nested messages, oneofs, proto3 `optional`, and the
well-known google.protobuf.Struct / Timestamp (which are messages like any
other: Struct is a map of Value, whose oneof holds NaN, huge lists and
nested structs). Nothing is listed by hand, so a field added to a proto is
fuzzed the day it exists.

Strings lean hostile (NUL, control and bidi characters, lone combining
marks, huge and near-limit lengths) and also draw from `pools`, values of
the seeded world keyed by field name (real experiment keys, variant ids,
subject ids), so requests reach past "not found" into the stores.

`mutated_bytes` flips, truncates, splices and extends valid serialized
requests, for a raw bytes channel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from sira.experiments.v1 import (
    assignment_service_pb2,
    insights_service_pb2,
    lifecycle_service_pb2,
    tracking_service_pb2,
)

MAX_DEPTH = 5
"""Nested messages deeper than this are left unset (Struct recursion ends)."""
MAX_REPEATED = 6

FILES = (
    lifecycle_service_pb2.DESCRIPTOR,
    assignment_service_pb2.DESCRIPTOR,
    tracking_service_pb2.DESCRIPTOR,
    insights_service_pb2.DESCRIPTOR,
)


@dataclass(frozen=True)
class Rpc:
    """One RPC of the public API, as the fuzzer sees it."""

    path: str
    """`/package.Service/Method`, what a channel calls."""
    method: MethodDescriptor

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)


def all_rpcs() -> list[Rpc]:
    """Every RPC of the four services, from the file descriptors."""
    rpcs = []
    for file in FILES:
        for service in file.services_by_name.values():
            for method in service.methods:
                rpcs.append(Rpc(f"/{service.full_name}/{method.name}", method))
    return rpcs


# --- hostile values ------------------------------------------------------------------

HOSTILE_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "exp\x00",
    "\x01\x02\x1f",
    "\x7f",
    "\t\n\r",
    "\u0085\u2028\u2029",
    "\u202e\u202d",  # bidi overrides
    "\ufeff",
    "\u0301",  # a lone combining mark
    "\U0001f600" * 3,
    "é" * 65,
    "Ω≈ç√∫",
    "%s%n%x",
    "'; DROP TABLE experiments; --",
    '{"a":1}',
    "../../etc/passwd",
    "\\u0000",
    "null",
    "NaN",
    "-Infinity",
    "a" * 63,
    "a" * 64,
    "a" * 65,
    "a" * 100,
    "a" * 101,
    "a" * 128,
    "a" * 129,
    "a" * 200,
    "a" * 201,
    "a" * 256,
    "a" * 257,
    "a" * 1000,
    "x" * 20_000,
    "\x00" * 5000,
)

HOSTILE_FLOATS: tuple[float, ...] = (
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    100.0,
    100.0000001,
    1e308,
    -1e308,
    5e-324,
    1.7976931348623157e308,
    2.0**53,
)

INT_BOUNDS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

TIMESTAMP = "google.protobuf.Timestamp"
TIMESTAMP_MIN, TIMESTAMP_MAX = -62_135_596_800, 253_402_300_799
"""0001-01-01 and 9999-12-31: what a valid Timestamp can hold."""


def _strings(pool: Sequence[str]) -> st.SearchStrategy[str]:
    choices: list[st.SearchStrategy[str]] = [
        st.sampled_from(HOSTILE_STRINGS),
        st.text(max_size=24),
        st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=300),
    ]
    if pool:
        # Realistic values twice: most requests should get past "not found".
        choices = [st.sampled_from(pool), st.sampled_from(pool), *choices]
    return st.one_of(choices)


def _integers(kind: int) -> st.SearchStrategy[int]:
    low, high = INT_BOUNDS[kind]
    edges = sorted({low, high, 0, 1, -1 if low < 0 else 2, 50, 1000, 1001, 90, 100})
    return st.one_of(
        st.sampled_from([e for e in edges if low <= e <= high]),
        st.integers(-5, 1100).filter(lambda n: low <= n <= high),
        st.integers(low, high),
    )


def _floats(width: int) -> st.SearchStrategy[float]:
    return st.one_of(
        st.sampled_from(HOSTILE_FLOATS if width == 64 else (math.nan, math.inf, 0.0, 1.5)),
        st.floats(width=width, allow_nan=True, allow_infinity=True),
        st.floats(0.0, 1.0),
        st.floats(0.0, 100.0),
    )


# --- messages ------------------------------------------------------------------------


def _real_oneofs(descriptor: Descriptor) -> list[list[FieldDescriptor]]:
    """Oneof groups, without the synthetic one proto3 `optional` makes per field."""
    groups = []
    for oneof in descriptor.oneofs:
        fields = list(oneof.fields)
        synthetic = len(fields) == 1 and oneof.name == f"_{fields[0].name}"
        if not synthetic:
            groups.append(fields)
    return groups


HOSTILITY = (0, 10, 50, 100)
"""Percent of fields given hostile values, drawn per request: mostly sane requests with
one bad field reach the deep paths; wholly hostile ones test the edge."""

SANE_STRINGS = st.from_regex(r"\A[a-z][a-z0-9_-]{0,11}\Z")


class _Builder:
    def __init__(self, draw: st.DrawFn, pools: Mapping[str, Sequence[Any]], hostility: int) -> None:
        self.draw = draw
        self.pools = pools
        self.hostility = hostility

    def scalar(self, field: FieldDescriptor, depth: int) -> Any:
        if self.draw(st.integers(0, 99)) >= self.hostility:
            return self.sane(field)
        return self.hostile(field)

    def sane(self, field: FieldDescriptor) -> Any:
        kind = field.type
        wanted = str if kind == FieldDescriptor.TYPE_STRING else (int, float)
        pool = [v for v in self.pools.get(field.name, ()) if isinstance(v, wanted)]
        if kind in INT_BOUNDS or kind == FieldDescriptor.TYPE_ENUM:
            pool = [v for v in pool if isinstance(v, int)]
        if pool and kind != FieldDescriptor.TYPE_BOOL:
            return self.draw(st.sampled_from(pool))
        if kind == FieldDescriptor.TYPE_STRING:
            return self.draw(SANE_STRINGS)
        if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return self.draw(st.floats(0.0, 100.0))
        if kind == FieldDescriptor.TYPE_ENUM:
            known = [v.number for v in field.enum_type.values if v.number]
            return self.draw(st.sampled_from(known or [0]))
        if kind in INT_BOUNDS:
            return self.draw(st.integers(1, 100))
        return self.hostile(field)

    def hostile(self, field: FieldDescriptor) -> Any:
        kind = field.type
        if kind == FieldDescriptor.TYPE_STRING:
            pool = [v for v in self.pools.get(field.name, ()) if isinstance(v, str)]
            return self.draw(_strings(pool))
        if kind == FieldDescriptor.TYPE_BYTES:
            return self.draw(st.binary(max_size=64))
        if kind == FieldDescriptor.TYPE_BOOL:
            return self.draw(st.booleans())
        if kind == FieldDescriptor.TYPE_DOUBLE:
            return self.draw(_floats(64))
        if kind == FieldDescriptor.TYPE_FLOAT:
            return self.draw(_floats(32))
        if kind == FieldDescriptor.TYPE_ENUM:
            known = [v.number for v in field.enum_type.values]
            return self.draw(st.one_of(st.sampled_from(known), st.integers(-3, 1000)))
        if kind in INT_BOUNDS:
            return self.draw(_integers(kind))
        raise AssertionError(f"unhandled field type {kind} of {field.full_name}")

    def fill(self, message: Message, depth: int) -> None:
        descriptor = message.DESCRIPTOR
        if descriptor.full_name == TIMESTAMP and self.draw(st.integers(0, 99)) >= self.hostility:
            # Mostly valid times, so the rest of the request is what gets tested.
            message.seconds = self.draw(st.integers(1_600_000_000, 1_900_000_000))  # type: ignore[attr-defined]
            message.nanos = self.draw(st.integers(0, 999_999_999))  # type: ignore[attr-defined]
            return
        in_oneof = set()
        for group in _real_oneofs(descriptor):
            in_oneof.update(f.name for f in group)
            chosen = self.draw(st.sampled_from([None, *group]))
            if chosen is not None:
                self.set_field(message, chosen, depth)
        for field in descriptor.fields:
            if field.name in in_oneof:
                continue
            # Realistic pool fields are set more often: they open the deeper paths.
            chance = 9 if self.hostility == 0 or field.name in self.pools else 5
            if self.draw(st.integers(0, 9)) < chance:
                self.set_field(message, field, depth)

    def set_field(self, message: Message, field: FieldDescriptor, depth: int) -> None:
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if is_message and depth >= MAX_DEPTH:
            return
        target = getattr(message, field.name)
        if field.is_repeated:
            count = self.draw(st.integers(0, MAX_REPEATED))
            if is_message and field.message_type.GetOptions().map_entry:
                key_field = field.message_type.fields_by_name["key"]
                value_field = field.message_type.fields_by_name["value"]
                for _ in range(count):
                    key = self.scalar(key_field, depth)
                    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                        self.fill(target[key], depth + 1)
                    else:
                        target[key] = self.scalar(value_field, depth)
            elif is_message:
                for _ in range(count):
                    self.fill(target.add(), depth + 1)
            else:
                target.extend(self.scalar(field, depth) for _ in range(count))
        elif is_message:
            child = getattr(message, field.name)
            child.SetInParent()
            self.fill(child, depth + 1)
        else:
            setattr(message, field.name, self.scalar(field, depth))


def request_strategy(rpc: Rpc, pools: Mapping[str, Sequence[Any]]) -> st.SearchStrategy[Message]:
    """Requests of `rpc`, every field reachable, hostile and realistic values mixed."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = rpc.request_class()
        _Builder(draw, pools, draw(st.sampled_from(HOSTILITY))).fill(message, 0)
        return message

    return build()


# --- raw bytes -----------------------------------------------------------------------


@st.composite
def mutated_bytes(draw: st.DrawFn, valid: bytes) -> bytes:
    """A valid serialized request, damaged: flips, truncation, splices, junk tags."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "junk", "varint"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "junk":
            data += draw(
                st.sampled_from(
                    [
                        b"\xff\xff\xff\xff\x0f",  # an over-long varint
                        b"\x0a\xff\xff\xff\xff\x07",  # a length far past the end
                        b"\x0a\x02\xc3\x28",  # a string field holding invalid UTF-8
                        b"\x0f",  # a group start tag (deprecated wire type)
                        b"\x7a\x00",
                    ]
                )
            )
        elif op == "varint" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = 0x80 | data[i]
    return bytes(data)


def scalars_in(message: Message, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every scalar value of a message with its field path (map keys included), recursively.

    Paths name fields, not positions: `experiment.variants.config.fields[key]`."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            for item in value if field.is_repeated else [value]:
                yield path, item
        elif field.is_repeated and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                yield f"{path}[key]", key
                if isinstance(item, Message):
                    yield from scalars_in(item, f"{path}.")
                else:
                    yield path, item
        elif field.is_repeated:
            for item in value:
                yield from scalars_in(item, f"{path}.")
        else:
            yield from scalars_in(value, f"{path}.")
