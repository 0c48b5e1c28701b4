"""Turn a `-d` template into request bytes, spending as little CPU per call as possible.

Three encoders, picked once per run:

- static: no placeholder; the request is serialised once and reused.
- spliced: placeholders only in scalar fields of singular (nested) messages. The
  fixed part is serialised once; per call only a small message holding the
  dynamic fields is serialised and appended. Protobuf parses concatenated
  messages as a merge, so `base + dynamic` is the full request.
- rendered: anything else (placeholders in lists, maps, numbers outside strings):
  render the text, parse the JSON, serialise. Correct, just slower.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import descriptor, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from sira_loadtest.config import ConfigError, full_method_name
from sira_loadtest.template import (
    IdFactory,
    RenderContext,
    Template,
    TemplateError,
    compile_template,
    has_placeholders,
)

_FD = descriptor.FieldDescriptor


class Encoder(Protocol):
    def encode(self, ctx: RenderContext) -> bytes: ...


def _load_sira_descriptors() -> None:
    """Register SIRA's messages in the default descriptor pool."""
    from sira.experiments.v1 import (  # noqa: F401
        assignment_service_pb2,
        insights_service_pb2,
        lifecycle_service_pb2,
        tracking_service_pb2,
    )


def request_class(method_path: str) -> type[Message] | None:
    """The request message class of `/pkg.Service/Method`, or None when unknown."""
    _load_sira_descriptors()
    try:
        method = descriptor_pool.Default().FindMethodByName(full_method_name(method_path))
    except KeyError:
        return None
    return message_factory.GetMessageClass(method.input_type)


@dataclass(frozen=True)
class StaticEncoder:
    body: bytes

    def encode(self, ctx: RenderContext) -> bytes:
        return self.body


@dataclass(frozen=True)
class RenderedEncoder:
    template: Template
    message_class: type[Message]

    def encode(self, ctx: RenderContext) -> bytes:
        message = self.message_class()
        json_format.Parse(self.template.render(ctx), message)
        return message.SerializeToString()


@dataclass(frozen=True)
class _DynamicField:
    chain: tuple[str, ...]
    """Singular message fields from the root to the leaf's parent."""
    leaf: str
    template: Template
    convert: Callable[[str], object]


@dataclass(frozen=True)
class SplicedEncoder:
    base: bytes
    message_class: type[Message]
    fields: tuple[_DynamicField, ...]

    def encode(self, ctx: RenderContext) -> bytes:
        message = self.message_class()
        for f in self.fields:
            target: Any = message
            for name in f.chain:
                target = getattr(target, name)
            setattr(target, f.leaf, f.convert(f.template.render(ctx)))
        return self.base + message.SerializeToString()


def _field(desc: Any, key: str) -> descriptor.FieldDescriptor | None:
    found: descriptor.FieldDescriptor | None = desc.fields_by_name.get(key)
    if found is not None:
        return found
    return next((f for f in desc.fields if f.json_name == key), None)


def _converter(field: descriptor.FieldDescriptor) -> Callable[[str], object] | None:
    """How a rendered string becomes the field's value; None when not spliceable."""
    if field.type == _FD.TYPE_STRING:
        return str
    if field.type in (_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT):
        return float
    if field.type == _FD.TYPE_BOOL:
        return lambda text: text.strip().lower() == "true"
    if field.type == _FD.TYPE_ENUM and field.enum_type is not None:
        enum = field.enum_type
        return lambda text: (
            enum.values_by_name[text].number if text in enum.values_by_name else int(text)
        )
    if field.type in (_FD.TYPE_BYTES, _FD.TYPE_MESSAGE, _FD.TYPE_GROUP):
        return None
    return int


def _split(
    obj: dict[str, Any], desc: Any, chain: tuple[str, ...]
) -> tuple[dict[str, Any], list[_DynamicField]] | None:
    """Separate the fixed JSON from the dynamic leaves; None when not spliceable."""
    fixed: dict[str, Any] = {}
    dynamic: list[_DynamicField] = []
    for key, value in obj.items():
        field = _field(desc, key)
        if isinstance(value, str) and has_placeholders(value):
            if field is None or field.is_repeated:
                return None
            convert = _converter(field)
            if convert is None:
                return None
            dynamic.append(_DynamicField(chain, field.name, compile_template(value), convert))
        elif (
            isinstance(value, dict)
            and field is not None
            and field.type == _FD.TYPE_MESSAGE
            and not field.is_repeated
            and field.message_type is not None
            and has_placeholders(json.dumps(value))
        ):
            if field.message_type.full_name.startswith("google.protobuf."):
                return None  # well-known types have their own JSON forms
            inner = _split(value, field.message_type, (*chain, field.name))
            if inner is None:
                return None
            fixed[key], more = inner
            dynamic.extend(more)
        elif has_placeholders(json.dumps(value)):
            return None
        else:
            fixed[key] = value
    return fixed, dynamic


@dataclass(frozen=True)
class RoundRobinEncoder:
    """A JSON array of requests: call number i sends element i mod len (ghz's unary rule)."""

    encoders: tuple[Encoder, ...]

    def encode(self, ctx: RenderContext) -> bytes:
        return self.encoders[ctx.request_number % len(self.encoders)].encode(ctx)


@dataclass(frozen=True)
class RenderedArrayEncoder:
    """An array whose placeholders sit outside strings: render, parse, pick, serialise."""

    template: Template
    message_class: type[Message]

    def encode(self, ctx: RenderContext) -> bytes:
        items = json.loads(self.template.render(ctx))
        message = self.message_class()
        json_format.ParseDict(items[ctx.request_number % len(items)], message)
        return message.SerializeToString()


def _array_encoder(method_path: str, text: str, cls: type[Message] | None) -> Encoder:
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = None
    if isinstance(items, list):
        if not items:
            raise ConfigError("-d/--data: the JSON array is empty")
        if not all(isinstance(item, dict) for item in items):
            raise ConfigError("-d/--data: every element of the JSON array must be an object")
        return RoundRobinEncoder(
            tuple(build_encoder(method_path, json.dumps(item), cls) for item in items)
        )
    if cls is None:
        raise ConfigError(f"unknown method {method_path}: its request type is not known")
    try:
        template = compile_template(text)
    except TemplateError as exc:
        raise ConfigError(f"-d/--data: {exc}") from None
    encoder = RenderedArrayEncoder(template, cls)
    try:
        _probe(encoder)
    except (json.JSONDecodeError, json_format.ParseError, TypeError, KeyError) as exc:
        raise ConfigError(f"-d/--data does not fit {cls.DESCRIPTOR.full_name}: {exc}") from None
    return encoder


def build_encoder(
    method_path: str, data: str, message_class: type[Message] | None = None
) -> Encoder:
    """The cheapest encoder for `data` sent to `method_path`; raises ConfigError.

    `message_class` is the request type when known (from reflection, --proto or
    --protoset); otherwise SIRA's own messages are looked up.
    """
    text = data.strip() or "{}"
    cls = message_class or request_class(method_path)
    if text.startswith("["):
        return _array_encoder(method_path, text, cls)
    try:
        template = compile_template(text)
    except TemplateError as exc:
        raise ConfigError(f"-d/--data: {exc}") from None
    if cls is None:
        if text != "{}":
            raise ConfigError(
                f"unknown method {method_path}: its request type is not known, "
                "so only empty data can be sent"
            )
        return StaticEncoder(b"")
    encoder: Encoder
    try:
        if template.is_static:
            message = cls()
            json_format.Parse(text, message)
            return StaticEncoder(message.SerializeToString())
        encoder = RenderedEncoder(template, cls)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            split = _split(obj, cls.DESCRIPTOR, ())
            if split is not None:
                fixed, dynamic = split
                base = cls()
                json_format.ParseDict(fixed, base)
                encoder = SplicedEncoder(base.SerializeToString(), cls, tuple(dynamic))
        _probe(encoder)
    except (json_format.ParseError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"-d/--data does not fit {cls.DESCRIPTOR.full_name}: {exc}") from None
    return encoder


def _probe(encoder: Encoder) -> None:
    """Render once at build time so a bad template fails before the run, not per call."""
    encoder.encode(RenderContext("probe", random.Random(0), IdFactory("probe-", "x", 0)))
