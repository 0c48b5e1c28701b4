"""The guards every SIRA RPC passes: domain errors to rich statuses, JWT + RBAC, edge
checks, applied once when the servicers are registered (`GuardedRegistrar`).

Order, outermost first (`GuardedRegistrar._wrap`):

    ErrorGuard   turns every SiraError raised below it, including the other
                 guards', into a status with google.rpc.ErrorInfo (+ BadRequest,
                 RetryInfo); anything else into INTERNAL with a request id.
                 Never UNKNOWN. Counts every finished RPC by status code.
    AuthGuard    reads the bearer token, checks the RBAC table, sets the
                 principal for the servicer, then calls it.
    limits       admission (`api.call_limits`), when given: needs the principal.
    EdgeGuard    parses requests without raising and checks every field
                 against the edge rules (`api.edge`).
    servicer

Why at registration and not as grpc.aio interceptors: grpc.aio awaits every
interceptor's `intercept_service` coroutine on every call (two no-op interceptors
cost ~7 % of an echo server's throughput here). A guard wraps a method's behaviour
once, at registration; per-call inputs (metadata) are read from the servicer
context, never captured at wrap time. Health and reflection are registered on the
server directly and pass no guard; a method missing from the RBAC table is denied to
everyone.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from sira_server import rbac
from sira_server.api.context import set_principal
from sira_server.api.edge import check_request, guard_deserializer
from sira_server.auth import ANONYMOUS, Principal, TokenVerifier
from sira_server.domain import limits
from sira_server.errors import PermissionDenied, SiraError, Unauthenticated

__all__ = [
    "ERROR_DOMAIN",
    "AuthGuard",
    "EdgeGuard",
    "ErrorGuard",
    "Guard",
    "GuardedRegistrar",
    "InternalError",
    "bearer_token",
    "error_status",
]

logger = logging.getLogger("sira_server.api")

ERROR_DOMAIN = "sira.experiments.v1"
"""`google.rpc.ErrorInfo.domain` of every error SIRA reports."""

_STATUS_CODES: dict[str, Any] = {
    code.name: code
    for code in grpc.StatusCode
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN)
}

# grpc.aio's own abort exception (context.abort / abort_with_status): let it through.
_AbortError: type[BaseException] = grpc.aio.AbortError

Behaviour = Callable[[Any, Any], Any]
UnaryBehaviour = Callable[[Any, Any], Awaitable[Any]]
StreamBehaviour = Callable[[Any, Any], AsyncIterator[Any]]


class InternalError(SiraError):
    """An unexpected exception, as the caller sees it (details stay in the log)."""

    status_name = "INTERNAL"
    default_reason = "ERROR_REASON_INTERNAL"


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _cut(text: str, max_bytes: int) -> str:
    """``text`` within ``max_bytes`` of UTF-8, marked with "..." when cut."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max_bytes - 3].decode("utf-8", "ignore") + "..."


def error_status(err: SiraError) -> Any:
    """The grpc.Status for `err`: code, message, ErrorInfo and, if any, BadRequest.

    Capped whatever the error holds (`sira_server.domain.limits`, MAX_ERROR_*): at most
    ten violations, short fields, descriptions and metadata values, so the trailers stay
    a few KiB (clients refuse trailers above 16 KiB and would see RESOURCE_EXHAUSTED).
    """
    code = _STATUS_CODES.get(err.status_name, grpc.StatusCode.INTERNAL)
    info = error_details_pb2.ErrorInfo(
        reason=err.reason,
        domain=ERROR_DOMAIN,
        metadata={
            _cut(str(k), limits.MAX_ERROR_FIELD_BYTES): _cut(
                str(v), limits.MAX_ERROR_METADATA_BYTES
            )
            for k, v in list(err.metadata.items())[: limits.MAX_ERROR_VIOLATIONS]
        },
    )
    details = [_pack(info)]
    if err.violations:
        shown = err.violations[: limits.MAX_ERROR_VIOLATIONS]
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_cut(v.field, limits.MAX_ERROR_FIELD_BYTES),
                    description=_cut(v.description, limits.MAX_ERROR_DESCRIPTION_BYTES),
                )
                for v in shown
            ]
        )
        details.append(_pack(bad_request))  # the message says how many more there were
    retry_after = getattr(err, "retry_after_seconds", None)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1_000_000, int(retry_after * 1e9)))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    message = _cut(err.message, limits.MAX_ERROR_MESSAGE_BYTES)
    if message != err.message and len(err.violations) > 1:  # keep the count when cutting
        total = f" ({len(err.violations)} field violations in all)"
        message = _cut(err.message, limits.MAX_ERROR_MESSAGE_BYTES - len(total)) + total
    proto = status_pb2.Status(code=code.value[0], message=message, details=details)
    return rpc_status.to_status(proto)


async def _abort(context: Any, err: SiraError, method: str) -> NoReturn:
    if err.status_name == "UNAVAILABLE":
        logger.warning("%s: %s", method, err.message)
    else:
        logger.debug("%s: %s %s", method, err.status_name, err.message)
    await context.abort_with_status(error_status(err))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


async def _abort_internal(context: Any, method: str) -> NoReturn:
    request_id = uuid.uuid4().hex[:16]
    logger.exception("unhandled exception in %s (request id %s)", method, request_id)
    err = InternalError(
        f"internal error; see server logs (request id {request_id})",
        metadata={"request_id": request_id},
    )
    await context.abort_with_status(error_status(err))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


# --- wrapping a handler's behaviour -------------------------------------------------


def _as_coroutine(behaviour: Behaviour) -> UnaryBehaviour:
    if inspect.iscoroutinefunction(behaviour):
        return behaviour

    async def call(request: Any, context: Any) -> Any:
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result

    return call


def _as_async_gen(behaviour: Behaviour) -> StreamBehaviour:
    if inspect.isasyncgenfunction(behaviour):
        return behaviour

    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        result = behaviour(request, context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        elif result is not None:
            for item in result:
                yield item

    return stream


class Guard:
    """How a guard wraps the two shapes of aio behaviour, and a whole method handler."""

    def unary(self, behaviour: UnaryBehaviour, method: str) -> UnaryBehaviour:
        raise NotImplementedError

    def stream(self, behaviour: StreamBehaviour, method: str) -> StreamBehaviour:
        raise NotImplementedError

    def handler(self, handler: Any, method: str) -> Any:
        """A new RpcMethodHandler whose behaviour is wrapped, whatever its cardinality."""

        def wrap(behaviour: Behaviour) -> Behaviour:
            # A response-streaming coroutine writes through context.write: same
            # shape as unary. Otherwise streaming behaviours are (async) generators.
            if not handler.response_streaming or inspect.iscoroutinefunction(behaviour):
                return self.unary(_as_coroutine(behaviour), method)
            return self.stream(_as_async_gen(behaviour), method)

        codecs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **codecs)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **codecs)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **codecs)
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **codecs)


# --- errors -------------------------------------------------------------------------


Count = Callable[[str, str], None]
"""Called with (method, status code name) once per finished RPC."""


def _count_nothing(method: str, code: str) -> None:
    return None


def _aborted_code(context: Any) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _cancelled_code(context: Any) -> str:
    """grpc.aio cancels the handler when the client cancels, when the call's deadline
    passes, or at the end of a shutdown's grace. DEADLINE_EXCEEDED only if the server's
    own deadline has passed: a client that gives up at its deadline first (a race, as in
    grpc-go) is seen as CANCELLED."""
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


class ErrorGuard(Guard):
    """Maps SiraError to its status and any other exception to INTERNAL; counts every
    finished RPC by method and status code when given a `count` callback."""

    def __init__(self, count: Count = _count_nothing) -> None:
        self._count = count

    def unary(self, behaviour: UnaryBehaviour, method: str) -> UnaryBehaviour:
        count = self._count

        async def guarded(request: Any, context: Any) -> Any:
            try:
                response = await behaviour(request, context)
            except _AbortError:
                count(method, _aborted_code(context))
                raise
            except asyncio.CancelledError:  # what it stored is counted where it was stored
                count(method, _cancelled_code(context))
                raise
            except SiraError as err:
                count(method, err.status_name if err.status_name != "UNKNOWN" else "INTERNAL")
                await _abort(context, err, method)
            except NotImplementedError:  # a generated servicer base: not served here
                count(method, "UNIMPLEMENTED")
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
            except Exception:
                count(method, "INTERNAL")
                await _abort_internal(context, method)
            count(method, "OK")
            return response

        return guarded

    def stream(self, behaviour: StreamBehaviour, method: str) -> StreamBehaviour:
        count = self._count

        async def guarded(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in behaviour(request, context):
                    yield item
            except _AbortError:
                count(method, _aborted_code(context))
                raise
            except asyncio.CancelledError:
                count(method, _cancelled_code(context))
                raise
            except SiraError as err:
                count(method, err.status_name if err.status_name != "UNKNOWN" else "INTERNAL")
                await _abort(context, err, method)
            except Exception:
                count(method, "INTERNAL")
                await _abort_internal(context, method)
            count(method, "OK")

        return guarded


# --- authentication and RBAC ----------------------------------------------------------

TOKEN_MISSING = "ERROR_REASON_TOKEN_MISSING"
TOKEN_INVALID = "ERROR_REASON_TOKEN_INVALID"
ROLE_NOT_ALLOWED = "ERROR_REASON_ROLE_NOT_ALLOWED"


def bearer_token(metadata: Any) -> str | None:
    """The token of the first `authorization` entry, None if there is none."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated(
                    "'authorization' metadata must be 'Bearer <token>'", reason=TOKEN_INVALID
                )
            return token
    return None


Authorize = Callable[[Any], Principal]


class AuthGuard(Guard):
    """Bearer JWT + the RBAC table. Raises SiraError from inside the wrapped behaviour,
    so it must sit inside ErrorGuard, which turns those into statuses."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verify = verifier.verify

    def _authorizer(self, method: str) -> Authorize:
        """The per-call check for `method`: context -> Principal, or a SiraError."""
        allowed = rbac.allowed_roles(method)
        required = ",".join(sorted(allowed or ()))
        denial = {"method": method, "required_roles": required}
        if allowed is None:

            def deny(context: Any) -> Principal:
                raise PermissionDenied(
                    f"{method} is not in SIRA's RBAC table, so no one may call it",
                    reason=ROLE_NOT_ALLOWED,
                    metadata=denial,
                )

            return deny

        anonymous_ok = rbac.allows_anonymous(method)
        verify = self._verify

        def authorize(context: Any) -> Principal:
            token = bearer_token(context.invocation_metadata())
            if token is None:
                if anonymous_ok:
                    return ANONYMOUS
                raise Unauthenticated(
                    "missing bearer token in 'authorization' metadata", reason=TOKEN_MISSING
                )
            principal = verify(token)
            if principal.roles.isdisjoint(allowed):
                held = ", ".join(sorted(principal.roles)) or "none"
                raise PermissionDenied(
                    f"{method} needs one of the roles {required.replace(',', ', ')}; "
                    f"the token of '{principal.subject}' has roles: {held}",
                    reason=ROLE_NOT_ALLOWED,
                    metadata=denial,
                )
            return principal

        return authorize

    def unary(self, behaviour: UnaryBehaviour, method: str) -> UnaryBehaviour:
        authorize = self._authorizer(method)

        async def authorized(request: Any, context: Any) -> Any:
            set_principal(authorize(context))
            return await behaviour(request, context)

        return authorized

    def stream(self, behaviour: StreamBehaviour, method: str) -> StreamBehaviour:
        authorize = self._authorizer(method)

        async def authorized(request: Any, context: Any) -> AsyncIterator[Any]:
            set_principal(authorize(context))
            async for item in behaviour(request, context):
                yield item

        return authorized


# --- registration ------------------------------------------------------------------------


class _WrappedGenericHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler whose method handlers come out wrapped (cached per method)."""

    def __init__(self, inner: Any, wrap: Callable[[Any, str], Any]) -> None:
        self._inner = inner
        self._wrap = wrap
        self._cache: dict[str, Any] = {}

    def service(self, handler_call_details: Any) -> Any:
        method = handler_call_details.method
        if method not in self._cache:
            handler = self._inner.service(handler_call_details)
            self._cache[method] = None if handler is None else self._wrap(handler, method)
        return self._cache[method]


# --- edge validation -------------------------------------------------------------------


class EdgeGuard(Guard):
    """Parses requests without raising (`edge.guard_deserializer`) and checks every
    field against the edge rules (`edge.check_request`) before the servicer runs."""

    def unary(self, behaviour: UnaryBehaviour, method: str) -> UnaryBehaviour:
        async def checked(request: Any, context: Any) -> Any:
            check_request(request)
            return await behaviour(request, context)

        return checked

    def stream(self, behaviour: StreamBehaviour, method: str) -> StreamBehaviour:
        async def checked(request: Any, context: Any) -> AsyncIterator[Any]:
            check_request(request)
            async for item in behaviour(request, context):
                yield item

        return checked

    def handler(self, handler: Any, method: str) -> Any:
        wrapped = super().handler(handler, method)
        return wrapped._replace(
            request_deserializer=guard_deserializer(handler.request_deserializer, method)
        )


class GuardedRegistrar:
    """Stands in for the server in the generated `add_*Servicer_to_server` functions and
    registers every method with the error, auth and edge guards already applied.

    Public services (health, reflection) are registered on the real server directly,
    so they pass no guard at all.
    """

    def __init__(
        self,
        server: Any,
        verifier: TokenVerifier,
        count: Count = _count_nothing,
        limits: Guard | None = None,
    ):
        """`limits`: admission (`api.call_limits.CallLimits`), applied inside auth."""
        self._server = server
        self._errors = ErrorGuard(count)
        self._auth = AuthGuard(verifier)
        self._edge = EdgeGuard()
        self._limits = limits

    def _wrap(self, handler: Any, method: str) -> Any:
        # Error guard outermost: it turns the auth, limit and edge guards' SiraErrors
        # into statuses. Auth before the edge check: strangers learn nothing about the
        # rules. Limits need the principal (inside auth) and shed load before any work.
        inner = self._edge.handler(handler, method)
        if self._limits is not None:
            inner = self._limits.handler(inner, method)
        return self._errors.handler(self._auth.handler(inner, method), method)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGenericHandler(h, self._wrap) for h in handlers)
        )

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._wrap(h, f"/{service}/{name}") for name, h in handlers.items()}
        )
