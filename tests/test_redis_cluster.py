"""SIRA on a real Redis Cluster (3 masters + 3 replicas, `redis_cluster` fixture).

`sira-server` runs with ``SIRA_REDIS_CLUSTER=1`` and the URL of one node; redis-py's
cluster client does the rest. Checked here, through real gRPC:

- the whole decision path (Lifecycle, Assign, Track, TrackBatch, GetResults,
  GetInsights), and the write-behind writing each acknowledged record to Postgres once;
- the hot state rebuilt from Postgres after the cluster lost an experiment's keys, by
  the server on demand and by `sira-server rebuild --redis-cluster`;
- a master killed (SIGKILL) under load: its replica takes over, calls meanwhile may
  fail with UNAVAILABLE, then the same server serves again; an acknowledged-operation
  ledger is compared with Redis and Postgres afterwards, without and with
  ``SIRA_REDIS_WAIT_REPLICAS=1``, and the cost of WAIT is measured in the same run
  (reported, never asserted: speed is not a test verdict here).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis
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
from sira_server.cli import main
from sira_server.config import CLUSTER_DEFAULT_SHARDS
from sira_server.store.hot_keys import ExperimentKeys, HotLayout
from sira_server.store.roles import as_role

WAIT_SECONDS = 60.0
SUBJECTS = 60
LAYOUT = HotLayout(CLUSTER_DEFAULT_SHARDS)
"""The servers here run with the cluster's default shard count."""


def _shards(experiment_id: str) -> tuple[ExperimentKeys, ...]:
    return LAYOUT.all_keys(experiment_id)


@pytest.fixture(scope="module")
async def database(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_cluster")
    try:
        yield url
    finally:
        await drop_database(postgres_server_dsn, url)


def _cluster_server(
    database: str, cluster: LocalRedisCluster, data_dir: Path, wait_replicas: int = 0
) -> Iterator[RunningServer]:
    env = {
        "SIRA_REDIS_CLUSTER": "1",
        "SIRA_REDIS_WAIT_REPLICAS": str(wait_replicas),
        "SIRA_REDIS_WAIT_TIMEOUT_MS": "500",
    }
    with run_sira_server(as_role(database), cluster.url, data_dir, env) as server:
        yield server


@pytest.fixture(scope="module")
def server(
    database: str, redis_cluster: LocalRedisCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """One server for the module's tests (each uses its own experiment)."""
    yield from _cluster_server(database, redis_cluster, tmp_path_factory.mktemp("cluster"))


def _unhandled_in_log(server: RunningServer) -> str:
    """The server log's first traceback of an unhandled exception (what became INTERNAL)."""
    text = server.log()
    start = text.find("unhandled exception")
    return text[start : start + 12000] if start >= 0 else "(no unhandled exception logged)"


def _auth(role: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_test_token(role)}"),)


def _start_experiment(channel: grpc.Channel, key: str) -> str:
    lifecycle = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
    experiment = epb.Experiment(key=key, name="Cluster")
    experiment.variants.add(key="a", name="A", is_control=True)
    experiment.variants.add(key="b", name="B")
    created = lifecycle.CreateExperiment(
        lpb.CreateExperimentRequest(experiment=experiment), metadata=_auth("ops_admin")
    ).experiment
    lifecycle.StartExperiment(
        lpb.StartExperimentRequest(experiment=key), metadata=_auth("ops_admin")
    )
    return created.id


def _cluster_client(cluster: LocalRedisCluster) -> RedisCluster:
    return RedisCluster.from_url(cluster.url, socket_timeout=5.0)


async def _rows(database: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _stored(database: str, experiment_id: str) -> tuple[dict[str, str], list[str]]:
    """(subject -> variant id) of the assignments and the event ids, from Postgres."""
    assignments = await _rows(
        database,
        "SELECT molam_id, variant_id::text AS v FROM experiment_assignments"
        " WHERE experiment_id = $1",
        experiment_id,
    )
    events = await _rows(
        database, "SELECT event_id FROM experiment_metrics WHERE experiment_id = $1", experiment_id
    )
    return {r["molam_id"]: r["v"] for r in assignments}, [r["event_id"] for r in events]


async def _until(what: str, probe: object) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not await probe():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.1)


async def _drained(cluster: LocalRedisCluster, experiment_id: str) -> None:
    """Until the experiment's write-behind stream is empty (all of it in Postgres)."""
    client = _cluster_client(cluster)

    async def empty() -> bool:
        try:
            return sum(int(client.xlen(k.wb)) for k in _shards(experiment_id)) == 0
        except redis.RedisError:
            return False

    try:
        await _until("the write-behind stream drained", empty)
    finally:
        client.close()


def _assign_and_track(channel: grpc.Channel, key: str) -> dict[str, str]:
    """SUBJECTS assigned; a third of them convert (Track), a third refund (TrackBatch)."""
    assign = assignment_service_pb2_grpc.AssignmentServiceStub(channel)
    track = tracking_service_pb2_grpc.TrackingServiceStub(channel)
    pay = _auth("pay_module")
    variants: dict[str, str] = {}
    for i in range(SUBJECTS):
        request = apb.AssignRequest(experiment=key, subject_id=f"s-{i}")
        first = assign.Assign(request, metadata=pay).decision
        again = assign.Assign(request, metadata=pay).decision
        assert again.variant.id == first.variant.id
        assert again.reason == apb.ASSIGNMENT_REASON_STICKY
        variants[f"s-{i}"] = first.variant.id
    for i in range(0, SUBJECTS, 3):
        event = tpb.TrackedEvent(
            experiment=key,
            subject_id=f"s-{i}",
            variant_id=variants[f"s-{i}"],
            event_type=tpb.EVENT_TYPE_CONVERSION,
            value=10.0,
            currency="XOF",
            client_event_id=f"conv-{i}",
        )
        reply = track.Track(tpb.TrackRequest(event=event), metadata=pay)
        assert reply.outcome == tpb.TRACK_OUTCOME_ACCEPTED
    batch = tpb.TrackBatchRequest(
        events=[
            tpb.TrackedEvent(
                experiment=key,
                subject_id=f"s-{i}",
                variant_id=variants[f"s-{i}"],
                event_type=tpb.EVENT_TYPE_CHURN,
                client_event_id=f"churn-{i}",
            )
            for i in range(1, SUBJECTS, 3)
        ]
    )
    results = track.TrackBatch(batch, metadata=pay).results
    assert [r.accepted.outcome for r in results] == [tpb.TRACK_OUTCOME_ACCEPTED] * len(results)
    return variants


async def test_the_decision_path_and_the_write_behind_on_a_cluster(
    server: RunningServer, redis_cluster: LocalRedisCluster, database: str, unique_key: str
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        experiment_id = _start_experiment(channel, unique_key)
        variants = _assign_and_track(channel, unique_key)
        results = insights_service_pb2_grpc.InsightsServiceStub(channel).GetResults(
            ipb.GetResultsRequest(experiment=unique_key), metadata=_auth("data_science")
        )
        assert sum(v.assigned_subjects for v in results.variants) == SUBJECTS
        assert sum(v.converted_subjects for v in results.variants) == len(range(0, SUBJECTS, 3))
        assert sum(v.churned_subjects for v in results.variants) == len(range(1, SUBJECTS, 3))
        insights = insights_service_pb2_grpc.InsightsServiceStub(channel).GetInsights(
            ipb.GetInsightsRequest(experiment=unique_key), metadata=_auth("data_science")
        )
        assert {i.variant_id for i in insights.insights} == set(variants.values()) | {
            i.variant_id for i in insights.insights
        }
        assert len(insights.insights) == 2

    # Every key of each shard lives on the master of its hash tag's slot.
    for keys in _shards(experiment_id):
        with redis_cluster.master_of(keys.wb).client() as client:
            assert client.exists(keys.meta, keys.trials, keys.succ) == 3

    # The write-behind: every record in Postgres exactly once.
    await _drained(redis_cluster, experiment_id)
    assignments, events = await _stored(database, experiment_id)
    assert assignments == variants
    assert sorted(events) == sorted(
        [f"conv-{i}" for i in range(0, SUBJECTS, 3)] + [f"churn-{i}" for i in range(1, SUBJECTS, 3)]
    )


async def test_a_lost_experiment_is_rebuilt_from_postgres(
    server: RunningServer, redis_cluster: LocalRedisCluster, database: str, unique_key: str
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        experiment_id = _start_experiment(channel, unique_key)
        variants = _assign_and_track(channel, unique_key)
        await _drained(redis_cluster, experiment_id)

        # The cluster loses every key of the experiment (a flushed or replaced node).
        client = _cluster_client(redis_cluster)
        try:
            for keys in _shards(experiment_id):
                client.delete(*keys.all)
                assert not client.exists(keys.meta)
        finally:
            client.close()

        # The server rebuilds on demand: the old subjects are sticky, counters exact.
        assign = assignment_service_pb2_grpc.AssignmentServiceStub(channel)
        for i in range(0, SUBJECTS, 7):
            request = apb.AssignRequest(experiment=unique_key, subject_id=f"s-{i}")
            decision = assign.Assign(request, metadata=_auth("pay_module")).decision
            assert decision.variant.id == variants[f"s-{i}"]
        results = insights_service_pb2_grpc.InsightsServiceStub(channel).GetResults(
            ipb.GetResultsRequest(experiment=unique_key), metadata=_auth("data_science")
        )
        assert sum(v.assigned_subjects for v in results.variants) == SUBJECTS

    # And the operator's command, on the cluster.
    code = await asyncio.to_thread(
        main,
        [
            "rebuild",
            "--json",
            experiment_id,
            "--database-url",
            as_role(database),
            "--redis-url",
            redis_cluster.url,
            "--redis-cluster",
        ],
    )
    assert code == 0


async def test_one_hot_experiment_spreads_over_every_master(
    server: RunningServer, redis_cluster: LocalRedisCluster, database: str, unique_key: str
) -> None:
    """8 shards land on all 3 masters unless their 8 slots miss one (a chance of
    3 * (2/3)^8, 12 %: docs/scaling.md): the test takes the first experiment whose
    shards cover every master, then checks each master holds and served its traffic."""
    with redis_cluster.running()[0].client() as client:
        masters = {int(entry[2][1]) for entry in client.execute_command("CLUSTER", "SLOTS")}
    assert len(masters) == 3
    with grpc.insecure_channel(server.address) as channel:
        for attempt in range(10):
            key = f"{unique_key}-{attempt}"
            experiment_id = _start_experiment(channel, key)
            owner = {k.shard: redis_cluster.master_of(k.wb).port for k in _shards(experiment_id)}
            if set(owner.values()) == masters:
                break
        else:
            pytest.fail("10 experiments in a row had a master without a shard")
        calls_before = {port: _evalsha_calls(redis_cluster, port) for port in masters}
        variants = _assign_and_track(channel, key)

    assigned_on: dict[int, int] = dict.fromkeys(masters, 0)
    for keys in _shards(experiment_id):
        with redis_cluster.node(owner[keys.shard]).client() as client:
            assigned_on[owner[keys.shard]] += int(client.hlen(keys.asg))
    assert sum(assigned_on.values()) == SUBJECTS
    assert all(count > 0 for count in assigned_on.values()), assigned_on
    for port in masters:  # and each master ran this experiment's scripts
        assert _evalsha_calls(redis_cluster, port) > calls_before[port]
    await _drained(redis_cluster, experiment_id)
    assignments, _ = await _stored(database, experiment_id)
    assert assignments == variants


def _evalsha_calls(cluster: LocalRedisCluster, port: int) -> int:
    with cluster.node(port).client() as client:
        stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


# --- failover under load, with an acknowledged-operation ledger -----------------------

THREADS = 8
ROUNDS = 2
ROUND_SECONDS = 1.0
LOADED_CALLS = 400


@dataclass
class Ledger:
    """What the server acknowledged (answered OK), and how calls went over time."""

    assigned: dict[str, str] = field(default_factory=dict)
    tracked: set[str] = field(default_factory=set)
    failures: dict[str, int] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    """Subjects whose Track was refused (not UNAVAILABLE): their assignment was lost."""
    latencies: list[tuple[float, float]] = field(default_factory=list)
    """(end time, seconds) of every acknowledged call."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok_between(self, start: float, end: float) -> list[float]:
        with self.lock:
            return [s for t, s in self.latencies if start <= t < end]


def _load(channel: grpc.Channel, key: str, ledger: Ledger, stop: threading.Event, tag: str) -> None:
    """THREADS clients: Assign a new subject, then Track its conversion; repeat."""
    assign = assignment_service_pb2_grpc.AssignmentServiceStub(channel)
    track = tracking_service_pb2_grpc.TrackingServiceStub(channel)
    pay = _auth("pay_module")

    def timed(call: object, request: object, subject: str) -> object | None:
        started = time.monotonic()
        try:
            reply = call(request, metadata=pay, timeout=2.0)  # type: ignore[operator]
        except grpc.RpcError as exc:
            with ledger.lock:
                name = exc.code().name  # type: ignore[attr-defined]
                ledger.failures[name] = ledger.failures.get(name, 0) + 1
                if name == "FAILED_PRECONDITION":
                    ledger.refused.add(subject)
            return None
        ended = time.monotonic()
        with ledger.lock:
            ledger.latencies.append((ended, ended - started))
        return reply

    def client(worker: int) -> None:
        n = 0
        while not stop.is_set():
            subject = f"{tag}-{worker}-{n}"
            n += 1
            request = apb.AssignRequest(experiment=key, subject_id=subject)
            reply = timed(assign.Assign, request, subject)
            if reply is None:
                continue
            variant = reply.decision.variant.id  # type: ignore[attr-defined]
            with ledger.lock:
                ledger.assigned[subject] = variant
            event = tpb.TrackedEvent(
                experiment=key,
                subject_id=subject,
                variant_id=variant,
                event_type=tpb.EVENT_TYPE_CONVERSION,
                client_event_id=f"e-{subject}",
            )
            if timed(track.Track, tpb.TrackRequest(event=event), subject) is not None:
                with ledger.lock:
                    ledger.tracked.add(f"e-{subject}")

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for future in [pool.submit(client, w) for w in range(THREADS)]:
            future.result()


def _p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")


async def _measure(servers: dict[int, RunningServer], key_of: dict[int, str]) -> dict[int, str]:
    """The cost of WAIT, in the same run: the same load on each server in turn, ROUNDS
    times (interleaved, so a busy moment of the machine hits both modes)."""
    latencies: dict[int, list[float]] = {mode: [] for mode in servers}
    for _ in range(ROUNDS):
        for mode, server in servers.items():
            ledger = Ledger()
            with grpc.insecure_channel(server.address) as channel:
                await _run_load(channel, key_of[mode], ledger, f"m{mode}-{time.time_ns()}")
            latencies[mode].extend(s for _, s in ledger.latencies)
    seconds = ROUNDS * ROUND_SECONDS
    return {
        mode: f"{len(values) / seconds:.0f} calls/s, p99 {_p99(values) * 1000:.1f} ms"
        for mode, values in latencies.items()
    }


async def _run_load(channel: grpc.Channel, key: str, ledger: Ledger, tag: str) -> None:
    stop = threading.Event()
    load = asyncio.ensure_future(asyncio.to_thread(_load, channel, key, ledger, stop, tag))
    await asyncio.sleep(ROUND_SECONDS)
    stop.set()
    await load


async def _failover_run(
    server: RunningServer,
    database: str,
    cluster: LocalRedisCluster,
    key: str,
    wait_replicas: int,
    failure: str,
) -> dict[str, object]:
    """Load on `key` while `failure` hits the master of its slot; then the ledger."""
    with grpc.insecure_channel(server.address) as channel:
        experiment_id = _start_experiment(channel, key)
        stream = _shards(experiment_id)[0].wb  # the master of one shard fails
        ledger = Ledger()
        stop = threading.Event()
        load = asyncio.ensure_future(
            asyncio.to_thread(_load, channel, key, ledger, stop, f"{failure}{wait_replicas}")
        )

        async def at_speed() -> bool:  # the failure hits calls in flight
            return len(ledger.ok_between(0.0, time.monotonic())) >= LOADED_CALLS

        await _until("the load running", at_speed)

        master = cluster.master_of(stream)
        if failure == "kill":
            master.kill()
        else:  # the replica takes over while the master still serves: split brain
            with cluster.replica_of(master).client() as replica:
                replica.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        failed_at = time.monotonic()
        new_master = await asyncio.to_thread(cluster.wait_promoted, stream, master)
        promoted_at = time.monotonic()
        if failure == "kill":
            await asyncio.to_thread(cluster.restart, master)  # rejoins as a replica
        await asyncio.to_thread(cluster.wait_replicated, new_master)
        healed_at = time.monotonic()

        async def served_again() -> bool:
            return len(ledger.ok_between(healed_at, time.monotonic())) >= 10

        # The same server process serves again, no restart.
        await _until("calls acknowledged again after the failover", served_again)
        stop.set()
        await load
        await asyncio.to_thread(cluster.wait_ok)

    await _drained(cluster, experiment_id)
    client = _cluster_client(cluster)
    try:
        in_redis = {
            k.decode(): v.decode().split("|", 1)[0]
            for keys in _shards(experiment_id)
            for k, v in client.hgetall(keys.asg).items()
        }
        events_in_redis = {  # members are "event id NUL subject" (`event_member`)
            e.decode().split("\0", 1)[0]
            for keys in _shards(experiment_id)
            for e in client.smembers(keys.events)
        }
        dead = sum(int(client.xlen(keys.dead)) for keys in _shards(experiment_id))
    finally:
        client.close()
    in_postgres, events = await _stored(database, experiment_id)
    event_ids = set(events)
    lost_in_redis = [s for s, v in ledger.assigned.items() if in_redis.get(s) != v]
    lost_in_postgres = [s for s, v in ledger.assigned.items() if in_postgres.get(s) != v]
    report: dict[str, object] = {
        "wait_replicas": wait_replicas,
        "failure": failure,
        "promotion_seconds": round(promoted_at - failed_at, 2),
        "acknowledged_assigns": len(ledger.assigned),
        "acknowledged_tracks": len(ledger.tracked),
        "failed_calls": dict(ledger.failures),
        "assigns_lost_in_redis": len(lost_in_redis),
        "assigns_lost_in_postgres": len(lost_in_postgres),
        "tracks_lost_in_redis": len(ledger.tracked - events_in_redis),
        "tracks_lost_in_postgres": len(ledger.tracked - event_ids),
        "dead_letters": dead,
    }
    print(f"\nfailover ledger: {json.dumps(report)}")
    # Calls during the failover may fail with UNAVAILABLE (or their deadline); a
    # Track refused as not assigned means its acknowledged assignment was lost.
    assert ledger.refused <= set(lost_in_redis)
    failed = set(ledger.failures) - {"FAILED_PRECONDITION"}
    if "INTERNAL" in failed:  # whole, in the captured output: the assertion cuts it
        print(_unhandled_in_log(server))
    assert failed <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, ledger.failures
    if wait_replicas:
        # Acknowledged = on the master and its replica: the promotion keeps it.
        assert not lost_in_redis
        assert not lost_in_postgres
        assert ledger.tracked <= event_ids
    return report


@pytest.mark.slow
async def test_master_failover_under_load_with_and_without_wait(
    database: str, redis_cluster: LocalRedisCluster, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        servers = {
            mode: stack.enter_context(
                contextmanager(_cluster_server)(
                    database, redis_cluster, tmp_path / f"wait{mode}", mode
                )
            )
            for mode in (0, 1)
        }
        keys = {mode: f"cost-{mode}-{time.time_ns()}" for mode in servers}
        for mode, server in servers.items():
            with grpc.insecure_channel(server.address) as channel:
                _start_experiment(channel, keys[mode])
        cost = await _measure(servers, keys)
        print(f"\ncost of WAIT (same run): without {cost[0]}; with WAIT 1: {cost[1]}")
        for failure in ("takeover", "kill"):
            for mode, server in servers.items():
                await _failover_run(
                    server,
                    database,
                    redis_cluster,
                    f"failover-{failure}-{mode}-{time.time_ns()}",
                    mode,
                    failure,
                )
