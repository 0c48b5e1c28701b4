"""Server reflection (v1 and v1alpha) and Health, as SIRA serves them, on a real aio server.

The reflection client here speaks the protocol itself, so each symbol lookup is seen
exactly as grpcurl and ghz send it (`file_containing_symbol` with a method name).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from sira.experiments.v1 import (
    assignment_service_pb2,
    insights_service_pb2,
    lifecycle_service_pb2,
    tracking_service_pb2,
)
from sira_server.api.health import MAX_LISTED, HealthServicer
from sira_server.api.reflection import V1, V1_FILE, V1ALPHA, SymbolPool, enable_reflection

SERVICE_FILES = {
    service.full_name: module.DESCRIPTOR.name
    for module in (
        lifecycle_service_pb2,
        assignment_service_pb2,
        tracking_service_pb2,
        insights_service_pb2,
        health_pb2,
    )
    for service in module.DESCRIPTOR.services_by_name.values()
}
METHODS = {
    method.full_name: SERVICE_FILES[service.full_name]
    for module in (
        lifecycle_service_pb2,
        assignment_service_pb2,
        tracking_service_pb2,
        insights_service_pb2,
        health_pb2,
    )
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
}


def _v1_messages() -> tuple[Any, Any]:
    """The v1 request and response classes, from the v1 file SIRA adds to the pool."""
    pool = descriptor_pool.Default()
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
        ),
    )


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, HealthServicer]]:
    server = grpc.aio.server()
    servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    services = [name for name in SERVICE_FILES if name != health.SERVICE_NAME]
    enable_reflection(server, (*services, health.SERVICE_NAME))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


Ask = Callable[[Any], Any]


@pytest.fixture(params=[V1ALPHA, V1])
async def ask(
    request: pytest.FixtureRequest, server: tuple[str, HealthServicer]
) -> AsyncIterator[Ask]:
    """One request on the reflection stream of either version; its response."""
    if request.param == V1:
        request_type, response_type = _v1_messages()
    else:
        request_type, response_type = (
            reflection_pb2.ServerReflectionRequest,
            reflection_pb2.ServerReflectionResponse,
        )
    async with grpc.aio.insecure_channel(server[0]) as channel:
        call = channel.stream_stream(
            f"/{request.param}/ServerReflectionInfo",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )

        async def one(**fields: Any) -> Any:
            responses = [r async for r in call(iter([request_type(**fields)]), timeout=10)]
            assert len(responses) == 1
            return responses[0]

        yield one


def _files(response: Any) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    files = {}
    for raw in response.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[proto.name] = proto
    return files


async def test_list_names_every_service_and_both_reflection_versions(ask: Ask) -> None:
    response = await ask(list_services="")
    names = {s.name for s in response.list_services_response.service}
    assert names == set(SERVICE_FILES) | {V1, V1ALPHA}


@pytest.mark.parametrize("method", sorted(METHODS))
async def test_every_method_symbol_resolves_to_its_file(ask: Ask, method: str) -> None:
    response = await ask(file_containing_symbol=method)
    assert response.WhichOneof("message_response") == "file_descriptor_response"
    files = _files(response)
    service, _, name = method.rpartition(".")
    proto = files[METHODS[method]]
    described = {s.name: s for s in proto.service}[service.rpartition(".")[2]]
    assert name in {m.name for m in described.method}


async def test_services_messages_and_nested_symbols_still_resolve(ask: Ask) -> None:
    for symbol, file in (
        ("sira.experiments.v1.AssignmentService", assignment_service_pb2.DESCRIPTOR.name),
        ("sira.experiments.v1.AssignRequest", assignment_service_pb2.DESCRIPTOR.name),
        ("sira.experiments.v1.AssignRequest.subject_id", assignment_service_pb2.DESCRIPTOR.name),
        ("grpc.health.v1.HealthCheckResponse.ServingStatus", health_pb2.DESCRIPTOR.name),
    ):
        assert file in _files(await ask(file_containing_symbol=symbol)), symbol


@pytest.mark.parametrize(
    "symbol",
    [
        "sira.experiments.v1.AssignmentService.NoSuchMethod",
        "sira.experiments.v1.NoSuchService.Assign",
        "sira.experiments.v1.AssignRequest.no_such_field",
        "nothing",
    ],
)
async def test_unknown_symbols_answer_not_found(ask: Ask, symbol: str) -> None:
    response = await ask(file_containing_symbol=symbol)
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_reflection_describes_itself_in_both_versions(ask: Ask) -> None:
    v1 = _files(await ask(file_containing_symbol=f"{V1}.ServerReflectionInfo"))[V1_FILE]
    assert v1.package == "grpc.reflection.v1"
    (method,) = v1.service[0].method
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert method.client_streaming
    assert method.server_streaming
    assert not v1.options.deprecated
    alpha = await ask(file_containing_symbol=V1ALPHA)
    assert reflection_pb2.DESCRIPTOR.name in _files(alpha)


def test_symbol_pool_adds_only_method_names() -> None:
    pool = SymbolPool()
    method = "sira.experiments.v1.TrackingService.Track"
    assert pool.FindFileContainingSymbol(method).name == tracking_service_pb2.DESCRIPTOR.name
    with pytest.raises(KeyError):
        pool.FindFileContainingSymbol("sira.experiments.v1.TrackingService.Nope")
    with pytest.raises(KeyError):  # a message is not a service: its "methods" are not
        pool.FindFileContainingSymbol("sira.experiments.v1.TrackRequest.Track")
    # everything else is the wrapped pool's own
    assert pool.FindFileByName(V1_FILE).package == "grpc.reflection.v1"


# --- health --------------------------------------------------------------------------


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _list(address: str) -> dict[str, int]:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).List(
            health_pb2.HealthListRequest(), timeout=10
        )
    return {name: status.status for name, status in response.statuses.items()}


async def test_health_list_answers_every_status_set(
    server: tuple[str, HealthServicer], caplog: pytest.LogCaptureFixture
) -> None:
    address, servicer = server
    assert await _list(address) == {"": SERVING}
    await servicer.set("sira.experiments.v1.AssignmentService", SERVING)
    await servicer.set("liveness", NOT_SERVING)
    assert await _list(address) == {
        "": SERVING,
        "sira.experiments.v1.AssignmentService": SERVING,
        "liveness": NOT_SERVING,
    }
    await servicer.enter_graceful_shutdown()
    await servicer.set("liveness", SERVING)  # ignored after shutdown, as Check sees it
    assert await _list(address) == {
        "": NOT_SERVING,
        "sira.experiments.v1.AssignmentService": NOT_SERVING,
        "liveness": NOT_SERVING,
    }
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        checked = await stub.Check(health_pb2.HealthCheckRequest(service="liveness"))
        assert checked.status == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "Traceback" not in caplog.text


async def test_health_list_past_the_limit_is_resource_exhausted(
    server: tuple[str, HealthServicer],
) -> None:
    address, servicer = server
    for i in range(MAX_LISTED):  # + the overall "" = one more than the limit
        await servicer.set(f"service-{i}", SERVING)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _list(address)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == f"server health list exceeds maximum capacity: {MAX_LISTED}"
