"""Browser calls pass the same limits and are counted by the same metrics as gRPC calls
(they are forwarded into the same guarded handlers), and a configured CORS origin, and
only that one, may call from another site. One server of this module's own, with a
small rate limit for data_science and one CORS origin."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
import redis
from fault_stores import free_port
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from http_protocol import Failure, connect_call, grpc_call
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import (
    RunningServer,
    create_migrated_database,
    drop_database,
    mint_test_token,
    redis_url_with_db,
    run_sira_server,
)

from sira.experiments.v1 import lifecycle_service_pb2 as lpb

LIST = "/sira.experiments.v1.LifecycleService/ListExperiments"
ALLOWED_ORIGIN = "https://ops.example.com"


METRICS_PORT = free_port()
REDIS_DB = 5
"""Of the session's own redis-server (no other test file uses it); emptied first."""


@pytest.fixture(scope="module")
async def server(
    postgres_server_dsn: str, server_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    database = await create_migrated_database(postgres_server_dsn, "sira_http_limits")
    redis_url = redis_url_with_db(server_redis_url, REDIS_DB)
    redis.Redis.from_url(redis_url).flushdb()
    try:
        with run_sira_server(
            database,
            redis_url,
            tmp_path_factory.mktemp("http-limits"),
            extra_env={
                # data_science: 3 calls, then one more per 1000 s (no timing involved).
                "SIRA_RATE_LIMITS": "data_science=0.001/3/8",
                "SIRA_METRICS_PORT": str(METRICS_PORT),
                "SIRA_HTTP_CORS_ORIGINS": ALLOWED_ORIGIN,
            },
        ) as running:
            yield running
    finally:
        await drop_database(postgres_server_dsn, database)


@pytest.fixture
async def http(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    assert server.http_url is not None
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as client:
        yield client


def rpc_count(method: str, code: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "sira_rpc_total"
                and sample.labels.get("method") == method
                and sample.labels.get("code") == code
            ):
                return float(sample.value)
    return 0.0


async def test_browser_calls_are_counted_like_grpc_calls(http: httpx.AsyncClient) -> None:
    before_ok = rpc_count(LIST, "OK")
    before_refused = rpc_count(LIST, "UNAUTHENTICATED")
    token = mint_test_token("ops_admin")
    answer = await connect_call(
        http, LIST, lpb.ListExperimentsRequest(), lpb.ListExperimentsResponse, token=token
    )
    assert not isinstance(answer, Failure), answer
    refused = await connect_call(
        http, LIST, lpb.ListExperimentsRequest(), lpb.ListExperimentsResponse, codec="json"
    )
    assert isinstance(refused, Failure)
    assert rpc_count(LIST, "OK") == before_ok + 1
    assert rpc_count(LIST, "UNAUTHENTICATED") == before_refused + 1


async def test_the_rate_limit_counts_browser_and_grpc_calls_together(
    http: httpx.AsyncClient, server: RunningServer
) -> None:
    token = mint_test_token("data_science", subject="dana")
    request = lpb.ListExperimentsRequest()
    async with grpc.aio.insecure_channel(server.address) as channel:
        outcomes = [
            await connect_call(http, LIST, request, lpb.ListExperimentsResponse, token=token),
            await grpc_call(channel, LIST, request, lpb.ListExperimentsResponse, token=token),
            await connect_call(
                http, LIST, request, lpb.ListExperimentsResponse, token=token, codec="json"
            ),
        ]
        assert not any(isinstance(o, Failure) for o in outcomes), outcomes
        over_http = await connect_call(
            http, LIST, request, lpb.ListExperimentsResponse, token=token
        )
        over_grpc = await grpc_call(
            channel, LIST, request, lpb.ListExperimentsResponse, token=token
        )
    for refused in (over_http, over_grpc):
        assert isinstance(refused, Failure), refused
        assert refused.code == "resource_exhausted"
        assert refused.detail(error_details_pb2.ErrorInfo).reason == "ERROR_REASON_RATE_LIMITED"
        retry = refused.detail(error_details_pb2.RetryInfo)
        assert retry.retry_delay.seconds > 0


async def test_a_configured_origin_may_call_and_no_other(http: httpx.AsyncClient) -> None:
    def preflight(origin: str) -> dict[str, str]:
        return {
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type,connect-protocol-version",
        }

    allowed = await http.options(LIST, headers=preflight(ALLOWED_ORIGIN))
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()

    token = mint_test_token("ops_admin")
    called = await http.post(
        LIST,
        content=b"{}",
        headers={
            "origin": ALLOWED_ORIGIN,
            "content-type": "application/json",
            "authorization": f"Bearer {token}",
        },
    )
    assert called.status_code == 200, called.text
    assert called.headers["access-control-allow-origin"] == ALLOWED_ORIGIN

    refused = await http.options(LIST, headers=preflight("https://evil.example"))
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers
