"""Three independent `sira-server` replicas on one Redis and one Postgres, called through
gRPC's client-side `round_robin`, behave as one server.

Every test runs twice (the `replicas` fixture's parameter): on one redis-server of the
test's own, and on a real Redis Cluster (3 masters + 3 replicas, the session's
`redis_cluster`, emptied first) with ``SIRA_REDIS_CLUSTER=1``. Checked on both:

- stickiness holds across replicas: a subject asked on each replica gets one variant;
- counters are exact: GetResults counts every subject once, every event once;
- the write-behind is shared: the replicas' flushers are consumers of one group, the
  stream drains, and Postgres ends with exactly the acknowledged rows;
- a replica killed with SIGKILL under load loses nothing it acknowledged: what it read
  from the stream and did not commit is reclaimed by the others, until the stream is
  empty;
- the fail-fast autopilot acts once per step: all three evaluate the same counters, one
  drops the loser and concludes, and the audit log holds each step once;
- each insights-history point is written once, by whichever replica takes the lock.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis
from fault_stores import free_port, own_redis_server
from redis.cluster import RedisCluster
from redis_cluster import LocalRedisCluster
from server_fixtures import (
    RunningServer,
    create_migrated_database,
    drop_database,
    mint_test_token,
    run_sira_server,
)

from sira.experiments.v1 import assignment_service_pb2 as apb
from sira.experiments.v1 import (
    assignment_service_pb2_grpc,
    insights_service_pb2_grpc,
    lifecycle_service_pb2_grpc,
    tracking_service_pb2_grpc,
)
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import insights_service_pb2 as ipb
from sira.experiments.v1 import lifecycle_service_pb2 as lpb
from sira.experiments.v1 import tracking_service_pb2 as tpb
from sira_server.config import CLUSTER_DEFAULT_SHARDS
from sira_server.domain.autopilot import AUTOPILOT_ACTOR
from sira_server.store.hot_keys import FLUSHER_GROUP, HotLayout
from sira_server.store.roles import as_role

pytestmark = pytest.mark.slow

REPLICAS = 3
SUBJECTS = 150
CONVERTING = 50
WAIT_SECONDS = 90.0
HISTORY_SECONDS = 2.0
HISTORY_POINTS = 4  # a killed consumer's entries are reclaimed after 30 s idle


@pytest.fixture
async def database(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_replicas")
    try:
        yield url
    finally:
        await drop_database(postgres_server_dsn, url)


@dataclass
class Replicas:
    """The running replicas and the Redis they share."""

    servers: list[RunningServer]
    redis_url: str
    cluster: bool
    """True: `redis_url` names a node of a Redis Cluster (``SIRA_REDIS_CLUSTER=1``)."""

    def streams(self, experiment_id: str) -> list[str]:
        """The experiment's write-behind streams: one per shard (8 by default on a
        cluster, `SIRA_REDIS_SHARDS`)."""
        layout = HotLayout(CLUSTER_DEFAULT_SHARDS if self.cluster else 1)
        return [keys.wb for keys in layout.all_keys(experiment_id)]

    def redis_client(self) -> redis.Redis | RedisCluster:
        """A client of that Redis: redis-py's cluster client routes each key to its slot."""
        if self.cluster:
            return RedisCluster.from_url(self.redis_url, socket_timeout=5.0)
        return redis.Redis.from_url(self.redis_url, socket_timeout=5.0)


def _emptied(cluster: LocalRedisCluster) -> str:
    """The session's cluster with no key left (every master flushed, the replicas follow):
    the streams other tests' databases left would otherwise be this test's flushers' too,
    where the single Redis is the test's own."""
    client = RedisCluster.from_url(cluster.url, socket_timeout=5.0)
    try:
        client.flushall()
    finally:
        client.close()
    return cluster.url


@pytest.fixture(params=["single", "cluster"])
def replicas(request: pytest.FixtureRequest, database: str, tmp_path: Path) -> Iterator[Replicas]:
    cluster = request.param == "cluster"
    with ExitStack() as stack:
        if cluster:
            redis_url = _emptied(request.getfixturevalue("redis_cluster"))
        else:
            redis_url = stack.enter_context(own_redis_server())
        servers = [
            stack.enter_context(
                run_sira_server(
                    as_role(database),
                    redis_url,
                    tmp_path / f"r{i}",
                    {
                        "SIRA_REDIS_CLUSTER": "1" if cluster else "0",
                        "SIRA_METRICS_PORT": str(free_port()),
                        # The autopilot's own interval (2 s): its rounds are unchanged.
                        "SIRA_INSIGHTS_HISTORY_SECONDS": str(HISTORY_SECONDS),
                    },
                )
            )
            for i in range(REPLICAS)
        ]
        yield Replicas(servers, redis_url, cluster)


def _round_robin(servers: list[RunningServer]) -> grpc.Channel:
    target = "ipv4:" + ",".join(s.address for s in servers)
    return grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])


def _auth(role: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_test_token(role)}"),)


async def _count(database: str, table: str, experiment_id: str) -> int:
    conn = await asyncpg.connect(database)
    try:
        count: int = await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE experiment_id = $1", experiment_id
        )
        return count
    finally:
        await conn.close()


async def _until(what: str, probe: object) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not await probe():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.2)


def _start_experiment(channel: grpc.Channel, key: str) -> str:
    lifecycle = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
    experiment = epb.Experiment(key=key, name="Replicas")
    experiment.variants.add(key="a", name="A", is_control=True)
    experiment.variants.add(key="b", name="B")
    created = lifecycle.CreateExperiment(
        lpb.CreateExperimentRequest(experiment=experiment), metadata=_auth("ops_admin")
    ).experiment
    lifecycle.StartExperiment(
        lpb.StartExperimentRequest(experiment=key), metadata=_auth("ops_admin")
    )
    return created.id


async def test_replicas_behind_round_robin_act_as_one_server(
    replicas: Replicas, database: str, unique_key: str
) -> None:
    servers = replicas.servers
    with _round_robin(servers) as channel:
        experiment_id = _start_experiment(channel, unique_key)
        assign = assignment_service_pb2_grpc.AssignmentServiceStub(channel)
        track = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        pay = _auth("pay_module")

        # Each subject is asked REPLICAS times in a row: round_robin sends the calls to
        # every replica in turn (a new replica each call), and the answer never changes.
        variants: dict[str, str] = {}
        for i in range(SUBJECTS):
            request = apb.AssignRequest(experiment=unique_key, subject_id=f"s-{i}")
            seen = {
                assign.Assign(request, metadata=pay).decision.variant.key for _ in range(REPLICAS)
            }
            assert len(seen) == 1, f"s-{i} got {seen}"
            variants[f"s-{i}"] = seen.pop()

        # Every conversion sent to every replica (retries with one event id): counted once.
        for i in range(CONVERTING):
            event = tpb.TrackedEvent(
                experiment=unique_key,
                subject_id=f"s-{i}",
                variant_id=variants[f"s-{i}"],
                event_type=tpb.EVENT_TYPE_CONVERSION,
                client_event_id=f"order-{i}",
            )
            outcomes = {
                track.Track(tpb.TrackRequest(event=event), metadata=pay).outcome
                for _ in range(REPLICAS)
            }
            assert outcomes == {tpb.TRACK_OUTCOME_ACCEPTED, tpb.TRACK_OUTCOME_DUPLICATE}

        results = insights_service_pb2_grpc.InsightsServiceStub(channel).GetResults(
            ipb.GetResultsRequest(experiment=unique_key), metadata=_auth("data_science")
        )
        assert sum(v.assigned_subjects for v in results.variants) == SUBJECTS
        assert sum(v.converted_subjects for v in results.variants) == CONVERTING
        for v in results.variants:
            assert v.assigned_subjects == sum(1 for k in variants.values() if k == v.variant_key)

    # The write-behind: one consumer group, every replica a consumer; once every entry
    # is acknowledged (and deleted), Postgres holds exactly the acknowledged rows.
    streams = replicas.streams(experiment_id)
    client = replicas.redis_client()
    try:
        await _until("the write-behind streams drained", lambda: _drained(client, streams))
        consumers = {
            c["name"] for stream in streams for c in client.xinfo_consumers(stream, FLUSHER_GROUP)
        }
    finally:
        client.close()
    assert len(consumers) == REPLICAS
    assert await _rows_equal(database, experiment_id, SUBJECTS, CONVERTING)


async def _drained(client: redis.Redis | RedisCluster, streams: list[str]) -> bool:
    """No entry left in the streams, none pending in the flushers' group."""
    for stream in streams:
        pending = client.xpending(stream, FLUSHER_GROUP)
        if int(client.xlen(stream)) or int(pending["pending"]):
            return False
    return True


async def _rows_equal(database: str, experiment_id: str, assigned: int, events: int) -> bool:
    return (
        await _count(database, "experiment_assignments", experiment_id) == assigned
        and await _count(database, "experiment_metrics", experiment_id) == events
    )


KILL_AFTER = 200
CALLS = 600


def _drive(one: Callable[[int], None], victim: RunningServer, acknowledged: dict[str, str]) -> None:
    """CALLS Assigns from 16 threads; SIGKILL `victim` once KILL_AFTER are acknowledged,
    while the rest are still arriving."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(one, i) for i in range(CALLS)]
        deadline = time.monotonic() + WAIT_SECONDS
        while len(acknowledged) < KILL_AFTER:
            assert time.monotonic() < deadline, "load did not start"
            time.sleep(0.005)
        victim.process.send_signal(signal.SIGKILL)
        for future in futures:
            future.result()
    assert victim.process.wait(10) == -signal.SIGKILL


async def test_a_replica_killed_under_load_loses_nothing_it_acknowledged(
    replicas: Replicas, database: str, unique_key: str
) -> None:
    servers = replicas.servers
    acknowledged: dict[str, str] = {}
    lock = threading.Lock()
    with _round_robin(servers) as channel:
        experiment_id = _start_experiment(channel, unique_key)
        assign = assignment_service_pb2_grpc.AssignmentServiceStub(channel)
        pay = _auth("pay_module")

        def one(i: int) -> None:
            request = apb.AssignRequest(experiment=unique_key, subject_id=f"k-{i}")
            try:
                reply = assign.Assign(request, metadata=pay, timeout=10)
            except grpc.RpcError:
                return  # not acknowledged: the caller would retry
            with lock:
                acknowledged[f"k-{i}"] = reply.decision.variant.id

        _drive(one, servers[-1], acknowledged)
        assert len(acknowledged) >= KILL_AFTER

    async def all_in_postgres() -> bool:
        conn = await asyncpg.connect(database)
        try:
            rows = await conn.fetch(
                "SELECT molam_id, variant_id::text FROM experiment_assignments"
                " WHERE experiment_id = $1",
                experiment_id,
            )
        finally:
            await conn.close()
        stored = {r["molam_id"]: r["variant_id"] for r in rows}
        return all(stored.get(s) == v for s, v in acknowledged.items())

    await _until("every acknowledged assignment in Postgres", all_in_postgres)

    # Nothing stays with the dead consumer: the others reclaim (XAUTOCLAIM, after 30 s
    # idle) what it read and never acknowledged, until the stream is empty.
    client = replicas.redis_client()
    try:
        streams = replicas.streams(experiment_id)
        await _until("the killed replica's entries reclaimed", lambda: _drained(client, streams))
    finally:
        client.close()


# --- the autopilot: one action per step across replicas ---------------------------------

AUTOPILOT_ROUNDS_AFTER = 3
"""Rounds every replica must finish after the stop before the audit log is read."""


def _autopilot_rounds(server: RunningServer) -> float:
    """sira_autopilot_rounds_total over every outcome, from the replica's /metrics."""
    url = f"http://127.0.0.1:{server.env['SIRA_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("sira_autopilot_rounds_total{")
    )


def _a_clear_winner(key: str) -> epb.Experiment:
    """Two arms at fixed 1:1 weights with auto-stop: Green converts 8x as often as Blue."""
    return epb.Experiment(
        key=key,
        name="Autopilot across replicas",
        allocation=epb.ALLOCATION_STRATEGY_FIXED_WEIGHTS,
        variants=[epb.Variant(name="Blue", is_control=True), epb.Variant(name="Green")],
        fail_fast=epb.FailFastSettings(threshold=0.95, min_samples=100, auto_stop=True),
    )


async def _sira_audit(database: str, experiment_id: str) -> list[tuple[str, str | None]]:
    """(action, variant id) of every audit row the autopilot wrote, oldest first."""
    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch(
            "SELECT action, details->>'variant_id' AS variant FROM experiment_audit_logs"
            " WHERE experiment_id = $1 AND actor = $2 ORDER BY id",
            uuid.UUID(experiment_id),
            AUTOPILOT_ACTOR,
        )
    finally:
        await conn.close()
    return [(r["action"], r["variant"]) for r in rows]


async def test_the_autopilot_acts_once_per_step_across_replicas(
    replicas: Replicas, database: str, unique_key: str
) -> None:
    servers = replicas.servers
    with _round_robin(servers) as channel:
        lifecycle = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
        admin = _auth("ops_admin")
        lifecycle.CreateExperiment(
            lpb.CreateExperimentRequest(experiment=_a_clear_winner(unique_key)), metadata=admin
        )
        started = lifecycle.StartExperiment(
            lpb.StartExperimentRequest(experiment=unique_key), metadata=admin
        ).experiment
        blue, green = (v.id for v in started.variants)
        assign = assignment_service_pb2_grpc.AssignmentServiceStub(channel)
        track = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        pay = _auth("pay_module")

        def stopped() -> bool:
            got = lifecycle.GetExperiment(
                lpb.GetExperimentRequest(experiment=unique_key), metadata=_auth("data_science")
            ).experiment
            return bool(got.status == epb.EXPERIMENT_STATUS_STOPPED)

        # New subjects through every replica, conversions tracked as they come (Blue 1 in
        # 20, Green 2 in 5), until one replica's autopilot concludes.
        seen = {blue: 0, green: 0}
        deadline = time.monotonic() + WAIT_SECONDS
        i = 0
        while not stopped():
            assert time.monotonic() < deadline, f"no automatic stop after {seen}"
            for _ in range(40):
                subject = f"ap-{i}"
                i += 1
                decision = assign.Assign(
                    apb.AssignRequest(experiment=unique_key, subject_id=subject), metadata=pay
                ).decision
                if decision.reason != apb.ASSIGNMENT_REASON_NEW:
                    break  # concluded meanwhile: the winner for everyone, nothing recorded
                variant = decision.variant.id
                k = seen[variant]
                seen[variant] += 1
                if k % 20 == 0 if variant == blue else k % 5 < 2:
                    event = tpb.TrackedEvent(
                        experiment=unique_key,
                        subject_id=subject,
                        variant_id=variant,
                        event_type=tpb.EVENT_TYPE_CONVERSION,
                        client_event_id=f"{subject}-paid",
                    )
                    track.Track(tpb.TrackRequest(event=event), metadata=pay)

    # Every replica had its chance to act on the same counters again: a few rounds each
    # after the stop (their catalogs know it by then, or the repository refuses).
    after_stop = [_autopilot_rounds(s) for s in servers]

    async def every_replica_went_round_again() -> bool:
        return all(
            _autopilot_rounds(s) >= n + AUTOPILOT_ROUNDS_AFTER
            for s, n in zip(servers, after_stop, strict=True)
        )

    await _until(
        f"{AUTOPILOT_ROUNDS_AFTER} more autopilot rounds on each replica",
        every_replica_went_round_again,
    )

    audit = await _sira_audit(database, started.id)
    assert Counter(audit) == {("variant_dropped", blue): 1, ("stopped", None): 1}, audit


async def test_replicas_record_each_history_point_once(
    replicas: Replicas, database: str, unique_key: str
) -> None:
    """Every replica runs the round; each point (truncated to the interval) is written by
    whichever holds the lock first, once, with a row per variant."""
    servers = replicas.servers
    with _round_robin(servers) as channel:
        experiment_id = _start_experiment(channel, unique_key)

    async def points() -> list[tuple[float, int]]:
        conn = await asyncpg.connect(database)
        try:
            rows = await conn.fetch(
                "SELECT extract(epoch FROM recorded_at)::float8 AS at, count(*) AS n"
                " FROM insights_history WHERE experiment_id = $1"
                " GROUP BY recorded_at ORDER BY recorded_at",
                uuid.UUID(experiment_id),
            )
        finally:
            await conn.close()
        return [(r["at"], r["n"]) for r in rows]

    async def enough() -> bool:
        return len(await points()) >= HISTORY_POINTS

    await _until(f"{HISTORY_POINTS} history points", enough)
    recorded = await points()
    assert all(n == 2 for _, n in recorded), recorded  # one row per variant, never more
    # Three replicas round every 2 s: without the truncation they would add points
    # between the interval's.
    assert all(at % HISTORY_SECONDS == 0 for at, _ in recorded), recorded
