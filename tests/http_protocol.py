"""Calling SIRA the way a browser does (Connect over HTTP/1.1, httpx), and the same call
over gRPC, reduced to comparable outcomes: an answer message, or (code, message,
google.rpc details)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

DETAIL_TYPES: dict[str, type[Message]] = {
    "google.rpc.ErrorInfo": error_details_pb2.ErrorInfo,
    "google.rpc.BadRequest": error_details_pb2.BadRequest,
    "google.rpc.RetryInfo": error_details_pb2.RetryInfo,
}


@dataclass(frozen=True)
class Failure:
    code: str
    """The Connect code name: `unauthenticated`, `invalid_argument`, ..."""
    message: str
    details: tuple[Message, ...]

    def detail(self, kind: type[Message]) -> Any:
        found = [d for d in self.details if isinstance(d, kind)]
        assert found, f"no {kind.DESCRIPTOR.full_name} in {self.details}"
        return found[0]


def grpc_code_name(code: grpc.StatusCode) -> str:
    return "canceled" if code == grpc.StatusCode.CANCELLED else code.name.lower()


def _unpack(type_name: str, value: bytes) -> Message:
    message = DETAIL_TYPES[type_name]()
    message.ParseFromString(value)
    return message


def failure_of_grpc(error: grpc.aio.AioRpcError) -> Failure:
    details: tuple[Message, ...] = ()
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            details = tuple(
                _unpack(d.type_url.removeprefix("type.googleapis.com/"), d.value)
                for d in status.details
            )
    return Failure(grpc_code_name(error.code()), error.details() or "", details)


def failure_of_connect(response: httpx.Response) -> Failure:
    body = response.json()
    details = tuple(
        _unpack(d["type"], base64.b64decode(d["value"] + "=" * (-len(d["value"]) % 4)))
        for d in body.get("details", ())
    )
    return Failure(body["code"], body.get("message", ""), details)


async def connect_call(
    http: httpx.AsyncClient,
    path: str,
    request: Message,
    response_class: type[Message],
    *,
    token: str | None = None,
    codec: str = "proto",
    headers: dict[str, str] | None = None,
) -> Message | Failure:
    """One Connect unary call (POST), as connect-web's transport sends it."""
    sent = {"connect-protocol-version": "1", **(headers or {})}
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    if codec == "proto":
        sent["content-type"] = "application/proto"
        body = request.SerializeToString()
    else:
        sent["content-type"] = "application/json"
        body = json_format.MessageToJson(request).encode()
    response = await http.post(path, content=body, headers=sent)
    if response.status_code != 200:
        assert response.headers["content-type"] == "application/json", response.text
        return failure_of_connect(response)
    assert response.headers["content-type"] == f"application/{codec}"
    if codec == "proto":
        return response_class.FromString(response.content)
    answer = response_class()
    json_format.Parse(response.content, answer)
    return answer


async def grpc_call(
    channel: grpc.aio.Channel,
    path: str,
    request: Message,
    response_class: type[Message],
    *,
    token: str | None = None,
) -> Message | Failure:
    call = channel.unary_unary(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    try:
        answer: Message = await call(request, metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as error:
        return failure_of_grpc(error)
    return answer


def as_json(message: Message) -> Any:
    return json.loads(json_format.MessageToJson(message))
