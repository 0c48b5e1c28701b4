"""Page tokens: opaque to callers, strictly checked when they come back.

A token is URL-safe base64 (no padding) of a compact JSON object that names the query
it belongs to (``q``) and the position the next page starts after. `decode` accepts only
what `encode` produces: at most `MAX_PAGE_TOKEN_CHARS` characters of the base64url
alphabet, a flat JSON object with exactly the expected keys, each value of the expected
type and range. Anything else (forged, truncated, from another query, a number too big
for the column) is INVALID_ARGUMENT with reason INVALID_PAGE_TOKEN, so no token ever
reaches Postgres as a value it would reject.

Tokens are not signed: a caller who edits one can only move its own cursor within a
listing it may read in full anyway; what matters is that no token crashes a call.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from sira_server.domain.limits import MAX_INT64, MAX_PAGE_TOKEN_CHARS
from sira_server.errors import FieldViolation, InvalidArgument

__all__ = ["bad_token", "decode", "encode", "is_row_id", "is_uuid_text", "micros_in_range"]

_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")
_UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MAX_MICROS = 253_402_300_799 * 1_000_000
"""9999-12-31T23:59:59Z in microseconds since the epoch (Postgres timestamps go further)."""

Check = Callable[[object], bool]


def encode(query: str, position: Mapping[str, int | str]) -> str:
    raw = json.dumps({"q": query, **position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, query: str, fields: Mapping[str, Check]) -> dict[str, Any]:
    """The position in ``token``: its keys are exactly ``fields``, each value passing its
    check. Raises `bad_token()` for anything else."""
    if len(token) > MAX_PAGE_TOKEN_CHARS or _ALPHABET.fullmatch(token) is None:
        raise bad_token()
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        raise bad_token() from None
    if (
        not isinstance(data, dict)
        or data.keys() != {"q", *fields}
        or data["q"] != query
        or not all(check(data[name]) for name, check in fields.items())
    ):
        raise bad_token()
    return {name: data[name] for name in fields}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_row_id(value: object) -> bool:
    """A bigint identity value: 1..2**63-1."""
    return _is_int(value) and 1 <= value <= MAX_INT64  # type: ignore[operator]


def micros_in_range(value: object) -> bool:
    """Microseconds since the epoch, up to the year 9999."""
    return _is_int(value) and 0 <= value <= _MAX_MICROS  # type: ignore[operator]


def is_uuid_text(value: object) -> bool:
    """A UUID as Postgres writes it (lower-case, hyphenated)."""
    return isinstance(value, str) and _UUID_TEXT.fullmatch(value) is not None


def bad_token() -> InvalidArgument:
    return InvalidArgument(
        "page_token is malformed or belongs to another query; "
        "pass the next_page_token of the previous page with the same filter",
        reason="ERROR_REASON_INVALID_PAGE_TOKEN",
        violations=[FieldViolation("page_token", "not a token of this query")],
    )
