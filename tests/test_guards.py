"""The guards (errors, auth, edge) and the RBAC table, on a real grpc.aio server.

Every RPC of the four services is served by a probe servicer registered with the
generated `add_*Servicer_to_server` functions through `GuardedRegistrar`, as the real
server does; it echoes the principal in trailing metadata, so each call shows both
whether it got through and as whom.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from sira.experiments.v1 import (
    assignment_service_pb2,
    assignment_service_pb2_grpc,
    insights_service_pb2,
    insights_service_pb2_grpc,
    lifecycle_service_pb2,
    lifecycle_service_pb2_grpc,
    tracking_service_pb2,
    tracking_service_pb2_grpc,
)
from sira_server import rbac
from sira_server.api.context import current_principal
from sira_server.api.guards import ERROR_DOMAIN, ErrorGuard, Guard, GuardedRegistrar
from sira_server.auth import TokenVerifier, mint_token
from sira_server.config import JwtSettings
from sira_server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    SiraError,
    Unavailable,
)

SECRET = "interceptor-test-secret-" + "k" * 40
AUDIENCE = "sira-test"
ISSUER = "https://issuer.test"
SETTINGS = JwtSettings(algorithm="HS256", secret=SECRET, audience=AUDIENCE, issuer=ISSUER)

LIFECYCLE = "/sira.experiments.v1.LifecycleService/"
ASSIGNMENT = "/sira.experiments.v1.AssignmentService/"
TRACKING = "/sira.experiments.v1.TrackingService/"
INSIGHTS = "/sira.experiments.v1.InsightsService/"

# The issue's RBAC table, written out independently of sira_server.rbac.
EDITORS = {"ops_admin", "marketing"}
READERS = {"ops_admin", "marketing", "data_science"}
MODULES = {"pay_module", "connect_module"}
EXPECTED_TABLE: dict[str, set[str]] = {
    LIFECYCLE + "CreateExperiment": EDITORS,
    LIFECYCLE + "UpdateExperiment": EDITORS,
    LIFECYCLE + "StartExperiment": EDITORS,
    LIFECYCLE + "StopExperiment": EDITORS,
    LIFECYCLE + "ArchiveExperiment": EDITORS,
    LIFECYCLE + "DeleteExperiment": {"ops_admin"},
    LIFECYCLE + "ArchiveStaleExperiments": {"ops_admin"},
    LIFECYCLE + "GetExperiment": READERS,
    LIFECYCLE + "ListExperiments": READERS,
    LIFECYCLE + "ListAuditEvents": READERS,
    INSIGHTS + "GetResults": READERS,
    INSIGHTS + "GetInsights": READERS,
    INSIGHTS + "GetInsightsHistory": READERS,
    ASSIGNMENT + "Assign": MODULES,
    ASSIGNMENT + "AssignAll": MODULES,
    TRACKING + "Track": MODULES,
    TRACKING + "TrackBatch": MODULES,
}
EXPECTED_ANONYMOUS = {TRACKING + "Track", TRACKING + "TrackBatch"}
ALL_ROLES = ["ops_admin", "marketing", "data_science", "pay_module", "connect_module"]

# (pb2 module, pb2_grpc module, service name)
SERVICES: list[tuple[ModuleType, ModuleType, str]] = [
    (lifecycle_service_pb2, lifecycle_service_pb2_grpc, "LifecycleService"),
    (assignment_service_pb2, assignment_service_pb2_grpc, "AssignmentService"),
    (tracking_service_pb2, tracking_service_pb2_grpc, "TrackingService"),
    (insights_service_pb2, insights_service_pb2_grpc, "InsightsService"),
]


def all_rpcs() -> set[str]:
    """Full method name of every RPC of the four services, from the descriptors."""
    return {
        f"/sira.experiments.v1.{service}/{method.name}"
        for pb2, _, service in SERVICES
        for method in pb2.DESCRIPTOR.services_by_name[service].methods
    }


# --- probe servicers ------------------------------------------------------------------


def _echo(pb2: ModuleType, service: str, rpc: str) -> Callable[..., Any]:
    output = getattr(
        pb2, pb2.DESCRIPTOR.services_by_name[service].methods_by_name[rpc].output_type.name
    )

    async def echo(self: Any, request: Any, context: Any) -> Any:
        principal = current_principal()
        context.set_trailing_metadata(
            (
                ("x-subject", principal.subject),
                ("x-roles", ",".join(sorted(principal.roles))),
            )
        )
        return output()

    return echo


def probe_servicer(pb2: ModuleType, pb2_grpc: ModuleType, service: str) -> Any:
    base = getattr(pb2_grpc, f"{service}Servicer")
    methods = {
        m.name: _echo(pb2, service, m.name)
        for m in pb2.DESCRIPTOR.services_by_name[service].methods
    }
    return type(f"Probe{service}", (base,), methods)()


class FaultyLifecycle(lifecycle_service_pb2_grpc.LifecycleServiceServicer):
    """GetExperiment misbehaves on demand: the request's `experiment` names the fault."""

    async def GetExperiment(self, request: Any, context: Any) -> Any:
        fault = request.experiment
        if fault == "not-found":
            raise NotFound("experiment 'exp-9' does not exist", metadata={"experiment": "exp-9"})
        if fault == "invalid":
            raise InvalidArgument.from_violations(
                [
                    FieldViolation("experiment.key", "must match [a-z0-9_-]{1,64}"),
                    FieldViolation("experiment.variants[1].weight", "must be > 0"),
                ]
            )
        if fault == "state":
            raise FailedPrecondition(
                "experiment is RUNNING",
                metadata={"experiment": "e", "status": "RUNNING", "allowed_statuses": "DRAFT"},
            )
        if fault == "unavailable":
            raise Unavailable("postgres is down", metadata={"store": "postgres"})
        if fault == "bare":
            raise SiraError("base class raised directly")
        if fault == "boom":
            raise ValueError("db password is hunter2")
        if fault == "abort":
            await context.abort(grpc.StatusCode.ABORTED, "servicer aborted on its own")
        return await _echo(lifecycle_service_pb2, "LifecycleService", "GetExperiment")(
            self, request, context
        )


def servicers() -> list[tuple[Any, Callable[[Any, Any], None]]]:
    """A probe servicer per service; LifecycleService's GetExperiment can also fail."""
    result: list[tuple[Any, Callable[[Any, Any], None]]] = []
    for pb2, pb2_grpc, service in SERVICES:
        servicer = probe_servicer(pb2, pb2_grpc, service)
        if service == "LifecycleService":
            echoes = {k: v for k, v in vars(type(servicer)).items() if k[0].isupper()}
            del echoes["GetExperiment"]
            servicer = type("ProbeLifecycle", (FaultyLifecycle,), echoes)()
        result.append((servicer, getattr(pb2_grpc, f"add_{service}Servicer_to_server")))
    return result


# --- raw generic handlers: streaming shapes and a method outside the RBAC table ------------

STREAM_SERVICE = "sira.test.Streams"


async def _unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"first"
    if request == b"fail":
        raise NotFound("gone mid-stream", metadata={"experiment": "s"})
    if request == b"boom":
        raise RuntimeError("kaboom")
    yield b"second"


async def _writer_stream(request: bytes, context: Any) -> None:
    await context.write(b"written")
    if request == b"fail":
        raise Unavailable("redis is down", metadata={"store": "redis"})


async def _stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
    seen = [r async for r in requests]
    if b"fail" in seen:
        raise InvalidArgument.from_violations([FieldViolation("events[1]", "bad")])
    return b"|".join(seen)


async def _stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for r in requests:
        if r == b"fail":
            raise FailedPrecondition("stop", metadata={"status": "DRAFT"})
        yield r.upper()


def _sync_unary(request: bytes, context: Any) -> bytes:
    if request == b"boom":
        raise KeyError("sync failure")
    return request[::-1]


def stream_handlers(guard: Guard | None = None) -> Any:
    """The raw handlers, each wrapped by `guard` when given (as at registration)."""
    handlers = {
        "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream),
        "WriterStream": grpc.unary_stream_rpc_method_handler(_writer_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(_stream_stream),
        "SyncUnary": grpc.unary_unary_rpc_method_handler(_sync_unary),
    }
    if guard is not None:
        handlers = {
            name: guard.handler(h, f"/{STREAM_SERVICE}/{name}") for name, h in handlers.items()
        }
    return grpc.method_handlers_generic_handler(STREAM_SERVICE, handlers)


# --- servers ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    verifier: TokenVerifier, limits: Guard | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    """A server whose services are registered through `GuardedRegistrar`, as the real
    server's are; health and reflection on the server itself, unguarded."""
    server = grpc.aio.server()
    target = GuardedRegistrar(server, verifier, limits=limits)
    for servicer, add in servicers():
        add(servicer, target)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    reflection.enable_server_reflection(
        [f"sira.experiments.v1.{s}" for _, _, s in SERVICES] + [reflection.SERVICE_NAME], server
    )
    target.add_generic_rpc_handlers((stream_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


@pytest_asyncio.fixture(scope="module")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    async with serving(TokenVerifier(SETTINGS)) as ch:
        yield ch


def token(*roles: str, subject: str = "alice", **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "roles": list(roles),
        "iat": now,
        "exp": now + 600,
        "aud": AUDIENCE,
        "iss": ISSUER,
    }
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, SECRET, algorithm="HS256")


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


async def call(
    channel: grpc.aio.Channel, method: str, metadata: Any = None, request: Any = None
) -> grpc.aio.UnaryUnaryCall:
    """Call `method` with an empty (or given) request; returns the finished call."""
    service, rpc = method.strip("/").rsplit("/", 1)
    for pb2, _, name in SERVICES:
        if service.endswith("." + name):
            desc = pb2.DESCRIPTOR.services_by_name[name].methods_by_name[rpc]
            req_cls = getattr(pb2, desc.input_type.name)
            resp_cls = getattr(pb2, desc.output_type.name)
            break
    else:
        raise AssertionError(method)
    multi = channel.unary_unary(
        method,
        request_serializer=req_cls.SerializeToString,
        response_deserializer=resp_cls.FromString,
    )
    rpc_call = multi(request if request is not None else req_cls(), metadata=metadata)
    await rpc_call
    return rpc_call


def rich(err: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[Any]]:
    """The ErrorInfo and the other unpacked details of a failed call."""
    status: status_pb2.Status | None = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    assert status.code == err.code().value[0]
    infos, others = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            others.append(bad)
        else:
            others.append(detail)
    assert len(infos) == 1
    assert infos[0].domain == ERROR_DOMAIN
    return infos[0], others


async def fails(
    coro: Any, code: grpc.StatusCode, reason: str
) -> tuple[grpc.aio.AioRpcError, error_details_pb2.ErrorInfo, list[Any]]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    err = info.value
    assert err.code() == code, err.details()
    error_info, others = rich(err)
    assert error_info.reason == reason
    return err, error_info, others


# --- the RBAC table ----------------------------------------------------------------------


def test_every_rpc_of_the_four_services_has_an_rbac_entry() -> None:
    methods = all_rpcs()
    assert len(methods) == 17
    assert methods == set(rbac.METHOD_ROLES)
    for method in methods:
        assert rbac.allowed_roles(method) is not None, method


def test_rbac_table_matches_the_issue() -> None:
    assert {m: set(r) for m, r in rbac.METHOD_ROLES.items()} == EXPECTED_TABLE
    assert set(rbac.ANONYMOUS_METHODS) == EXPECTED_ANONYMOUS
    assert set(ALL_ROLES) == rbac.ROLES
    assert all(roles <= rbac.ROLES for roles in rbac.METHOD_ROLES.values())


def test_rbac_helpers() -> None:
    assert rbac.is_public("/grpc.health.v1.Health/Check")
    assert rbac.is_public("/grpc.health.v1.Health/Watch")
    assert rbac.is_public("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert rbac.is_public("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert not rbac.is_public("/grpc.health.v1.HealthX/Check")
    assert not rbac.is_public(LIFECYCLE + "GetExperiment")
    assert rbac.allowed_roles("/sira.experiments.v1.LifecycleService/Nope") is None
    assert rbac.allows_anonymous(TRACKING + "Track")
    assert not rbac.allows_anonymous(ASSIGNMENT + "Assign")


MATRIX = [
    pytest.param(method, role, id=f"{method.rsplit('/', 1)[1]}-{role or 'anonymous'}")
    for method in EXPECTED_TABLE
    for role in [*ALL_ROLES, None]
]


@pytest.mark.parametrize(("method", "role"), MATRIX)
async def test_rpc_role_matrix(channel: grpc.aio.Channel, method: str, role: str | None) -> None:
    allowed = method in EXPECTED_ANONYMOUS if role is None else role in EXPECTED_TABLE[method]
    metadata = None if role is None else bearer(token(role, subject=f"{role}-user"))
    if allowed:
        done = await call(channel, method, metadata)
        trailing = dict(await done.trailing_metadata())
        assert trailing["x-subject"] == (f"{role}-user" if role else "anonymous")
        assert trailing["x-roles"] == (role or "")
    elif role is None:
        await fails(
            call(channel, method, metadata),
            grpc.StatusCode.UNAUTHENTICATED,
            "ERROR_REASON_TOKEN_MISSING",
        )
    else:
        _, info, _ = await fails(
            call(channel, method, metadata),
            grpc.StatusCode.PERMISSION_DENIED,
            "ERROR_REASON_ROLE_NOT_ALLOWED",
        )
        assert info.metadata["method"] == method
        assert set(info.metadata["required_roles"].split(",")) == EXPECTED_TABLE[method]


# --- authentication over the wire ------------------------------------------------------------


async def test_health_needs_no_token(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # Not even inspected: a garbage header is fine too.
    reply = await stub.Check(health_pb2.HealthCheckRequest(), metadata=bearer("garbage"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_needs_no_token(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
        metadata=(("authorization", "nonsense"),),
    )
    names = {s.name async for r in responses for s in r.list_services_response.service}
    assert "sira.experiments.v1.LifecycleService" in names


async def test_anonymous_track_allowed_and_anonymous_create_denied(
    channel: grpc.aio.Channel,
) -> None:
    done = await call(channel, TRACKING + "Track")
    assert dict(await done.trailing_metadata())["x-subject"] == "anonymous"
    err, _, _ = await fails(
        call(channel, LIFECYCLE + "CreateExperiment"),
        grpc.StatusCode.UNAUTHENTICATED,
        "ERROR_REASON_TOKEN_MISSING",
    )
    assert err.details() == "missing bearer token in 'authorization' metadata"


async def test_invalid_token_is_not_downgraded_to_anonymous(channel: grpc.aio.Channel) -> None:
    await fails(
        call(channel, TRACKING + "Track", bearer("garbage")),
        grpc.StatusCode.UNAUTHENTICATED,
        "ERROR_REASON_TOKEN_INVALID",
    )


async def test_wrong_role_is_permission_denied_with_metadata(channel: grpc.aio.Channel) -> None:
    err, info, _ = await fails(
        call(channel, LIFECYCLE + "DeleteExperiment", bearer(token("marketing", "data_science"))),
        grpc.StatusCode.PERMISSION_DENIED,
        "ERROR_REASON_ROLE_NOT_ALLOWED",
    )
    assert dict(info.metadata) == {
        "method": LIFECYCLE + "DeleteExperiment",
        "required_roles": "ops_admin",
    }
    assert "ops_admin" in err.details()
    assert "data_science, marketing" in err.details()


async def test_scheme_is_case_insensitive_and_malformed_header_rejected(
    channel: grpc.aio.Channel,
) -> None:
    metadata = (("authorization", f"bEaReR   {token('pay_module')}"),)
    await call(channel, ASSIGNMENT + "Assign", metadata)
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", token("pay_module")):
        err, _, _ = await fails(
            call(channel, ASSIGNMENT + "Assign", (("authorization", header),)),
            grpc.StatusCode.UNAUTHENTICATED,
            "ERROR_REASON_TOKEN_INVALID",
        )
        assert "Bearer <token>" in err.details()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: dict[str, Any]) -> str:
    return _b64(json.dumps(obj).encode())


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "mallory", "roles": ["ops_admin"], "iat": now, "exp": now + 600}
    claims |= {"aud": AUDIENCE, "iss": ISSUER, **overrides}
    return {k: v for k, v in claims.items() if v is not None}


def _tampered() -> str:
    header, _, signature = token("data_science").split(".")
    return f"{header}.{_segment(_claims())}.{signature}"


ATTACKS = [
    pytest.param(
        lambda: token("ops_admin", exp=None), "ERROR_REASON_TOKEN_INVALID", id="missing-exp"
    ),
    pytest.param(
        lambda: token("ops_admin", exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
        "ERROR_REASON_TOKEN_EXPIRED",
        id="expired",
    ),
    pytest.param(
        lambda: token("ops_admin", nbf=int(time.time()) + 3600),
        "ERROR_REASON_TOKEN_EXPIRED",
        id="not-yet-valid",
    ),
    pytest.param(
        lambda: token("ops_admin", aud="other"), "ERROR_REASON_TOKEN_INVALID", id="wrong-aud"
    ),
    pytest.param(
        lambda: token("ops_admin", iss="evil"), "ERROR_REASON_TOKEN_INVALID", id="wrong-iss"
    ),
    pytest.param(
        lambda: f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(_claims())}.",
        "ERROR_REASON_TOKEN_INVALID",
        id="alg-none",
    ),
    pytest.param(_tampered, "ERROR_REASON_TOKEN_INVALID", id="tampered"),
    pytest.param(lambda: "not.a.jwt", "ERROR_REASON_TOKEN_INVALID", id="garbage"),
    pytest.param(
        lambda: jwt.encode(_claims(), "wrong-secret-" + "w" * 40, algorithm="HS256"),
        "ERROR_REASON_TOKEN_INVALID",
        id="wrong-secret",
    ),
    pytest.param(
        lambda: token("ops_admin", roles=[1]), "ERROR_REASON_TOKEN_INVALID", id="bad-roles"
    ),
]


@pytest.mark.parametrize(("make_token", "reason"), ATTACKS)
async def test_jwt_attacks_are_unauthenticated(
    channel: grpc.aio.Channel, make_token: Callable[[], str], reason: str
) -> None:
    err, info, _ = await fails(
        call(channel, LIFECYCLE + "DeleteExperiment", bearer(make_token())),
        grpc.StatusCode.UNAUTHENTICATED,
        reason,
    )
    assert SECRET not in err.details()
    assert dict(info.metadata) == {}


def _pems(key: Any) -> tuple[str, str]:
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@pytest.mark.parametrize(
    ("algorithm", "make_key"),
    [
        ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ],
)
async def test_asymmetric_tokens_and_algorithm_confusion(
    algorithm: str, make_key: Callable[[], Any]
) -> None:
    private, public = _pems(make_key())
    verifier = TokenVerifier(JwtSettings(algorithm=algorithm, public_key=public, audience=AUDIENCE))
    async with serving(verifier) as ch:
        good = mint_token(
            private, subject="ops", roles=["ops_admin"], algorithm=algorithm, audience=AUDIENCE
        )
        done = await call(ch, LIFECYCLE + "DeleteExperiment", bearer(good))
        assert dict(await done.trailing_metadata())["x-subject"] == "ops"

        # HS256 token keyed with the server's public key (algorithm confusion).
        signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT'})}.{_segment(_claims())}"
        mac = hmac.new(public.encode(), signing_input.encode(), hashlib.sha256).digest()
        err, _, _ = await fails(
            call(ch, LIFECYCLE + "DeleteExperiment", bearer(f"{signing_input}.{_b64(mac)}")),
            grpc.StatusCode.UNAUTHENTICATED,
            "ERROR_REASON_TOKEN_INVALID",
        )
        assert algorithm in err.details()


# --- errors over the wire ---------------------------------------------------------------------


def _get(channel: grpc.aio.Channel, fault: str) -> Any:
    return call(
        channel,
        LIFECYCLE + "GetExperiment",
        bearer(token("data_science")),
        lifecycle_service_pb2.GetExperimentRequest(experiment=fault),
    )


async def test_not_found_carries_error_info(channel: grpc.aio.Channel) -> None:
    err, info, others = await fails(
        _get(channel, "not-found"), grpc.StatusCode.NOT_FOUND, "ERROR_REASON_EXPERIMENT_NOT_FOUND"
    )
    assert err.details() == "experiment 'exp-9' does not exist"
    assert dict(info.metadata) == {"experiment": "exp-9"}
    assert others == []


async def test_invalid_argument_carries_field_violations(channel: grpc.aio.Channel) -> None:
    err, _, others = await fails(
        _get(channel, "invalid"), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_ARGUMENT"
    )
    assert err.details().startswith("invalid request: experiment.key: must match")
    [bad] = others
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("experiment.key", "must match [a-z0-9_-]{1,64}"),
        ("experiment.variants[1].weight", "must be > 0"),
    ]


@pytest.mark.parametrize(
    ("fault", "code", "reason", "metadata"),
    [
        (
            "state",
            grpc.StatusCode.FAILED_PRECONDITION,
            "ERROR_REASON_INVALID_EXPERIMENT_STATE",
            {"experiment": "e", "status": "RUNNING", "allowed_statuses": "DRAFT"},
        ),
        (
            "unavailable",
            grpc.StatusCode.UNAVAILABLE,
            "ERROR_REASON_STORE_UNAVAILABLE",
            {"store": "postgres"},
        ),
        ("bare", grpc.StatusCode.INTERNAL, "ERROR_REASON_UNSPECIFIED", {}),
    ],
)
async def test_sira_errors_map_to_their_status(
    channel: grpc.aio.Channel,
    fault: str,
    code: grpc.StatusCode,
    reason: str,
    metadata: dict[str, str],
) -> None:
    _, info, _ = await fails(_get(channel, fault), code, reason)
    assert dict(info.metadata) == metadata


async def test_unexpected_exception_is_internal_and_logged(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="sira_server.api"):
        err, info, _ = await fails(
            _get(channel, "boom"), grpc.StatusCode.INTERNAL, "ERROR_REASON_INTERNAL"
        )
    request_id = info.metadata["request_id"]
    assert err.details() == f"internal error; see server logs (request id {request_id})"
    assert "hunter2" not in err.details()
    [record] = [r for r in caplog.records if r.name == "sira_server.api"]
    assert request_id in record.getMessage()
    assert LIFECYCLE + "GetExperiment" in record.getMessage()
    assert record.exc_info is not None
    assert "hunter2" in caplog.text  # the traceback is in the log, not on the wire


async def test_servicer_abort_passes_through(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _get(channel, "abort")
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert info.value.details() == "servicer aborted on its own"
    assert rpc_status.from_call(info.value) is None


async def test_principal_reaches_the_servicer(channel: grpc.aio.Channel) -> None:
    done = await call(
        channel,
        INSIGHTS + "GetInsights",
        bearer(token("data_science", "marketing", subject="dana")),
    )
    trailing = dict(await done.trailing_metadata())
    assert trailing["x-subject"] == "dana"
    assert trailing["x-roles"] == "data_science,marketing"


# --- streaming shapes and methods outside the table --------------------------------------------


async def drain(result: Any, sink: list[Any] | None = None) -> None:
    """Finish a unary (awaitable) or streaming (async iterable) call."""
    if hasattr(result, "__aiter__"):
        async for message in result:
            if sink is not None:
                sink.append(message)
    else:
        await result


def _raw(channel: grpc.aio.Channel, kind: str, name: str) -> Any:
    return getattr(channel, kind)(f"/{STREAM_SERVICE}/{name}")


@contextlib.asynccontextmanager
async def error_guarded_streams() -> AsyncIterator[grpc.aio.Channel]:
    """The raw streaming handlers behind the error guard alone (they are outside the
    RBAC table, so the auth guard would refuse them all)."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((stream_handlers(ErrorGuard()),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def test_the_error_guard_wraps_every_cardinality() -> None:
    async with error_guarded_streams() as ch:
        unary_stream = _raw(ch, "unary_stream", "UnaryStream")
        assert [m async for m in unary_stream(b"ok")] == [b"first", b"second"]
        got: list[bytes] = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await drain(unary_stream(b"fail"), got)
        assert got == [b"first"]
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert rich(info.value)[0].metadata["experiment"] == "s"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in unary_stream(b"boom"):
                pass
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert rich(info.value)[0].reason == "ERROR_REASON_INTERNAL"

        writer = _raw(ch, "unary_stream", "WriterStream")
        assert [m async for m in writer(b"ok")] == [b"written"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in writer(b"fail"):
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        stream_unary = _raw(ch, "stream_unary", "StreamUnary")
        assert await stream_unary(iter([b"a", b"b"])) == b"a|b"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream_unary(iter([b"a", b"fail"]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        [bad] = rich(info.value)[1]
        assert bad.field_violations[0].field == "events[1]"

        stream_stream = _raw(ch, "stream_stream", "StreamStream")
        assert [m async for m in stream_stream(iter([b"x", b"y"]))] == [b"X", b"Y"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stream_stream(iter([b"x", b"fail"])):
                pass
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        sync_unary = _raw(ch, "unary_unary", "SyncUnary")
        assert await sync_unary(b"abc") == b"cba"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await sync_unary(b"boom")
        assert info.value.code() == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    ("kind", "name", "request_"),
    [
        ("unary_unary", "SyncUnary", b"abc"),
        ("unary_stream", "UnaryStream", b"ok"),
        ("stream_unary", "StreamUnary", iter([b"a"])),
        ("stream_stream", "StreamStream", iter([b"a"])),
    ],
)
async def test_methods_outside_the_table_are_denied(
    channel: grpc.aio.Channel, kind: str, name: str, request_: Any
) -> None:
    """Fail closed: a served method with no RBAC entry is refused even to ops_admin."""
    multi = _raw(channel, kind, name)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await drain(multi(request_, metadata=bearer(token(*ALL_ROLES))))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    error_info, _ = rich(info.value)
    assert error_info.reason == "ERROR_REASON_ROLE_NOT_ALLOWED"
    assert error_info.metadata["method"] == f"/{STREAM_SERVICE}/{name}"


async def test_unknown_method_is_unimplemented(channel: grpc.aio.Channel) -> None:
    multi = channel.unary_unary(LIFECYCLE + "NoSuchRpc")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await multi(b"", metadata=bearer(token("ops_admin")))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_the_guards_nest_errors_then_auth_then_edge(channel: grpc.aio.Channel) -> None:
    """Auth runs before the edge check (a stranger learns nothing about the rules), and
    the error guard outside both turns their SiraErrors into rich statuses."""
    bad = lifecycle_service_pb2.GetExperimentRequest(experiment="\x00")
    await fails(
        call(channel, LIFECYCLE + "GetExperiment", request=bad),
        grpc.StatusCode.UNAUTHENTICATED,
        "ERROR_REASON_TOKEN_MISSING",
    )
    await fails(
        call(channel, LIFECYCLE + "GetExperiment", bearer(token("pay_module")), bad),
        grpc.StatusCode.PERMISSION_DENIED,
        "ERROR_REASON_ROLE_NOT_ALLOWED",
    )
    _, _, others = await fails(
        call(channel, LIFECYCLE + "GetExperiment", bearer(token("data_science")), bad),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_ARGUMENT",
    )
    assert [v.field for v in others[0].field_violations] == ["experiment"]


class CountingGuard(Guard):
    """An inner guard (the `limits` seam) that counts how often each method is wrapped."""

    def __init__(self) -> None:
        self.wrapped: Counter[str] = Counter()

    def handler(self, handler: Any, method: str) -> Any:
        self.wrapped[method] += 1
        return handler


async def test_methods_are_wrapped_at_registration_not_per_call() -> None:
    counting = CountingGuard()
    async with serving(TokenVerifier(SETTINGS), limits=counting) as ch:
        await call(ch, TRACKING + "Track", bearer(token("pay_module")))
        registered = Counter(counting.wrapped)
        assert registered[TRACKING + "Track"] >= 1
        for _ in range(3):
            await call(ch, TRACKING + "Track", bearer(token("pay_module")))
            await call(ch, TRACKING + "Track")
    assert counting.wrapped == registered


async def test_the_edge_check_runs_before_any_servicer(channel: grpc.aio.Channel) -> None:
    """Control characters and undecodable bytes: INVALID_ARGUMENT before any servicer."""
    bad = tracking_service_pb2.TrackRequest(
        event=tracking_service_pb2.TrackedEvent(subject_id="\x00")
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(channel, TRACKING + "Track", request=bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, details = rich(info.value)
    assert [v.field for v in details[0].field_violations] == ["event.subject_id"]
    raw = channel.unary_unary(TRACKING + "Track")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw(b"\xff\xff\xff")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
