"""Where a call's request type comes from: --protoset, --proto, or server reflection.

Every source ends as a serialised `FileDescriptorSet` (picklable bytes, shipped to
worker processes), from which `method_input` builds the request class.

Reflection asks for the file that defines the *service* (`pkg.Service`), then
for any missing dependency by file name, and finds the method in that file.
Some servers resolve only service symbols, not method symbols (Python's
grpcio-reflection, grpc/grpc#34743), so this works with and without that bug.
`grpc.reflection.v1` is tried first, then `v1alpha` (same messages).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2

from sira_loadtest.config import ConfigError

REFLECTION_METHODS: tuple[str, ...] = (
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)


_VERSION_MISSING = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL)


def split_call(path: str) -> tuple[str, str]:
    """`/pkg.Service/Method` -> ("pkg.Service", "Method")."""
    service, _, method = path.lstrip("/").partition("/")
    return service, method


def from_protoset(paths: Sequence[str]) -> bytes:
    """The files of one or more protoset files (protoc --descriptor_set_out), merged."""
    merged = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()
    for path in paths:
        fds = descriptor_pb2.FileDescriptorSet()
        try:
            fds.ParseFromString(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"--protoset: {exc}") from None
        except Exception:  # protobuf raises DecodeError or others on garbage
            raise ConfigError(f"--protoset: {path[:100]} is not a FileDescriptorSet") from None
        for file in fds.file:
            if file.name not in seen:
                seen.add(file.name)
                merged.file.append(file)
    return merged.SerializeToString()


def from_proto(proto: str, import_paths: Sequence[str]) -> bytes:
    """Compile a .proto (and its imports) with grpcio-tools' protoc, like ghz --proto.

    The proto's own directory and the current directory are import paths, as in ghz.
    """
    if not proto.endswith(".proto"):
        raise ConfigError("--proto: must have .proto extension")
    try:
        from grpc_tools import protoc
    except ImportError:
        raise ConfigError(
            "--proto needs grpcio-tools (pip install grpcio-tools); or pass --protoset"
        ) from None
    well_known = Path(protoc.__file__).parent / "_proto"
    paths = [*import_paths, str(Path(proto).parent), ".", str(well_known)]
    with tempfile.TemporaryDirectory(prefix="sira-loadtest-") as tmp:
        out = Path(tmp) / "set.protoset"
        args = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            *(f"--proto_path={p}" for p in paths),
            f"--descriptor_set_out={out}",
            "--include_imports",
            proto,
        ]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ConfigError(f"--proto: protoc failed: {done.stderr.strip()[:300]}")
        return from_protoset([str(out)])


def _ordered(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> list[str]:
    """File names with every dependency before its dependents."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in files:
            return
        seen.add(name)
        for dep in files[name].dependency:
            visit(dep)
        order.append(name)

    for name in files:
        visit(name)
    return order


def build_pool(descriptor_set: bytes) -> descriptor_pool.DescriptorPool:
    """A fresh pool holding the set's files; dependencies missing from the set
    (well-known types of a protoset built without --include_imports) come from the
    default pool."""
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(descriptor_set)
    files = {f.name: f for f in fds.file}
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        added.add(name)
        file = files.get(name)
        if file is None:
            try:
                found = descriptor_pool.Default().FindFileByName(name)
            except KeyError:
                raise ConfigError(f"descriptor file {name!r} is missing from the set") from None
            file = descriptor_pb2.FileDescriptorProto()
            found.CopyToProto(file)
        for dep in file.dependency:
            add(dep)
        pool.Add(file)

    for name in files:
        add(name)
    return pool


def find_method(pool: descriptor_pool.DescriptorPool, path: str) -> descriptor.MethodDescriptor:
    """The method of `/pkg.Service/Method` in `pool`; ConfigError naming what is missing."""
    service_name, method_name = split_call(path)
    try:
        service = pool.FindServiceByName(service_name)
    except KeyError:
        raise ConfigError(f"--call: service {service_name[:100]!r} not found") from None
    method = service.methods_by_name.get(method_name)
    if method is None:
        known = ", ".join(sorted(service.methods_by_name))
        raise ConfigError(
            f"--call: service {service_name} has no method {method_name[:100]!r} (has: {known})"
        )
    return method


def method_input(descriptor_set: bytes, path: str) -> type[Message]:
    """The request class of `path` according to `descriptor_set`."""
    method = find_method(build_pool(descriptor_set), path)
    if method.client_streaming or method.server_streaming:
        raise ConfigError(f"--call: {path.lstrip('/')} streams; only unary calls are supported")
    return message_factory.GetMessageClass(method.input_type)


async def _ask(
    channel: grpc.aio.Channel,
    method: str,
    requests: list[reflection_pb2.ServerReflectionRequest],
    metadata: tuple[tuple[str, str], ...],
    deadline: float,
) -> list[reflection_pb2.ServerReflectionResponse]:
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )

    async def send() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        for request in requests:
            yield request

    stream = call(send(), metadata=metadata, timeout=deadline)
    return [response async for response in stream]


def _files_of(
    response: reflection_pb2.ServerReflectionResponse, what: str
) -> list[descriptor_pb2.FileDescriptorProto]:
    if response.HasField("error_response"):
        error = response.error_response
        raise ConfigError(f"server reflection: {what}: {error.error_message[:200]}")
    files = []
    for raw in response.file_descriptor_response.file_descriptor_proto:
        file = descriptor_pb2.FileDescriptorProto()
        file.ParseFromString(raw)
        files.append(file)
    return files


async def from_reflection(
    channel: grpc.aio.Channel,
    path: str,
    metadata: tuple[tuple[str, str], ...] = (),
    deadline: float = 10.0,
) -> bytes:
    """Resolve `/pkg.Service/Method` through the server's reflection service.

    `deadline`: seconds allowed for each reflection exchange."""
    service, _ = split_call(path)
    errors: list[grpc.aio.AioRpcError] = []
    for method in REFLECTION_METHODS:
        try:
            return await _resolve(channel, method, service, metadata, deadline)
        except grpc.aio.AioRpcError as exc:
            # A server without this version answers UNIMPLEMENTED, which grpc.aio
            # sometimes reports as INTERNAL "Internal error from Core" (grpc/grpc#36066):
            # both mean "try the next version".
            errors.append(exc)
    if all(e.code() in _VERSION_MISSING for e in errors):
        raise ConfigError(
            "the server has no reflection service: pass --proto or --protoset "
            f"({errors[-1].details()})"
        )
    failed = next(e for e in errors if e.code() not in _VERSION_MISSING)
    raise ConfigError(f"server reflection failed: {failed.code().name}: {failed.details()}")


async def _resolve(
    channel: grpc.aio.Channel,
    method: str,
    service: str,
    metadata: tuple[tuple[str, str], ...],
    deadline: float,
) -> bytes:
    first = await _ask(
        channel,
        method,
        [reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)],
        metadata,
        deadline,
    )
    files = {f.name: f for f in _files_of(first[0], f"symbol {service}")}
    while True:
        missing = sorted({d for f in files.values() for d in f.dependency} - files.keys())
        if not missing:
            break
        requests = [reflection_pb2.ServerReflectionRequest(file_by_filename=n) for n in missing]
        for name, response in zip(
            missing, await _ask(channel, method, requests, metadata, deadline), strict=False
        ):
            for file in _files_of(response, f"file {name}"):
                files.setdefault(file.name, file)
            if name not in files:  # never ask again for a file the server lacks
                raise ConfigError(f"server reflection did not return {name}")
    fds = descriptor_pb2.FileDescriptorSet(file=[files[n] for n in _ordered(files)])
    return fds.SerializeToString()
