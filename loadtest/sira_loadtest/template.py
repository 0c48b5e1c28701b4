"""ghz-style `-d` data templates, compiled once and rendered per call.

A template is text with `{{ ... }}` placeholders, usually inside JSON strings:

    {{.RequestNumber}}         call number, unique across workers (0, 1, 2, ...)
    {{.WorkerID}}              the in-flight slot making the call ("w0c3": process 0, slot 3)
    {{.UUID}} / {{newUUID}}    a random UUID4
    {{.TimestampUnix}}         seconds since the epoch (also ...UnixMilli, ...UnixNano)
    {{randomInt A B}}          a random integer in [A, B)
    {{randomString N}}         N random letters and digits
    {{subject:new}}            a subject id never used before (new subject)
    {{subject:returning N}}    one of N fixed subject ids, uniformly (returning subject)
    {{subject:mix P N}}        returning (of N) with probability P %, else new
    {{event:new}}              a fresh unique id, for Track's client_event_id

Returning ids are `<prefix>ret-<i>` for i in [0, N): the same in every run, so a
run can pre-assign them. New subject and event ids embed a random run token.
"""

from __future__ import annotations

import random
import re
import string
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count

_PLACEHOLDER = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_ALPHABET = string.ascii_letters + string.digits


class TemplateError(ValueError):
    """A placeholder is unknown or malformed."""


def returning_subject_id(prefix: str, index: int) -> str:
    """Id of returning subject number `index`; stable across runs."""
    return f"{prefix}ret-{index}"


@dataclass
class IdFactory:
    """Makes up subject and event ids that no other worker or run makes."""

    prefix: str
    run_token: str
    process: int
    _seq: count[int] = field(default_factory=count)

    def new_subject(self) -> str:
        return f"{self.prefix}new-{self.run_token}-{self.process}-{next(self._seq)}"

    def returning_subject(self, index: int) -> str:
        return returning_subject_id(self.prefix, index)

    def new_event(self) -> str:
        return f"{self.prefix}ev-{self.run_token}-{self.process}-{next(self._seq)}"


@dataclass
class RenderContext:
    """Per-slot state a template reads; `request_number` changes every call."""

    worker_id: str
    rng: random.Random
    ids: IdFactory
    request_number: int = 0


Part = str | Callable[[RenderContext], str]


def _ints(expr: str, args: list[str], n: int) -> list[int]:
    if len(args) != n:
        raise TemplateError(f"{{{{{expr}}}}}: expected {n} integer argument(s)")
    try:
        return [int(a) for a in args]
    except ValueError:
        raise TemplateError(f"{{{{{expr}}}}}: arguments must be integers") from None


def _compile_expr(expr: str) -> Callable[[RenderContext], str]:
    """One placeholder body -> a function of the context."""
    head, *args = expr.split()
    if head == ".RequestNumber" and not args:
        return lambda ctx: str(ctx.request_number)
    if head == ".WorkerID" and not args:
        return lambda ctx: ctx.worker_id
    if head in (".UUID", "newUUID") and not args:
        return lambda ctx: str(uuid.uuid4())
    if head == ".TimestampUnix" and not args:
        return lambda ctx: str(int(time.time()))
    if head == ".TimestampUnixMilli" and not args:
        return lambda ctx: str(time.time_ns() // 1_000_000)
    if head == ".TimestampUnixNano" and not args:
        return lambda ctx: str(time.time_ns())
    if head == "randomInt":
        low, high = _ints(expr, args, 2)
        if high <= low:
            raise TemplateError(f"{{{{{expr}}}}}: needs A < B")
        return lambda ctx: str(ctx.rng.randrange(low, high))
    if head == "randomString":
        (length,) = _ints(expr, args, 1)
        return lambda ctx: "".join(ctx.rng.choices(_ALPHABET, k=length))
    if head == "subject:new" and not args:
        return lambda ctx: ctx.ids.new_subject()
    if head == "subject:returning":
        (pool,) = _ints(expr, args, 1)
        if pool < 1:
            raise TemplateError(f"{{{{{expr}}}}}: N must be >= 1")
        return lambda ctx: ctx.ids.returning_subject(ctx.rng.randrange(pool))
    if head == "subject:mix":
        percent, pool = _ints(expr, args, 2)
        if not 0 <= percent <= 100 or pool < 1:
            raise TemplateError(f"{{{{{expr}}}}}: needs 0 <= P <= 100 and N >= 1")
        share = percent / 100.0
        return lambda ctx: (
            ctx.ids.returning_subject(ctx.rng.randrange(pool))
            if ctx.rng.random() < share
            else ctx.ids.new_subject()
        )
    if head == "event:new" and not args:
        return lambda ctx: ctx.ids.new_event()
    raise TemplateError(f"unknown template placeholder {{{{{expr}}}}}")


@dataclass(frozen=True)
class Template:
    """A compiled template: literal text and placeholder functions, in order."""

    parts: tuple[Part, ...]

    @property
    def is_static(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    def render(self, ctx: RenderContext) -> str:
        return "".join(p if isinstance(p, str) else p(ctx) for p in self.parts)


def compile_template(text: str) -> Template:
    """Parse `text` once; raises `TemplateError` for unknown placeholders."""
    parts: list[Part] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(text):
        if match.start() > pos:
            parts.append(text[pos : match.start()])
        parts.append(_compile_expr(match.group(1)))
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    return Template(tuple(parts))


def has_placeholders(text: str) -> bool:
    return _PLACEHOLDER.search(text) is not None


@dataclass(frozen=True)
class MetadataTemplate:
    """Request metadata whose values may hold placeholders (ghz renders metadata too)."""

    pairs: tuple[tuple[str, Template], ...]
    static: tuple[tuple[str, str], ...] | None
    """The metadata itself when no value has a placeholder."""

    def render(self, ctx: RenderContext) -> tuple[tuple[str, str], ...]:
        if self.static is not None:
            return self.static
        return tuple((key, value.render(ctx)) for key, value in self.pairs)


def compile_metadata(pairs: tuple[tuple[str, str], ...]) -> MetadataTemplate:
    """Compile metadata values once; raises `TemplateError` for unknown placeholders."""
    compiled = tuple((key, compile_template(value)) for key, value in pairs)
    static = all(t.is_static for _, t in compiled)
    return MetadataTemplate(compiled, pairs if static else None)
