"""An unauthenticated flood, as a hostile caller would send it, against the real server.

Each test is a finding of issue 7 that the server failed before tracking tokens, caps
and limits: Track without a token accepted any guessed (subject, variant), refunds
without a token wiped successes, error reasons revealed enrolment, TrackBatch took
thousands of events at once, unknown references grew memory without bound, no rate
limit existed and requests of any size were read.

The module's server runs with small limits (see `ENV`) on this run's own test Redis
database and a database of its own.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from fault_stores import free_port
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import (
    TEST_JWT_SECRET,
    RunningServer,
    create_migrated_database,
    drop_database,
    mint_test_token,
    run_sira_server,
)

from sira import AsyncClient, ResourceExhaustedError, tracked_event
from sira.experiments.v1 import assignment_service_pb2 as apb
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import tracking_service_pb2 as tpb
from sira.experiments.v1 import tracking_service_pb2_grpc
from sira_server.engine.catalog import MISS_CACHE_BYTES, ExperimentCatalog
from sira_server.errors import NotFound
from sira_server.store.experiments import ExperimentRepository
from sira_server.store.postgres import create_pool
from sira_server.tracking_token import TrackingTokens, derive_key

CAP = 3
MAX_REQUEST = 1_100_000
DAY = 24 * 3600


METRICS_PORT = free_port()
ENV = {
    "SIRA_SUBJECT_EVENTS_PER_HOUR": str(CAP),
    # data_science: 3 calls, then one more per 1000 s (sequential calls, no timing).
    "SIRA_RATE_LIMITS": "data_science=0.001/3/8",
    "SIRA_MAX_RECEIVE_MESSAGE_BYTES": str(MAX_REQUEST),
    "SIRA_METRICS_PORT": str(METRICS_PORT),
    "SIRA_MAX_CONNECTION_IDLE_SECONDS": "1",
}


@pytest.fixture(scope="module")
async def database(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_abuse")
    yield url
    await drop_database(postgres_server_dsn, url)


@pytest.fixture(scope="module")
async def server(
    database: str, redis_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    client = aioredis.Redis.from_url(redis_server_url)
    await client.flushdb()
    await client.aclose()
    with run_sira_server(
        database, redis_server_url, tmp_path_factory.mktemp("abuse"), extra_env=ENV
    ) as running:
        yield running


@pytest.fixture
async def admin(server: RunningServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.address, token=mint_test_token("ops_admin")) as client:
        yield client


@pytest.fixture
async def pay(server: RunningServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.address, token=mint_test_token("pay_module")) as client:
        yield client


@pytest.fixture
async def public(
    server: RunningServer,
) -> AsyncIterator[tracking_service_pb2_grpc.TrackingServiceStub]:
    """Raw stubs without any token: what a browser or a script would send."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield tracking_service_pb2_grpc.TrackingServiceStub(channel)


async def running_experiment(admin: AsyncClient) -> epb.Experiment:
    spec = epb.Experiment(
        key=f"abuse-{uuid.uuid4().hex[:10]}",
        name="Abuse",
        variants=[epb.Variant(name="A", is_control=True), epb.Variant(name="B")],
    )
    created = await admin.create_experiment(spec)
    return await admin.start_experiment(created.id)


def conversion(exp: str, subject: str, variant: str, token: str = "", **fields: Any) -> Any:
    fields.setdefault("client_event_id", uuid.uuid4().hex)
    return tracked_event(
        experiment=exp, subject_id=subject, variant_id=variant, tracking_token=token, **fields
    )


Answer = tuple[grpc.StatusCode, str, bytes]


async def answer(call: Callable[[], Any]) -> Answer:
    """Everything a caller sees of a failed call: code, message, status details."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call()
    error = caught.value
    details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
    assert isinstance(details, bytes)
    return error.code(), str(error.details()), details


def reason_of(details: bytes) -> str:
    for packed in status_pb2.Status.FromString(details).details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            return str(info.reason)
    return ""


def retry_delay(details: bytes) -> float | None:
    for packed in status_pb2.Status.FromString(details).details:
        if packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            packed.Unpack(info)
            return float(info.retry_delay.ToNanoseconds() / 1e9)
    return None


def limited_count(limit: str) -> float:
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sira_limited_total" and sample.labels == {"limit": limit}:
                return float(sample.value)
    return 0.0


# --- no proof, no enumeration --------------------------------------------------------


async def test_without_a_jwt_every_failure_is_one_answer_and_nothing_counts(
    admin: AsyncClient,
    pay: AsyncClient,
    public: tracking_service_pb2_grpc.TrackingServiceStub,
) -> None:
    exp, other_exp = await running_experiment(admin), await running_experiment(admin)
    decision = await pay.assign(exp.key, "enrolled")
    other_decision = await pay.assign(other_exp.key, "enrolled")
    real = decision.variant.id
    wrong = next(v.id for v in exp.variants if v.id != real)
    token = decision.tracking_token
    assert token
    assert other_decision.tracking_token
    # A paid conversion first: the refunds below must not take its success away.
    await pay.track(conversion(exp.key, "enrolled", real, value=10.0, currency="EUR"))
    before = list((await admin.get_results(exp.key)).variants)
    successes = [(v.samples, v.conversions) for v in (await admin.get_insights(exp.key)).insights]

    expired = TrackingTokens(derive_key(TEST_JWT_SECRET), 7 * DAY).issue(
        exp.id, "enrolled", real, time.time() - 8 * DAY
    )
    forged_mac = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    big = {"value": 1e9, "currency": "EUR"}
    attempts = {
        "no token, the real assignment": conversion(exp.key, "enrolled", real, **big),
        "no token, by variant key": conversion(exp.key, "enrolled", decision.variant.key),
        "no token, the other variant": conversion(exp.key, "enrolled", wrong),
        "no token, a subject never assigned": conversion(exp.key, "nobody", real),
        "no token, an unknown experiment": conversion(exp.key + "-x", "enrolled", real),
        "no token, an unknown variant": conversion(exp.key, "enrolled", "no-such-variant"),
        "no token, a refund": conversion(
            exp.key, "enrolled", real, event_type=tpb.EVENT_TYPE_REFUND, **big
        ),
        "forged token": conversion(
            exp.key, "enrolled", real, f"v1.{int(time.time())}.{forged_mac}"
        ),
        "token of another subject": conversion(exp.key, "someone-else", real, token),
        "token for the other variant": conversion(exp.key, "enrolled", wrong, token),
        "token of another experiment": conversion(
            exp.key, "enrolled", real, other_decision.tracking_token
        ),
        "expired token": conversion(exp.key, "enrolled", real, expired),
        "garbage token": conversion(exp.key, "enrolled", real, "x" * 100),
    }
    answers = {
        case: await answer(lambda e=event: public.Track(tpb.TrackRequest(event=e)))
        for case, event in attempts.items()
    }
    first = next(iter(answers.values()))
    assert first[0] == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(first[2]) == "ERROR_REASON_TOKEN_INVALID"
    for case, seen in answers.items():
        assert seen == first, case

    batch = await public.TrackBatch(tpb.TrackBatchRequest(events=list(attempts.values())))
    errors = [result.error for result in batch.results]
    assert [r.WhichOneof("result") for r in batch.results] == ["error"] * len(attempts)
    assert all(e == errors[0] for e in errors)
    assert errors[0].code == grpc.StatusCode.UNAUTHENTICATED.value[0]

    assert list((await admin.get_results(exp.key)).variants) == before
    after = [(v.samples, v.conversions) for v in (await admin.get_insights(exp.key)).insights]
    assert after == successes

    # The app holding its token is heard, by id or by key.
    accepted = await public.Track(
        tpb.TrackRequest(event=conversion(exp.key, "enrolled", decision.variant.key, token))
    )
    assert accepted.outcome == tpb.TRACK_OUTCOME_ACCEPTED


async def test_the_readme_app_flow(
    server: RunningServer, admin: AsyncClient, pay: AsyncClient
) -> None:
    exp = await running_experiment(admin)
    d = await pay.assign(exp.key, "user-123")
    page = {"variant": d.variant.key, "experiment": d.experiment_id, "token": d.tracking_token}
    async with AsyncClient(server.address) as app:  # no bearer token
        tracked = await app.track(
            experiment=page["experiment"],
            subject_id="user-123",
            variant_id=page["variant"],
            event_type="conversion",
            client_event_id="order-881",
            tracking_token=page["token"],
        )
    assert tracked.outcome == tpb.TRACK_OUTCOME_ACCEPTED


async def test_assign_all_signs_each_decision(admin: AsyncClient, pay: AsyncClient) -> None:
    exp = await running_experiment(admin)
    decisions = await pay.assign_all("all-1")
    mine = next(d for d in decisions if d.experiment_id == exp.id)
    verify = TrackingTokens(derive_key(TEST_JWT_SECRET), 7 * DAY).verify
    assert verify(mine.tracking_token, exp.id, "all-1", mine.variant.id, time.time())
    assert all(d.tracking_token for d in decisions)


# --- floods ---------------------------------------------------------------------------


async def test_a_flood_with_a_valid_token_is_capped_per_subject_and_counted(
    admin: AsyncClient,
    pay: AsyncClient,
    public: tracking_service_pb2_grpc.TrackingServiceStub,
) -> None:
    exp = await running_experiment(admin)
    decision: apb.Decision = await pay.assign(exp.key, "flooder")
    variant, token = decision.variant.id, decision.tracking_token
    capped_before = limited_count("subject_events")

    flood = [
        conversion(exp.key, "flooder", variant, token, value=1000.0, currency="EUR")
        for _ in range(50)
    ]
    batch = await public.TrackBatch(tpb.TrackBatchRequest(events=flood))  # one hour window
    kinds = [r.WhichOneof("result") for r in batch.results]
    assert kinds == ["accepted"] * CAP + ["error"] * (50 - CAP)
    for result in batch.results[CAP:]:
        assert result.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert result.error.reason == 13  # ERROR_REASON_RATE_LIMITED

    hour = int(time.time() // 3600)
    code, _, details = await answer(lambda: public.Track(tpb.TrackRequest(event=flood[-1])))
    if int(time.time() // 3600) == hour:  # the cap is per clock hour
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(details) == "ERROR_REASON_RATE_LIMITED"
        delay = retry_delay(details)
        assert delay is not None
        assert 0 < delay <= 3600

    # Another event type has its own cap; the service token is not capped.
    churn = conversion(exp.key, "flooder", variant, token, event_type=tpb.EVENT_TYPE_CHURN)
    assert (await public.Track(tpb.TrackRequest(event=churn))).outcome == 1
    for _ in range(5):
        await pay.track(conversion(exp.key, "flooder", variant, value=1.0, currency="EUR"))

    row = next(v for v in (await admin.get_results(exp.key)).variants if v.variant_id == variant)
    assert row.conversions == CAP + 5
    assert limited_count("subject_events") >= capped_before + 50 - CAP + 1


async def test_rate_limit_answers_resource_exhausted_with_retry_info(
    admin: AsyncClient, server: RunningServer
) -> None:
    exp = await running_experiment(admin)
    async with AsyncClient(server.address, token=mint_test_token("data_science", "dan")) as dan:
        for _ in range(3):
            await dan.get_experiment(exp.key)
        for _ in range(3):
            with pytest.raises(ResourceExhaustedError) as caught:
                await dan.get_experiment(exp.key)
            assert caught.value.reason == "ERROR_REASON_RATE_LIMITED"
            assert caught.value.metadata == {"limit": "rate"}
            assert caught.value.retry_after is not None
            assert caught.value.retry_after > 1
    # Another principal of the same role has its own bucket.
    async with AsyncClient(server.address, token=mint_test_token("data_science", "eve")) as eve:
        await eve.get_experiment(exp.key)


async def test_requests_over_the_size_limit_are_not_read(
    public: tracking_service_pb2_grpc.TrackingServiceStub,
) -> None:
    event = conversion("e", "s" * (MAX_REQUEST + 1000), "v")
    code, _, _ = await answer(lambda: public.Track(tpb.TrackRequest(event=event)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_idle_connections_are_closed_by_the_server(
    server: RunningServer, pay: AsyncClient
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        await answer(lambda: stub.Track(tpb.TrackRequest()))  # any answer: connected
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        # The server's GOAWAY after SIRA_MAX_CONNECTION_IDLE_SECONDS moves the channel
        # out of READY; without the limit it would stay connected forever.
        await asyncio.wait_for(
            channel.wait_for_state_change(grpc.ChannelConnectivity.READY), timeout=60
        )
        assert channel.get_state() != grpc.ChannelConnectivity.READY


# --- unknown references ---------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_unknown_megabyte_references_do_not_grow_the_server(
    server: RunningServer,
    pay: AsyncClient,
    public: tracking_service_pb2_grpc.TrackingServiceStub,
) -> None:
    def huge(i: int) -> str:
        return f"missing-{i}-{uuid.uuid4().hex}-" + "x" * 1_000_000

    async def anonymous(i: int) -> None:
        # Refused at the edge (a reference is at most 64 characters), before any lookup:
        # a format error depends on the input alone, so it reveals nothing either.
        event = conversion(huge(i), "s", "v", "v1.1.x")
        code, message, _ = await answer(lambda: public.Track(tpb.TrackRequest(event=event)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert len(message) < 200

    async def authenticated(i: int) -> None:
        # The answer (NOT_FOUND) is not the point here, only what the server keeps.
        with pytest.raises(Exception):  # noqa: B017, PT011
            await pay.track(conversion(huge(i), "s", "v"))

    async def flood() -> None:
        for i in range(40):
            await anonymous(i)
            await authenticated(i)

    # Warm-up: the server's buffers, pools and allocator arenas grow to this size of
    # request once (measured: ~140 MB, then flat); what is kept per request shows after.
    await flood()
    baseline = rss_bytes(server.process.pid)
    await flood()
    grown = rss_bytes(server.process.pid) - baseline
    # Kept before: each reference twice (the key and the error's message), ~160 MB here.
    assert grown < 40 * 1024 * 1024, grown


async def test_remembered_misses_are_bounded_in_bytes_and_peek_remembers_none(
    database: str, redis_server_url: str
) -> None:
    pool = await create_pool(database, max_size=2)
    redis = aioredis.Redis.from_url(redis_server_url)
    try:
        catalog = ExperimentCatalog(ExperimentRepository(pool), pool, redis)
        for i in range(30):
            ref = f"missing-{i}-" + "y" * 100_000
            assert catalog.peek(ref) is None
            assert catalog.miss_cache_bytes == 0 or i > 0
            with pytest.raises(NotFound):
                await catalog.get(ref)
            assert 0 < catalog.miss_cache_bytes <= MISS_CACHE_BYTES
        # A small miss is still remembered (Postgres is spared repeated lookups).
        with pytest.raises(NotFound):
            await catalog.get("small-miss")
        conn: asyncpg.Connection
        async with pool.acquire() as conn:
            await conn.execute("SELECT 1")
        await asyncio.wait_for(pool.close(), 10)
        with pytest.raises(NotFound):  # answered from memory: the pool is closed
            await catalog.get("small-miss")
    finally:
        await redis.aclose()
        pool.terminate()
