"""Allocation and P(best) over time: points recorded by the server's background rounds
(a real server, as the least-privileged role, with a short interval), read back through
GetInsightsHistory in order; who may read them; bad input; two autopilots on one
database recording a point once; at most MAX_KEPT_POINTS points kept."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from fault_stores import free_port, own_redis_server
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from server_fixtures import RunningServer, create_migrated_database, drop_database, run_sira_server
from test_autopilot import Engine, engine, running_experiment, seed_counters

from sira.experiments.v1 import assignment_service_pb2 as apb
from sira.experiments.v1 import (
    assignment_service_pb2_grpc,
    insights_service_pb2_grpc,
    lifecycle_service_pb2_grpc,
)
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import insights_service_pb2 as ipb
from sira.experiments.v1 import lifecycle_service_pb2 as lpb
from sira_server.domain.validation import ExperimentInput, VariantInput, validate_experiment
from sira_server.engine.autopilot import FailFastAutopilot
from sira_server.store.insights_history import MAX_KEPT_POINTS, VariantPoint, record_point
from sira_server.store.roles import as_role

__all__ = ["engine"]  # the fixture, shared with test_autopilot.py

TokenFor = Callable[..., str]
INTERVAL_SECONDS = 0.5
DEADLINE_SECONDS = 60.0
SUBJECTS = 60


@pytest.fixture(scope="module")
async def history_database(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_history")
    try:
        yield url
    finally:
        await drop_database(postgres_server_dsn, url)


@pytest.fixture(scope="module")
def history_server(
    history_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A server of its own recording a point every INTERVAL_SECONDS, as sira_app."""
    with (
        own_redis_server() as redis_url,
        run_sira_server(
            as_role(history_database),
            redis_url,
            tmp_path_factory.mktemp("sira-history"),
            {
                "SIRA_INSIGHTS_HISTORY_SECONDS": str(INTERVAL_SECONDS),
                "SIRA_METRICS_PORT": str(free_port()),
            },
        ) as server,
    ):
        yield server


@dataclass
class Api:
    lifecycle: lifecycle_service_pb2_grpc.LifecycleServiceStub
    assignment: assignment_service_pb2_grpc.AssignmentServiceStub
    insights: insights_service_pb2_grpc.InsightsServiceStub
    token_for: TokenFor

    def auth(self, role: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token_for(role, role)}"),)

    async def history(
        self, request: ipb.GetInsightsHistoryRequest, role: str = "data_science"
    ) -> ipb.GetInsightsHistoryResponse:
        reply: ipb.GetInsightsHistoryResponse = await self.insights.GetInsightsHistory(
            request, metadata=self.auth(role)
        )
        return reply


@pytest.fixture
async def api(history_server: RunningServer, token_for: TokenFor) -> AsyncIterator[Api]:
    async with grpc.aio.insecure_channel(history_server.address) as channel:
        yield Api(
            lifecycle_service_pb2_grpc.LifecycleServiceStub(channel),
            assignment_service_pb2_grpc.AssignmentServiceStub(channel),
            insights_service_pb2_grpc.InsightsServiceStub(channel),
            token_for,
        )


async def started(api: Api, key: str, **fields: object) -> epb.Experiment:
    experiment = epb.Experiment(key=key, name="History", **fields)  # type: ignore[arg-type]
    experiment.variants.add(key="a", name="A", is_control=True)
    experiment.variants.add(key="b", name="B")
    experiment.variants.add(key="c", name="C")
    await api.lifecycle.CreateExperiment(
        lpb.CreateExperimentRequest(experiment=experiment), metadata=api.auth("marketing")
    )
    reply = await api.lifecycle.StartExperiment(
        lpb.StartExperimentRequest(experiment=key), metadata=api.auth("marketing")
    )
    result: epb.Experiment = reply.experiment
    return result


async def assign(api: Api, key: str, n: int) -> None:
    for i in range(n):
        await api.assignment.Assign(
            apb.AssignRequest(experiment=key, subject_id=f"{key}-{i}"),
            metadata=api.auth("pay_module"),
        )


async def points_until(
    api: Api, key: str, done: Callable[[ipb.GetInsightsHistoryResponse], bool]
) -> ipb.GetInsightsHistoryResponse:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        reply = await api.history(ipb.GetInsightsHistoryRequest(experiment=key))
        if done(reply):
            return reply
        assert time.monotonic() < deadline, f"{len(reply.points)} points so far"
        await asyncio.sleep(0.1)


def error_of(caught: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> tuple[grpc.StatusCode, str]:
    status = rpc_status.from_call(caught.value)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return caught.value.code(), ",".join(fields)


async def test_rounds_record_points_read_back_in_order(api: Api, unique_key: str) -> None:
    experiment = await started(api, unique_key)
    ids = [v.id for v in experiment.variants]
    await assign(api, unique_key, SUBJECTS)

    def enough(reply: ipb.GetInsightsHistoryResponse) -> bool:
        return (
            len(reply.points) >= 3 and sum(v.trials for v in reply.points[-1].variants) == SUBJECTS
        )

    reply = await points_until(api, unique_key, enough)
    assert reply.experiment_id == experiment.id
    assert reply.interval_seconds == INTERVAL_SECONDS
    times = [p.recorded_at.ToNanoseconds() for p in reply.points]
    assert times == sorted(times)
    assert len(set(times)) == len(times)
    step = int(INTERVAL_SECONDS * 1e9)
    assert all(t % step == 0 for t in times)  # truncated to the interval
    for point in reply.points:
        assert [v.variant_id for v in point.variants] == ids
        assert sum(v.prob_best for v in point.variants) == pytest.approx(1.0, abs=1e-6)
        # Thompson sampling: the weights in force are P(best).
        assert [v.allocation for v in point.variants] == [v.prob_best for v in point.variants]
        assert all(v.successes == 0 for v in point.variants)
    trials = [sum(v.trials for v in p.variants) for p in reply.points]
    assert trials == sorted(trials)

    # The latest max_points; `since` is exclusive.
    last_two = await api.history(ipb.GetInsightsHistoryRequest(experiment=unique_key, max_points=2))
    assert len(last_two.points) == 2
    later = [p.recorded_at.ToNanoseconds() for p in last_two.points]
    assert later[0] < later[1]
    assert later[0] >= times[-2]
    since = await api.history(
        ipb.GetInsightsHistoryRequest(
            experiment=unique_key, since=reply.points[0].recorded_at, max_points=1000
        )
    )
    assert [p.recorded_at.ToNanoseconds() for p in since.points][: len(times) - 1] == times[1:]
    # By key or id alike; every reader role may read.
    for role in ("ops_admin", "marketing", "data_science"):
        by_id = await api.history(ipb.GetInsightsHistoryRequest(experiment=experiment.id), role)
        assert by_id.experiment_id == experiment.id


async def test_fixed_weights_record_the_configured_split(api: Api, unique_key: str) -> None:
    experiment = epb.Experiment(
        key=unique_key, name="History", allocation=epb.ALLOCATION_STRATEGY_FIXED_WEIGHTS
    )
    for key, weight in (("a", 1.0), ("b", 1.0), ("c", 2.0)):
        experiment.variants.add(key=key, name=key.upper(), weight=weight, is_control=key == "a")
    await api.lifecycle.CreateExperiment(
        lpb.CreateExperimentRequest(experiment=experiment), metadata=api.auth("marketing")
    )
    await api.lifecycle.StartExperiment(
        lpb.StartExperimentRequest(experiment=unique_key), metadata=api.auth("marketing")
    )
    reply = await points_until(api, unique_key, lambda r: len(r.points) >= 1)
    assert [v.allocation for v in reply.points[0].variants] == [0.25, 0.25, 0.5]


async def test_only_running_experiments_are_recorded(api: Api, unique_key: str) -> None:
    draft = epb.Experiment(key=unique_key, name="History")
    draft.variants.add(key="a", name="A", is_control=True)
    draft.variants.add(key="b", name="B")
    await api.lifecycle.CreateExperiment(
        lpb.CreateExperimentRequest(experiment=draft), metadata=api.auth("marketing")
    )
    # A running one recording two points later, the draft still has none.
    other = await started(api, f"{unique_key}-run")
    first = await points_until(api, other.key, lambda r: len(r.points) >= 1)
    seen = first.points[0].recorded_at.ToNanoseconds()
    await points_until(
        api, other.key, lambda r: r.points[-1].recorded_at.ToNanoseconds() > seen + 1
    )
    reply = await api.history(ipb.GetInsightsHistoryRequest(experiment=unique_key))
    assert list(reply.points) == []


async def test_modules_may_not_read_history(api: Api, unique_key: str) -> None:
    await started(api, unique_key)
    for role in ("pay_module", "connect_module"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.history(ipb.GetInsightsHistoryRequest(experiment=unique_key), role)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.insights.GetInsightsHistory(ipb.GetInsightsHistoryRequest(experiment=unique_key))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_input_is_invalid_argument(api: Api, unique_key: str) -> None:
    await started(api, unique_key)
    bad_since = timestamp_pb2.Timestamp(seconds=0, nanos=-1)
    cases = [
        (ipb.GetInsightsHistoryRequest(experiment=unique_key, max_points=1001), "max_points"),
        (ipb.GetInsightsHistoryRequest(experiment=unique_key, max_points=-1), "max_points"),
        (ipb.GetInsightsHistoryRequest(experiment=""), "experiment"),
        (ipb.GetInsightsHistoryRequest(experiment="x" * 65), "experiment"),
        (ipb.GetInsightsHistoryRequest(experiment="bad\x00key"), "experiment"),
        (ipb.GetInsightsHistoryRequest(experiment=unique_key, since=bad_since), "since"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.history(request)
        assert error_of(caught) == (grpc.StatusCode.INVALID_ARGUMENT, field), request
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.history(ipb.GetInsightsHistoryRequest(experiment=f"{unique_key}-nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- two autopilots on one database ---------------------------------------------------


async def history_rows(pool: asyncpg.Pool, experiment_id: str) -> list[tuple[datetime, str]]:
    rows = await pool.fetch(
        "SELECT recorded_at, variant_id::text AS v FROM insights_history "
        "WHERE experiment_id = $1 ORDER BY recorded_at, variant_id",
        uuid.UUID(experiment_id),
    )
    return [(r["recorded_at"], r["v"]) for r in rows]


async def test_two_replicas_record_a_point_once(engine: Engine) -> None:
    experiment = await running_experiment(engine, auto_stop=False)
    await seed_counters(engine.hot, experiment, [(30, 3), (30, 6), (30, 9)])
    # An interval no test outlives: both rounds fall in the same one.
    long = 10**9

    def replica() -> FailFastAutopilot:
        return FailFastAutopilot(
            engine.catalog, engine.book, engine.repository, engine.pool, history_seconds=long
        )

    first, second = replica(), replica()
    await first.round()
    await second.round()
    await first.round()
    rows = await history_rows(engine.pool, experiment.id)
    assert len(rows) == len(experiment.variants)
    assert len({at for at, _ in rows}) == 1
    trials = await engine.pool.fetch(
        "SELECT trials, successes FROM insights_history WHERE experiment_id = $1",
        uuid.UUID(experiment.id),
    )
    assert sorted((r["trials"], r["successes"]) for r in trials) == [(30, 3), (30, 6), (30, 9)]


async def test_at_most_max_kept_points_are_kept(engine: Engine) -> None:
    experiment = await running_experiment(engine, auto_stop=False)
    variant = experiment.variants[0].id
    start = datetime(2026, 1, 1, tzinfo=UTC)
    await engine.pool.execute(
        "INSERT INTO insights_history "
        "(experiment_id, recorded_at, variant_id, trials, successes, p_best, allocation) "
        "SELECT $1, $2::timestamptz + make_interval(secs => i), $3, i, 0, 0.5, 0.5 "
        "FROM generate_series(1, $4) AS i",
        uuid.UUID(experiment.id),
        start,
        uuid.UUID(variant),
        MAX_KEPT_POINTS + 5,
    )
    newest = start + timedelta(seconds=MAX_KEPT_POINTS + 10)
    async with engine.pool.acquire() as conn:
        await record_point(conn, experiment.id, newest, [VariantPoint(variant, 1, 0, 0.5, 0.5)])
    rows = await history_rows(engine.pool, experiment.id)
    assert len(rows) == MAX_KEPT_POINTS
    assert rows[-1][0] == newest
    assert rows[0][0] == start + timedelta(seconds=7)  # the 6 oldest pruned


async def test_deleting_an_experiment_deletes_its_points(
    api: Api, unique_key: str, history_database: str
) -> None:
    experiment = await started(api, unique_key)
    await points_until(api, unique_key, lambda r: len(r.points) >= 1)
    admin = api.auth("ops_admin")
    await api.lifecycle.StopExperiment(
        lpb.StopExperimentRequest(experiment=unique_key, reason="done"), metadata=admin
    )
    await api.lifecycle.DeleteExperiment(
        lpb.DeleteExperimentRequest(experiment=unique_key), metadata=admin
    )
    conn = await asyncpg.connect(history_database)
    try:
        left = await conn.fetchval(
            "SELECT count(*) FROM insights_history WHERE experiment_id = $1",
            uuid.UUID(experiment.id),
        )
    finally:
        await conn.close()
    assert left == 0


async def test_a_lagging_catalog_skips_a_deleted_experiment(engine: Engine) -> None:
    gone = await running_experiment(engine, auto_stop=False)
    spec = validate_experiment(
        ExperimentInput(
            key="kept",
            name="Kept",
            variants=[
                VariantInput(name="A", config={}, is_control=True),
                VariantInput(name="B", config={}),
            ],
        )
    )
    created = await engine.repository.create(spec, actor="mia")
    kept = await engine.repository.start(created.id, actor="mia")
    # Deleted behind this process's back: its catalog still lists it as running.
    await engine.pool.execute("DELETE FROM experiments WHERE id = $1", uuid.UUID(gone.id))
    await engine.autopilot.round()
    assert await history_rows(engine.pool, gone.id) == []
    assert len(await history_rows(engine.pool, kept.id)) == len(kept.variants)
