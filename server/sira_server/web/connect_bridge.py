"""The four services over Connect (and gRPC-Web), for browsers: connect-python's ASGI
server in front of the grpc.aio server's own guarded handlers.

Every browser call is forwarded, as protobuf bytes, over an in-process loopback
channel (a unix socket in a private directory) to the gRPC server, with the caller's
`authorization` header and deadline. So a browser call passes exactly the guards a
gRPC call passes (`api.guards`: JWT + RBAC, limits, edge validation, error details)
and is counted by the same metrics; nothing here knows a method by name. The endpoint
table is derived from the service descriptors: a new RPC in the protos is served
here by `make protos` alone.

Errors come back as the gRPC status with its `grpc-status-details-bin`
(google.rpc.Status); they leave as the Connect error with the same code, message and
details (ErrorInfo, BadRequest, RetryInfo), which connect-web exposes as
`ConnectError.findDetails`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from google.protobuf import json_format, symbol_database
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from protobuf.wkt import Any as WireAny

from sira_server.errors import excerpt

__all__ = ["ConnectBridge", "ProtoPayload", "payload_codecs"]

log = logging.getLogger("sira_server.web")

STATUS_DETAILS_KEY = "grpc-status-details-bin"
FORWARDED_HEADERS = ("authorization",)
"""Request headers passed on as gRPC metadata. Only the bearer token: the rest of a
browser's headers mean nothing to the handlers."""

_CODES: Mapping[grpc.StatusCode, Code] = {
    grpc.StatusCode.CANCELLED: Code.CANCELED,
    **{code: Code[code.name] for code in grpc.StatusCode if code.name in Code.__members__},
}


@dataclass(frozen=True, slots=True)
class ProtoPayload:
    """One message as protobuf bytes, with the class that reads them (for JSON)."""

    data: bytes
    message_class: type[Message]


class _BinaryCodec:
    """`application/proto`: bytes pass through untouched; the gRPC server parses them
    (undecodable bytes are its INVALID_ARGUMENT with a BadRequest, as over gRPC)."""

    def name(self) -> str:
        return "proto"

    def encode(self, message: ProtoPayload) -> bytes:
        return message.data

    def decode(self, data: bytes | bytearray, message_class: type[Message]) -> ProtoPayload:
        return ProtoPayload(bytes(data), message_class)


class _JsonCodec:
    """`application/json` (proto3 JSON): parsed into the method's message class and sent
    on as bytes; answers are rendered back from bytes."""

    def name(self) -> str:
        return "json"

    def encode(self, message: ProtoPayload) -> bytes:
        parsed = message.message_class.FromString(message.data)
        return json_format.MessageToJson(parsed, indent=None).encode()

    def decode(self, data: bytes | bytearray, message_class: type[Message]) -> ProtoPayload:
        message = message_class()
        try:
            json_format.Parse(bytes(data), message)
        except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
            raise _invalid_json(message_class, str(exc)) from None
        return ProtoPayload(message.SerializeToString(), message_class)


def payload_codecs() -> list[Any]:
    """The codecs of `ConnectBridge`: protobuf binary and proto3 JSON."""
    return [_BinaryCodec(), _JsonCodec()]


def _invalid_json(message_class: type[Message], problem: str) -> ConnectError:
    """A JSON body that is not the method's request: INVALID_ARGUMENT with a BadRequest,
    like undecodable protobuf bytes over gRPC."""
    name = message_class.DESCRIPTOR.name
    description = f"the body is not a valid {name} in proto3 JSON: {excerpt(problem)}"
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="request", description=description)
        ]
    )
    return ConnectError(
        Code.INVALID_ARGUMENT,
        f"invalid request: request: {description}",
        details=[_detail(bad_request)],
    )


def _detail(message: Message) -> ErrorDetail:
    return ErrorDetail(
        WireAny(
            type_url=f"type.googleapis.com/{message.DESCRIPTOR.full_name}",
            value=message.SerializeToString(),
        )
    )


def connect_error(error: grpc.aio.AioRpcError) -> ConnectError:
    """The gRPC status as a Connect error: same code, message and google.rpc details."""
    code = _CODES.get(error.code(), Code.INTERNAL)
    message = error.details() or ""
    details: list[ErrorDetail] = []
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:
                log.warning("unreadable %s from the gRPC server; details dropped", key)
                break
            message = status.message or message
            details = [
                ErrorDetail(WireAny(type_url=d.type_url, value=d.value)) for d in status.details
            ]
            break
    return ConnectError(code, message, details=details)


def _message_class(descriptor: Descriptor) -> type[Message]:
    cls: type[Message] = symbol_database.Default().GetSymbol(descriptor.full_name)
    return cls


def _forwarded_metadata(ctx: RequestContext[Any, Any]) -> tuple[tuple[str, str], ...]:
    headers = ctx.request_headers
    return tuple((name, value) for name in FORWARDED_HEADERS if (value := headers.get(name)))


def _timeout_seconds(ctx: RequestContext[Any, Any]) -> float | None:
    remaining = ctx.timeout_ms
    return None if remaining is None else max(remaining / 1000.0, 0.001)


class ConnectBridge(ConnectASGIApplication[None]):
    """An ASGI app serving every method of `services` at `/<service>/<method>` by
    forwarding it to `channel` (the gRPC server's loopback channel)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        services: Sequence[ServiceDescriptor],
        *,
        read_max_bytes: int,
    ) -> None:
        self._channel = channel
        # Any: connect-python types its table with the private Endpoint subclasses.
        table: dict[str, Any] = {
            f"/{service.full_name}/{method.name}": self._endpoint(method)
            for service in services
            for method in service.methods
        }
        super().__init__(
            service=None,
            endpoints=lambda _service: table,
            read_max_bytes=read_max_bytes,
            codecs=payload_codecs(),
        )
        self.paths: frozenset[str] = frozenset(table)

    @property
    def path(self) -> str:
        return "/"

    def _endpoint(self, method: MethodDescriptor) -> Endpoint[Any, Any]:
        path = f"/{method.containing_service.full_name}/{method.name}"
        request_class = _message_class(method.input_type)
        response_class = _message_class(method.output_type)
        streams = (method.client_streaming, method.server_streaming)
        info: MethodInfo[Any, Any] = MethodInfo(
            name=method.name,
            service_name=method.containing_service.full_name,
            input=request_class,
            output=response_class,
            # Nothing is served by GET: a browser could be led to send a GET with no
            # preflight; every call is a POST carrying its bearer token in a header.
            idempotency_level=IdempotencyLevel.UNKNOWN,
            stream_type=StreamType.SERVER_STREAM if streams[1] else StreamType.UNARY,
        )
        if streams == (False, False):
            unary = self._channel.unary_unary(path)

            async def call(request: ProtoPayload, ctx: RequestContext[Any, Any]) -> ProtoPayload:
                try:
                    data = await unary(
                        request.data,
                        metadata=_forwarded_metadata(ctx),
                        timeout=_timeout_seconds(ctx),
                    )
                except grpc.aio.AioRpcError as error:
                    raise connect_error(error) from None
                return ProtoPayload(data, response_class)

            return Endpoint.unary(info, call)
        if streams == (False, True):
            stream = self._channel.unary_stream(path)

            async def watch(
                request: ProtoPayload, ctx: RequestContext[Any, Any]
            ) -> AsyncIterator[ProtoPayload]:
                call = stream(
                    request.data, metadata=_forwarded_metadata(ctx), timeout=_timeout_seconds(ctx)
                )
                try:
                    async for data in call:
                        yield ProtoPayload(data, response_class)
                except grpc.aio.AioRpcError as error:
                    raise connect_error(error) from None
                finally:
                    call.cancel()

            return Endpoint.server_stream(info, watch)
        # Browsers cannot stream requests over HTTP/1.1 (fetch has no request streams).
        raise RuntimeError(f"{path}: client-streaming RPCs are not served to browsers")
