"""Typed errors raised by `sira.Client` and `sira.AsyncClient`.

Every failed RPC surfaces as one subclass of `SiraError`, chosen by the gRPC
status code, carrying what the server put in the status details:
`google.rpc.ErrorInfo` (domain "sira.experiments.v1": `reason` and `metadata`)
and `google.rpc.BadRequest` (field violations). Switch on `reason` (or
`reason_value` against `ErrorReason`), never on the message text.

    SiraError                     .code .reason .message .metadata .violations
    ├── InvalidArgumentError      INVALID_ARGUMENT     bad input; see .violations
    ├── NotFoundError             NOT_FOUND
    ├── AlreadyExistsError        ALREADY_EXISTS
    ├── FailedPreconditionError   FAILED_PRECONDITION  wrong lifecycle state
    ├── UnauthenticatedError      UNAUTHENTICATED      missing/invalid/expired token
    ├── PermissionDeniedError     PERMISSION_DENIED    role not allowed
    ├── UnavailableError          UNAVAILABLE          server unreachable or store down
    ├── ResourceExhaustedError    RESOURCE_EXHAUSTED   rate limited
    ├── DeadlineExceededError     DEADLINE_EXCEEDED
    ├── UnimplementedError        UNIMPLEMENTED
    ├── InternalError             INTERNAL
    └── UnknownError              any other code (the generic fallback)
"""

from __future__ import annotations

from typing import ClassVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

from sira.experiments.v1.error_reason_pb2 import ErrorReason

__all__ = [
    "ERROR_DOMAIN",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "ErrorReason",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SiraError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "from_rpc_error",
]

ERROR_DOMAIN = "sira.experiments.v1"
"""`google.rpc.ErrorInfo.domain` of the reasons this API defines."""

_DETAILS_KEY = "grpc-status-details-bin"


class SiraError(Exception):
    """A failed RPC: status code, machine-readable reason and details."""

    status_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    """The status code this class stands for (instances carry the actual `.code`)."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code if code is not None else self.status_code
        self.reason = reason
        """ErrorInfo reason, an `ErrorReason` name such as
        "ERROR_REASON_EXPERIMENT_NOT_FOUND"; "" when the server sent none."""
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations: list[tuple[str, str]] = list(violations or [])
        """(field, description) pairs from google.rpc.BadRequest."""
        self.retry_after = retry_after
        """Seconds to wait before retrying, from google.rpc.RetryInfo (rate limits)."""

    @property
    def code_name(self) -> str:
        """The status code's name, e.g. "NOT_FOUND"."""
        return str(self.code.name)

    @property
    def reason_value(self) -> int:
        """`reason` as an `ErrorReason` value (UNSPECIFIED when absent or unknown)."""
        try:
            return int(ErrorReason.Value(self.reason))
        except ValueError:
            return int(ErrorReason.ERROR_REASON_UNSPECIFIED)

    def __str__(self) -> str:
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.code_name}{reason}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code_name}, reason={self.reason!r}, {self.message!r})"


class InvalidArgumentError(SiraError):
    status_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(SiraError):
    status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(SiraError):
    status_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(SiraError):
    status_code = grpc.StatusCode.FAILED_PRECONDITION


class UnauthenticatedError(SiraError):
    status_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(SiraError):
    status_code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(SiraError):
    status_code = grpc.StatusCode.UNAVAILABLE


class ResourceExhaustedError(SiraError):
    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(SiraError):
    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnimplementedError(SiraError):
    status_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(SiraError):
    status_code = grpc.StatusCode.INTERNAL


class UnknownError(SiraError):
    """Any status without a dedicated class; `.code` says which."""


_BY_CODE: dict[grpc.StatusCode, type[SiraError]] = {
    cls.status_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        ResourceExhaustedError,
        DeadlineExceededError,
        UnimplementedError,
        InternalError,
    )
}


def error_class(code: grpc.StatusCode) -> type[SiraError]:
    return _BY_CODE.get(code, UnknownError)


def from_rpc_error(error: grpc.RpcError) -> SiraError:
    """Translate a failed call (sync or aio) into its typed `SiraError`."""
    code = _call_code(error)
    message = _call_details(error)
    status = _rich_status(error)
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    if status is not None:
        if not message:
            message = status.message
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                # Reasons of other domains (a proxy, grpc itself) are not ours to name.
                if info.domain == ERROR_DOMAIN and not reason:
                    reason = info.reason
                    metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend((v.field, v.description) for v in bad_request.field_violations)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    cls = error_class(code)
    return cls(
        message or code.name,
        code=code,
        reason=reason,
        metadata=metadata,
        violations=violations,
        retry_after=retry_after,
    )


def _call_code(error: grpc.RpcError) -> grpc.StatusCode:
    code_fn = getattr(error, "code", None)
    code = code_fn() if callable(code_fn) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _call_details(error: grpc.RpcError) -> str:
    details_fn = getattr(error, "details", None)
    details = details_fn() if callable(details_fn) else None
    return details if isinstance(details, str) else ""


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in the trailers, tolerating a code/message mismatch."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        status = None  # code or message differ from the trailer's; read it directly
    except (AttributeError, TypeError):
        return None  # not a grpc.Call (e.g. a bare RpcError)
    if isinstance(status, status_pb2.Status):
        return status
    trailing_fn = getattr(error, "trailing_metadata", None)
    trailers = trailing_fn() if callable(trailing_fn) else None
    for key, value in trailers or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None
