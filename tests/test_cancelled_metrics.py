"""Metrics count what was stored, also for calls their client cancelled mid-flight.

A real sira-server with a redis-server of its own, so the test may hold every write
script with CLIENT PAUSE WRITE (never done to the shared Redis): Assign and Track
calls are then in flight inside the server, their scripts queued in Redis, when the
client cancels them. Once Redis resumes, the scripts run: GetResults counts their
work, and the counters must say exactly the same. The RPCs themselves are counted
in sira_rpc_total with the code CANCELLED.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from fault_stores import free_port, own_redis_server
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import (
    RunningServer,
    create_migrated_database,
    drop_database,
    mint_test_token,
    run_sira_server,
)

from sira import AsyncClient, tracked_event
from sira.experiments.v1 import assignment_service_pb2 as apb
from sira.experiments.v1 import assignment_service_pb2_grpc, tracking_service_pb2_grpc
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import tracking_service_pb2 as tpb

pytestmark = pytest.mark.slow

DEADLINE_SECONDS = 60.0
IN_FLIGHT = 12
ASSIGN = "/sira.experiments.v1.AssignmentService/Assign"
TRACK = "/sira.experiments.v1.TrackingService/Track"


@pytest.fixture
async def database(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_cancel")
    try:
        yield url
    finally:
        await drop_database(postgres_server_dsn, url)


class Server:
    def __init__(self, running: RunningServer, redis_url: str, metrics_port: int) -> None:
        self.running = running
        self.redis_url = redis_url
        self.metrics_port = metrics_port


@pytest.fixture
def server(database: str) -> Iterator[Server]:
    data_dir = Path(tempfile.mkdtemp(prefix="sira-cancel-"))
    port = free_port()
    try:
        with (
            own_redis_server() as redis_url,
            run_sira_server(
                database, redis_url, data_dir, extra_env={"SIRA_METRICS_PORT": str(port)}
            ) as running,
        ):
            yield Server(running, redis_url, port)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def counter(server: Server, name: str, **labels: str) -> float:
    samples = await asyncio.to_thread(scrape, server.metrics_port)
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    """Wait for a condition the server reaches by itself (deadline, then fail)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.05)


async def scripts_held(redis: aioredis.Redis) -> bool:
    """Some EVALSHA is waiting in Redis behind CLIENT PAUSE WRITE."""
    clients = await redis.client_list()
    return any(c["cmd"] == "evalsha" and "b" in c["flags"] for c in clients)


async def cancel_in_flight(
    server: Server, method: str, start: Callable[[int], grpc.aio.Call]
) -> None:
    """While Redis holds every write: start one call and wait until its script is queued
    in Redis (the server will apply it), cancel it and wait until the server counts it
    CANCELLED; then start and cancel more calls (wherever they are by then: not yet
    received, waiting in the server, or queued in Redis) and let Redis go."""
    redis = aioredis.Redis.from_url(server.redis_url, decode_responses=True)
    try:
        before = await counter(server, "sira_rpc_total", method=method, code="CANCELLED")
        await redis.execute_command("CLIENT", "PAUSE", int(DEADLINE_SECONDS * 1000), "WRITE")
        try:
            first = start(0)
            await until("its script held in Redis", lambda: scripts_held(redis))
            first.cancel()

            async def counted_cancelled() -> bool:
                now = await counter(server, "sira_rpc_total", method=method, code="CANCELLED")
                return now == before + 1

            await until(f"{method} counted CANCELLED", counted_cancelled)
            others = [start(i) for i in range(1, IN_FLIGHT)]
            for call in others:
                call.cancel()
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
        for call in (first, *others):
            with pytest.raises(asyncio.CancelledError):
                await call
    finally:
        await redis.aclose()


async def test_cancelled_assign_and_track_count_exactly_what_was_stored(server: Server) -> None:
    address = server.running.address
    pay_token = mint_test_token("pay_module", "pay")
    auth = (("authorization", f"Bearer {pay_token}"),)
    key = f"cancel-{uuid.uuid4().hex[:8]}"
    async with (
        AsyncClient(address, token=mint_test_token("ops_admin")) as admin,
        AsyncClient(address, token=pay_token) as pay,
        grpc.aio.insecure_channel(address) as channel,
    ):
        created = await admin.create_experiment(
            epb.Experiment(
                key=key,
                name="cancelled calls",
                variants=[epb.Variant(name="A", is_control=True), epb.Variant(name="B")],
            )
        )
        exp = await admin.start_experiment(created.id)
        assign = assignment_service_pb2_grpc.AssignmentServiceStub(channel).Assign
        track = tracking_service_pb2_grpc.TrackingServiceStub(channel).Track

        async def assigned_and_counted() -> tuple[int, float]:
            results = await admin.get_results(key)
            stored = sum(v.assigned_subjects for v in results.variants)
            counted = await counter(server, "experiment_assignments_total", experiment_id=exp.id)
            return stored, counted

        async def converted_and_counted() -> tuple[int, float]:
            results = await admin.get_results(key)
            stored = sum(v.conversions for v in results.variants)
            counted = await counter(
                server, "experiment_metrics_total", experiment_id=exp.id, event_type="conversion"
            )
            return stored, counted

        # --- Assign ---
        await cancel_in_flight(
            server,
            ASSIGN,
            lambda i: assign(
                apb.AssignRequest(experiment=key, subject_id=f"gone-{i}"), metadata=auth
            ),
        )
        variants = {f"s{i}": (await pay.assign(key, f"s{i}")).variant.id for i in range(IN_FLIGHT)}

        async def assign_settled() -> bool:
            stored, counted = await assigned_and_counted()
            return stored == counted

        await until("assignments stored == counted", assign_settled)
        stored, counted = await assigned_and_counted()
        answered = await counter(server, "sira_rpc_total", method=ASSIGN, code="OK")
        assert stored == counted
        # The first cancelled call stored an assignment and was never answered OK
        # (a later one may have been answered before its cancellation arrived).
        assert stored > answered >= IN_FLIGHT

        # --- Track ---
        await cancel_in_flight(
            server,
            TRACK,
            lambda i: track(
                tpb.TrackRequest(
                    event=tracked_event(
                        experiment=key,
                        subject_id=f"s{i}",
                        variant_id=variants[f"s{i}"],
                        client_event_id=f"conv-{i}",
                    )
                ),
                metadata=auth,
            ),
        )
        await pay.track(
            tracked_event(
                experiment=key, subject_id="s0", variant_id=variants["s0"], client_event_id="x"
            )
        )

        async def track_settled() -> bool:
            stored, counted = await converted_and_counted()
            return stored == counted

        await until("conversions stored == counted", track_settled)
        stored, counted = await converted_and_counted()
        answered = await counter(server, "sira_rpc_total", method=TRACK, code="OK")
        assert stored == counted
        assert stored > answered >= 1
    assert "Traceback" not in server.running.log()
