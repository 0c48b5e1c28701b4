"""Rules for text fields: a maximum length and no control characters.

Control characters are Unicode category Cc (U+0000-U+001F, U+007F-U+009F): Postgres
rejects NUL outright, and the others have no business in identifiers, names or keys.
Free text (``multiline``) keeps tab, line feed and carriage return.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Text", "text_problem"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_WHITESPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class Text:
    """A string field: at most ``max_chars`` characters, no control characters (tab,
    line feed and carriage return too when ``multiline``)."""

    max_chars: int
    multiline: bool = False


def text_problem(value: str, rule: Text) -> str | None:
    """What is wrong with ``value`` under ``rule``, or None. Never quotes the value."""
    if len(value) > rule.max_chars:
        return f"must be at most {rule.max_chars} characters, got {len(value)}"
    if value.isprintable():  # fast path (C): no Cc character in it
        return None
    found = (_CONTROL_BUT_WHITESPACE if rule.multiline else _CONTROL).search(value)
    if found is not None:
        allowed = " (tab and new lines are allowed)" if rule.multiline else ""
        return (
            f"must not contain control characters: U+{ord(found.group()):04X} at "
            f"position {found.start()}{allowed}"
        )
    return None
