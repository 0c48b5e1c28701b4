"""Minimal reproducers of what the fuzz suite found before the edge validation (issue 7).

Each answered INTERNAL or UNKNOWN (or lost an acknowledged record) on the code
before the fix; each must stay INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import time

import grpc
import pytest
import redis
from server_fixtures import RunningServer

from sira.experiments.v1 import (
    assignment_service_pb2,
    assignment_service_pb2_grpc,
    experiment_pb2,
    lifecycle_service_pb2,
    lifecycle_service_pb2_grpc,
)
from sira_server.store.hot_keys import experiment_keys


def _auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
def channel(sira_server: RunningServer) -> grpc.Channel:
    with grpc.insecure_channel(sira_server.address) as channel:
        yield channel


def test_nul_in_a_reference_is_invalid_argument(channel: grpc.Channel, token_for) -> None:  # type: ignore[no-untyped-def]
    stub = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
    request = lifecycle_service_pb2.GetExperimentRequest(experiment="\x00")
    code = _code(lambda: stub.GetExperiment(request, metadata=_auth(token_for("ops_admin"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_nul_in_a_stop_reason_is_invalid_argument(  # type: ignore[no-untyped-def]
    channel: grpc.Channel, token_for, unique_key: str
) -> None:
    stub = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
    admin = _auth(token_for("ops_admin"))
    experiment = experiment_pb2.Experiment(key=unique_key, name="N")
    experiment.variants.add(key="a", name="A", is_control=True)
    experiment.variants.add(key="b", name="B")
    stub.CreateExperiment(
        lifecycle_service_pb2.CreateExperimentRequest(experiment=experiment), metadata=admin
    )
    stub.StartExperiment(
        lifecycle_service_pb2.StartExperimentRequest(experiment=unique_key), metadata=admin
    )
    request = lifecycle_service_pb2.StopExperimentRequest(experiment=unique_key, reason="\x00")
    code = _code(lambda: stub.StopExperiment(request, metadata=admin))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_undecodable_bytes_are_invalid_argument(channel: grpc.Channel, token_for) -> None:  # type: ignore[no-untyped-def]
    raw = channel.unary_unary(
        "/sira.experiments.v1.LifecycleService/GetExperiment",
        request_serializer=None,
        response_deserializer=None,
    )
    # Field 1 (experiment, a string) holding invalid UTF-8.
    try:
        raw(b"\x0a\x02\xc3\x28", metadata=_auth(token_for("ops_admin")))
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    else:
        code, details = grpc.StatusCode.OK, ""
    # Also allowed (issue 7, point 3): gRPC's own "failed to deserialize", without a traceback.
    assert code == grpc.StatusCode.INVALID_ARGUMENT or (
        code == grpc.StatusCode.INTERNAL and "deserializ" in details
    )


def test_a_forged_page_token_is_invalid_argument(channel: grpc.Channel, token_for) -> None:  # type: ignore[no-untyped-def]
    stub = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
    forged = base64.urlsafe_b64encode(b'{"q":"audit:","i":9223372036854775808}').decode()
    request = lifecycle_service_pb2.ListAuditEventsRequest(page_token=forged)
    code = _code(lambda: stub.ListAuditEvents(request, metadata=_auth(token_for("ops_admin"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_an_acknowledged_assignment_is_never_dead_lettered(  # type: ignore[no-untyped-def]
    channel: grpc.Channel, sira_server: RunningServer, token_for, unique_key: str
) -> None:
    admin = _auth(token_for("ops_admin"))
    lifecycle = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
    experiment = experiment_pb2.Experiment(key=unique_key, name="N")
    experiment.variants.add(key="a", name="A", is_control=True)
    experiment.variants.add(key="b", name="B")
    created = lifecycle.CreateExperiment(
        lifecycle_service_pb2.CreateExperimentRequest(experiment=experiment), metadata=admin
    ).experiment
    lifecycle.StartExperiment(
        lifecycle_service_pb2.StartExperimentRequest(experiment=unique_key), metadata=admin
    )
    request = assignment_service_pb2.AssignAllRequest(subject_id="s")
    request.context.attributes["a"] = "\x00"
    stub = assignment_service_pb2_grpc.AssignmentServiceStub(channel)
    code = _code(lambda: stub.AssignAll(request, metadata=_auth(token_for("pay_module"))))
    if code != grpc.StatusCode.OK:
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # the fix: refused at the edge
        return
    # If it is ever accepted again, Postgres must take the record: nothing dead-lettered.
    client = redis.Redis.from_url(sira_server.env["SIRA_REDIS_URL"])
    keys = experiment_keys(created.id)
    deadline = time.monotonic() + 30
    while client.xlen(keys.wb) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.xlen(keys.dead) == 0


def test_nan_in_a_variant_config_is_invalid_argument(  # type: ignore[no-untyped-def]
    channel: grpc.Channel, token_for, unique_key: str
) -> None:
    stub = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
    experiment = experiment_pb2.Experiment(key=unique_key, name="N")
    experiment.variants.add(key="a", name="A", is_control=True).config.update({"x": float("nan")})
    experiment.variants.add(key="b", name="B")
    request = lifecycle_service_pb2.CreateExperimentRequest(experiment=experiment)
    code = _code(lambda: stub.CreateExperiment(request, metadata=_auth(token_for("ops_admin"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
