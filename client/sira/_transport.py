"""What `Client` and `AsyncClient` share around sending a `Call`.

The constructor, stubs, token metadata, deadlines, the retry policy and the
retry decision. Only sending and sleeping are left to the two clients, which
turn the request builders of `sira._requests` into methods with `as_method`.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from sira.errors import SiraError, from_rpc_error
from sira.experiments.v1 import (
    assignment_service_pb2_grpc,
    insights_service_pb2_grpc,
    lifecycle_service_pb2_grpc,
    tracking_service_pb2_grpc,
)

if TYPE_CHECKING:
    from sira._requests import Call

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_TIMEOUT",
    "Attempts",
    "ClientBase",
    "RetryPolicy",
    "Settings",
    "Stubs",
    "as_method",
]

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_TIMEOUT = 5.0
_USER_AGENT = "sira-python"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class RetryPolicy:
    """How UNAVAILABLE is retried (see `sira.client` for which calls); calls shed by a
    server limit (RESOURCE_EXHAUSTED with a RetryInfo up to `max_backoff`) are retried
    after the delay the server asks for."""

    attempts: int = 3
    """Total attempts, the first included; 1 disables retries."""
    initial_backoff: float = 0.1
    """Upper bound of the first pause, in seconds."""
    max_backoff: float = 2.0
    """Upper bound of any pause, in seconds."""
    multiplier: float = 2.0
    """Growth of the bound from one pause to the next."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")

    def backoff(self, retry: int) -> float:
        """Pause before retry number `retry` (1-based): full jitter under the bound."""
        bound = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return random.uniform(0.0, bound)


def _shed(error: SiraError) -> bool:
    """Refused by a server limit before any work: any call may be retried after the
    RetryInfo delay."""
    return (
        error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        and error.reason == "ERROR_REASON_RATE_LIMITED"
        and error.retry_after is not None
    )


def _retryable(error: SiraError, idempotent: bool) -> bool:
    if error.code != grpc.StatusCode.UNAVAILABLE:
        return False
    # STORE_UNAVAILABLE: the server answered, and its transaction was not committed.
    return idempotent or error.reason == "ERROR_REASON_STORE_UNAVAILABLE"


class Attempts:
    """The attempts at one Call: after each failure, retry (after a pause) or raise."""

    def __init__(self, call: Call[Any], retry: RetryPolicy) -> None:
        self._idempotent = call.idempotent
        self._retry = retry
        self._attempt = 1

    def failed(self, exc: grpc.RpcError) -> float:
        """The pause before the next attempt; raises the typed error when there is none."""
        error = from_rpc_error(exc)
        if self._attempt >= self._retry.attempts:
            raise error from None
        if _shed(error):
            # A short wait (load shed) is waited out; a long one (rate) is the caller's.
            assert error.retry_after is not None
            if error.retry_after > self._retry.max_backoff:
                raise error from None
            self._attempt += 1
            return error.retry_after
        if not _retryable(error, self._idempotent):
            raise error from None
        pause = self._retry.backoff(self._attempt)
        self._attempt += 1
        return pause


class Stubs:
    """The four service stubs over one channel (sync or grpc.aio)."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        self.lifecycle = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
        self.assignment = assignment_service_pb2_grpc.AssignmentServiceStub(channel)
        self.tracking = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        self.insights = insights_service_pb2_grpc.InsightsServiceStub(channel)


class Settings:
    """What both clients keep besides their channel."""

    def __init__(self, token: str | None, timeout: float, retry: RetryPolicy | None) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.token = token
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    def options(self, call: Call[Any]) -> dict[str, Any]:
        """Keyword arguments of the stub method: deadline and bearer token."""
        timeout = self.timeout if call.timeout is None else call.timeout
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        return {"timeout": timeout, "metadata": metadata}

    def attempts(self, call: Call[Any]) -> Attempts:
        return Attempts(call, self.retry)


class ClientBase:
    """The constructor of both clients; `_grpc` is `grpc` or `grpc.aio`."""

    _grpc: ModuleType

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        """`credentials` (e.g. `grpc.ssl_channel_credentials()`) selects TLS."""
        self.address = address
        self._settings = Settings(token, timeout, retry)
        opts = [("grpc.primary_user_agent", _USER_AGENT), *(options or [])]
        self._channel = (
            self._grpc.secure_channel(address, credentials, options=opts)
            if credentials is not None
            else self._grpc.insecure_channel(address, options=opts)
        )
        self._stubs = Stubs(self._channel)


def as_method(method: F, build: Callable[..., Any], owner: str) -> F:
    """`method`, named and documented as `build`, with its parameters plus `self`."""
    method.__name__ = build.__name__
    method.__qualname__ = f"{owner}.{build.__name__}"
    method.__doc__ = build.__doc__
    signature = inspect.signature(build)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self_param, *signature.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    return method
