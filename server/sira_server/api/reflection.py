"""Server reflection, `grpc.reflection.v1` and `v1alpha`, answering method symbols too.

grpcio-reflection's servicer hands a `file_containing_symbol` request straight to
`DescriptorPool.FindFileContainingSymbol`, and Python protobuf's (upb) pool does not
resolve method names (grpc/grpc#34743): `grpcurl describe Service.Method` and ghz
through reflection then fail with "Symbol not found". `SymbolPool` is the pool the
servicer is given (its public `pool=` argument): the same lookups, plus
`Service.Method` -> the service's file. Nothing of the library is patched.

grpcio-reflection ships only v1alpha (grpc/grpc#38576) and no installed package has
the v1 protos. The v1 protocol is v1alpha renamed: same messages, same field numbers,
so the same servicer answers both service names with the v1alpha codecs (the bytes
are identical), and the v1 file is derived from the v1alpha one (package, type
references and options renamed) so reflection can describe itself under v1 too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

__all__ = ["V1", "V1ALPHA", "SymbolPool", "enable_reflection", "v1_file"]

V1ALPHA: str = reflection.SERVICE_NAME
V1 = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PACKAGE = reflection_pb2.DESCRIPTOR.package
_V1_PACKAGE = "grpc.reflection.v1"


class SymbolPool:
    """A descriptor pool whose `FindFileContainingSymbol` also finds `pkg.Service.Method`.

    Every other lookup is the wrapped pool's own.
    """

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool if pool is not None else descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            parent, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(parent)
            except KeyError:
                service = None
            if service is None or method not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def _renamed(type_name: str) -> str:
    prefix = f".{_V1ALPHA_PACKAGE}."
    if type_name.startswith(prefix):
        return f".{_V1_PACKAGE}.{type_name.removeprefix(prefix)}"
    return type_name


def v1_file(pool: descriptor_pool.DescriptorPool | None = None) -> FileDescriptor:
    """`grpc/reflection/v1/reflection.proto` in `pool` (default pool), added once."""
    pool = pool if pool is not None else descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE
    proto.package = _V1_PACKAGE
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = _renamed(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type)
            method.output_type = _renamed(method.output_type)
    proto.options.Clear()  # upstream v1's options: not deprecated, v1 package names
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    pool.AddSerializedFile(proto.SerializeToString())
    return pool.FindFileByName(V1_FILE)


def enable_reflection(
    server: grpc.aio.Server,
    service_names: Iterable[str],
    pool: descriptor_pool.DescriptorPool | None = None,
) -> None:
    """Serve reflection v1 and v1alpha on `server`, listing `service_names` and both
    reflection services."""
    v1_file(pool)
    servicer = reflection.aio.ReflectionServicer(
        (*service_names, V1, V1ALPHA), pool=SymbolPool(pool)
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1, handlers),))
    server.add_registered_method_handlers(V1, handlers)
