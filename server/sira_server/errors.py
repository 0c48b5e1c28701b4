"""Domain errors: what went wrong, in terms a caller can act on.

Servicers and the domain raise these; one guard
(`sira_server.api.guards.ErrorGuard`) turns them into a gRPC status
with `google.rpc.ErrorInfo` (and `BadRequest` for field violations). Nothing
else catches exceptions.

    SiraError
    ├── InvalidArgument      INVALID_ARGUMENT     bad input; field violations
    ├── NotFound             NOT_FOUND
    ├── AlreadyExists        ALREADY_EXISTS
    ├── FailedPrecondition   FAILED_PRECONDITION  wrong lifecycle state, ...
    ├── Unauthenticated      UNAUTHENTICATED      missing/invalid/expired token
    ├── PermissionDenied     PERMISSION_DENIED    role not allowed
    ├── Unavailable          UNAVAILABLE          store down; retry
    └── ResourceExhausted    RESOURCE_EXHAUSTED   rate limited
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sira_server.domain.limits import MAX_QUOTED_CHARS

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def excerpt(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """``text`` as an error may quote it: control characters escaped (``\\x00``), at most
    ``limit`` characters of the input, a trailing "..." when cut."""
    cut = text[:limit]
    shown = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", cut)
    return shown + ("..." if len(text) > limit else "")


@dataclass(frozen=True)
class FieldViolation:
    field: str
    """Path of the offending field, e.g. ``experiment.variants[1].weight``."""
    description: str
    """What is wrong and what would be accepted."""


class SiraError(Exception):
    """Base of every error the API reports on purpose."""

    status_name: str = "UNKNOWN"
    """Name of the grpc.StatusCode member."""
    default_reason: str = "ERROR_REASON_UNSPECIFIED"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        violations: list[FieldViolation] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.violations = list(violations or [])


class InvalidArgument(SiraError):
    status_name = "INVALID_ARGUMENT"
    default_reason = "ERROR_REASON_INVALID_ARGUMENT"

    @classmethod
    def from_violations(cls, violations: list[FieldViolation]) -> InvalidArgument:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
        more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
        return cls(f"invalid request: {summary}{more}", violations=violations)


class NotFound(SiraError):
    status_name = "NOT_FOUND"
    default_reason = "ERROR_REASON_EXPERIMENT_NOT_FOUND"


class AlreadyExists(SiraError):
    status_name = "ALREADY_EXISTS"
    default_reason = "ERROR_REASON_EXPERIMENT_KEY_EXISTS"


class FailedPrecondition(SiraError):
    status_name = "FAILED_PRECONDITION"
    default_reason = "ERROR_REASON_INVALID_EXPERIMENT_STATE"


class Unauthenticated(SiraError):
    status_name = "UNAUTHENTICATED"
    default_reason = "ERROR_REASON_TOKEN_INVALID"


class PermissionDenied(SiraError):
    status_name = "PERMISSION_DENIED"
    default_reason = "ERROR_REASON_ROLE_NOT_ALLOWED"


class Unavailable(SiraError):
    status_name = "UNAVAILABLE"
    default_reason = "ERROR_REASON_STORE_UNAVAILABLE"


class ResourceExhausted(SiraError):
    status_name = "RESOURCE_EXHAUSTED"
    default_reason = "ERROR_REASON_RATE_LIMITED"

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_seconds = retry_after_seconds
        """Sent as google.rpc.RetryInfo: when a retry may succeed."""
