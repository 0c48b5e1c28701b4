"""Store faults are answered, never waited out: each test breaks a store of its own.

A Redis that is loading its append-only file, busy, frozen (SIGSTOP), restarted behind
a connection that went stale, a stalled Postgres (a paused proxy), a killed embedded
Redis. Every call is made with a generous client deadline and must come back
UNAVAILABLE (or succeed), never DEADLINE_EXCEEDED, INTERNAL or UNKNOWN. No timing is
asserted beyond "answered before that deadline".
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
import uvloop
from fault_stores import PausableProxy, RedisServer, fill, kill, pid_alive
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis import exceptions as redis_errors
from server_fixtures import (
    RunningServer,
    create_migrated_database,
    drop_database,
    mint_test_token,
    run_sira_server,
)
from store_helpers import create_experiment, event

from sira import AsyncClient, RetryPolicy, UnavailableError, tracked_event
from sira.experiments.v1 import assignment_service_pb2 as apb
from sira.experiments.v1 import assignment_service_pb2_grpc as apb_grpc
from sira.experiments.v1 import error_reason_pb2 as erpb
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import tracking_service_pb2 as tpb
from sira_server.config import ConfigError, Settings, StoreTimeouts
from sira_server.errors import Unavailable
from sira_server.store.faults import (
    domain_error,
    is_redis_unavailable,
    parse_redis_error,
    redis_call,
)
from sira_server.store.hot_state import (
    AssignRequest,
    HotState,
    TrackOutcome,
    TrackStatus,
    experiment_keys,
)
from sira_server.store.lua_scripts import LOCK_SCRIPT
from sira_server.store.redis_conn import create_redis
from sira_server.store.script_transport import (
    TRANSPORTS,
    PipelineTransport,
    default_transport,
    run_script,
)

pytestmark = pytest.mark.slow

CLIENT_DEADLINE_SECONDS = 10.0
"""Generous: the server must answer well before it (its own deadlines are ~1-2 s)."""
RECOVERY_DEADLINE_SECONDS = 60.0
NO_RETRY = RetryPolicy(attempts=1)
NEW = apb.ASSIGNMENT_REASON_NEW
STICKY = apb.ASSIGNMENT_REASON_STICKY
ACCEPTED = tpb.TRACK_OUTCOME_ACCEPTED
LOADING_KEYS = 50_000
LOAD_DELAY_MICROSECONDS = "20"
"""Per key while loading (Redis's own `key-load-delay`): LOADING lasts seconds."""
MANY_LOADING_KEYS = 200_000
LOADING_SLOWLY = ("--key-load-delay", "40")
"""With `MANY_LOADING_KEYS`: LOADING for ~8 s. Redis answers between every 1024 commands
of the file (~40 ms here), and a redis-py call takes a few round trips (reconnect, CLIENT
SETINFO, the command): room for a dozen calls."""


# --- the one error map ------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "LOADING Redis is loading the dataset in memory",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "READONLY You can't write against a read only replica.",
        "MISCONF Redis is configured to save RDB snapshots, but it's unable to persist",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "NOSCRIPT No matching script. Please use EVAL.",
        "ERR WAIT cannot be used with replica instances. Please also note that since Redis "
        "4.0 if a replica is configured to be writable (which is not the default) writes to "
        "replicas are just local and are not propagated.",
    ],
)
def test_store_replies_that_mean_not_now_are_unavailable(reply: str) -> None:
    error = parse_redis_error(reply)
    assert is_redis_unavailable(error)


@pytest.mark.parametrize(
    "annotated",
    [
        "Command # 1 (HEXISTS k ready) of pipeline caused error: ('BUSY Redis is busy',)",
        "Command # 2 (WAIT 1 100) of pipeline caused error: "
        "('WAIT cannot be used with replica instances. Please also note...',)",
    ],
)
def test_a_reply_annotated_by_a_pipeline_keeps_its_class(annotated: str) -> None:
    """redis-py prefixes an error of a pipeline with the command that failed."""
    assert is_redis_unavailable(redis_errors.ResponseError(annotated))


@pytest.mark.parametrize(
    "reply",
    ["ERR Error running script (call to f_x): @user_script:1: boom", "WRONGTYPE Operation"],
)
def test_other_replies_are_bugs_not_unavailable(reply: str) -> None:
    assert not is_redis_unavailable(parse_redis_error(reply))


@pytest.mark.parametrize(
    "error",
    [
        redis_errors.SlotNotCoveredError('Slot "5" not covered by the cluster.'),
        redis_errors.ClusterError("TTL exhausted."),
        redis_errors.RedisClusterException(
            "Redis Cluster cannot be connected. Please provide at least one reachable node"
        ),
    ],
    ids=["slot-without-master", "ttl-exhausted", "no-reachable-node"],
)
async def test_a_cluster_mid_failover_is_unavailable(error: Exception) -> None:
    """redis-py's cluster client words a failover in progress with its own classes (CI
    once saw INTERNAL from a master killed under load)."""
    assert isinstance(domain_error(error), Unavailable)
    with pytest.raises(Unavailable):
        async with redis_call():
            raise error


async def test_cluster_client_misuse_stays_a_bug() -> None:
    misuse = redis_errors.RedisClusterException("No way to dispatch this command")
    assert domain_error(misuse) is misuse
    with pytest.raises(redis_errors.RedisClusterException):
        async with redis_call():
            raise misuse


async def test_redis_pys_closed_writer_race_is_unavailable() -> None:
    """redis/redis-py#4287: a write on a connection closed under it leaks the missing
    writer as AttributeError from redis-py's asyncio connection module. Here redis-py's
    own write path meets a connection without a writer (what the race leaves)."""
    closed = aioredis.Connection()
    with pytest.raises(AttributeError) as leaked:
        await closed._send_packed_command([b"PING"])
    mapped = domain_error(leaked.value)
    assert isinstance(mapped, Unavailable)
    assert mapped.metadata == {"store": "redis"}
    with pytest.raises(Unavailable):
        async with redis_call():
            await closed._send_packed_command([b"PING"])

    ours = AttributeError("a bug of ours")  # anywhere else: a bug, left as it is
    assert domain_error(ours) is ours
    with pytest.raises(AttributeError):
        async with redis_call():
            raise ours


def test_the_closed_writer_race_on_uvloop_is_unavailable() -> None:
    """The same race on uvloop (the server's loop): writing to a transport closed under
    redis-py raises uvloop's RuntimeError, seen once in a cluster failover under load."""

    async def write_after_reset() -> BaseException:
        accepted: list[asyncio.StreamWriter] = []

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        connection = aioredis.Connection(host="127.0.0.1", port=port)
        connection._reader, connection._writer = await asyncio.open_connection("127.0.0.1", port)
        connection._writer.transport.abort()  # the peer reset, as a failover does
        await asyncio.sleep(0)
        try:
            await connection._send_packed_command([b"PING"])
        except RuntimeError as exc:
            return exc
        finally:
            await connection.disconnect()
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()
        raise AssertionError("uvloop wrote to a closed transport without an error")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        leaked = runner.run(write_after_reset())
    mapped = domain_error(leaked)
    assert isinstance(mapped, Unavailable)
    assert mapped.metadata == {"store": "redis"}

    async def through_redis_call(exc: BaseException) -> None:
        async with redis_call():
            raise exc

    with pytest.raises(Unavailable):
        asyncio.run(through_redis_call(leaked))
    ours = RuntimeError("the handler is closed")  # raised outside redis-py: a bug
    assert domain_error(ours) is ours
    with pytest.raises(RuntimeError):
        asyncio.run(through_redis_call(ours))


def test_store_timeouts_come_from_the_environment() -> None:
    assert Settings.from_env({}).timeouts == StoreTimeouts()
    settings = Settings.from_env(
        {
            "SIRA_REDIS_TIMEOUT_SECONDS": "0.5",
            "SIRA_POSTGRES_TIMEOUT_SECONDS": "2",
            "SIRA_REBUILD_WAIT_SECONDS": "7",
            "SIRA_STORE_COMMAND_TIMEOUT_SECONDS": "30",
            "SIRA_HEALTH_PROBE_SECONDS": "1",
        }
    )
    assert settings.timeouts == StoreTimeouts(0.5, 2.0, 7.0, 30.0, 1.0)
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(ConfigError, match="SIRA_REDIS_TIMEOUT_SECONDS"):
            Settings.from_env({"SIRA_REDIS_TIMEOUT_SECONDS": bad})


# --- stores of one test ----------------------------------------------------------------


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """Outside pytest's 0700 basetemp (embedded Postgres runs as another user as root),
    and short enough for a unix socket path."""
    path = Path(tempfile.mkdtemp(prefix="sira-flt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def own_redis(short_tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(short_tmp / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def database(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_flt")
    try:
        yield url
    finally:
        await drop_database(postgres_server_dsn, url)


def hot_states(redis: aioredis.Redis, pool: asyncpg.Pool) -> list[HotState]:
    """One per script transport, production's (`default_transport`) first."""
    return [HotState(redis, pool, transport=default_transport(redis, kind)) for kind in TRANSPORTS]


async def unavailable(call: Callable[[], Awaitable[Any]]) -> None:
    """`call` raises Unavailable (store=redis); a batch may instead answer Unavailable for
    each of its items (an error reply per call rather than a failed round trip)."""
    try:
        answer = await asyncio.wait_for(call(), CLIENT_DEADLINE_SECONDS)
    except Unavailable as exc:
        answer = [exc]
    assert isinstance(answer, list), f"answered {answer!r}"
    for item in answer:
        assert isinstance(item, Unavailable), f"answered {item!r}"
        assert item.metadata["store"] == "redis"


def write_paths(hot: HotState, experiment_id: str, variant: str) -> list[Callable[[], Any]]:
    """Single calls and batches of both scripts (new subjects, new event ids: writes)."""

    def fresh() -> str:
        return f"new-{uuid.uuid4().hex}"

    return [
        lambda: hot.assign(experiment_id, fresh(), variant, 0.5),
        lambda: hot.assign_many(experiment_id, [AssignRequest(fresh(), variant, 0.5)] * 2),
        lambda: hot.track(experiment_id, event("s1", variant)),
        lambda: hot.track_many(experiment_id, [event("s1", variant), event("s1", variant)]),
        lambda: hot.track_each([(experiment_id, event("s1", variant))] * 2),  # TrackBatch's
        lambda: run_script(hot.transport, LOCK_SCRIPT, ("{t}:lock",), ("token", "extend", 1000)),
    ]


async def every_path_is_unavailable(hot: HotState, experiment_id: str, variant: str) -> None:
    for call in [
        *write_paths(hot, experiment_id, variant),
        lambda: hot.get_assignment(experiment_id, "s1"),
        lambda: hot.counters(experiment_id),
    ]:
        await unavailable(call)


async def test_loading_after_a_restart_is_unavailable_on_every_path(
    own_redis: RedisServer, migrated_pool: asyncpg.Pool
) -> None:
    redis = create_redis(own_redis.url)
    hots = hot_states(redis, migrated_pool)
    try:
        experiment_id, (a, b) = await create_experiment(migrated_pool)
        await hots[0].init_experiment(experiment_id, [a, b], "conversion")
        assert (await hots[0].assign(experiment_id, "s1", a, 0.5)).created
        fill(own_redis.client(), MANY_LOADING_KEYS)  # a long append-only file to replay
        own_redis.stop()
        own_redis.start(*LOADING_SLOWLY, wait=False)
        await _until_loading(own_redis)
        for hot in hots:
            await every_path_is_unavailable(hot, experiment_id, a)
        # Loaded: the same calls work again, and nothing acknowledged was lost.
        for hot in hots:
            outcome = await _eventually(lambda hot=hot: hot.assign(experiment_id, "s1", a, 0.5))
            assert not outcome.created
        (first,) = await hots[-1].track_many(experiment_id, [event("s1", a)])
        assert first.first_conversion
    finally:
        for hot in hots:
            await hot.close()
        await redis.aclose()


async def test_busy_redis_is_unavailable_on_every_path(
    short_tmp: Path, migrated_pool: asyncpg.Pool
) -> None:
    server = RedisServer(short_tmp / "busy")
    server.start("--lua-time-limit", "50")  # busy-reply-threshold's old name
    redis = create_redis(server.url)
    hots = hot_states(redis, migrated_pool)
    spinner: threading.Thread | None = None
    try:
        experiment_id, (a, b) = await create_experiment(migrated_pool)
        await hots[0].init_experiment(experiment_id, [a, b], "conversion")
        await hots[0].assign(experiment_id, "s1", a, 0.5)
        spin = (  # read-only, so SCRIPT KILL can end it
            "local t0 = redis.call('TIME')[1] while redis.call('TIME')[1] - t0 < 30 do end"
        )
        busy = server.client()
        spinner = threading.Thread(target=lambda: _quietly(busy.eval, spin, 0), daemon=True)
        spinner.start()
        await _until(server, lambda c: _replies(c, "BUSY"), "BUSY")
        for hot in hots:
            await every_path_is_unavailable(hot, experiment_id, a)
    finally:
        _quietly(server.client().script_kill)
        if spinner is not None:
            spinner.join(30)
        for hot in hots:
            await hot.close()
        await redis.aclose()
        server.stop()


async def test_a_read_only_replica_is_unavailable_for_writes_only(
    own_redis: RedisServer, short_tmp: Path, migrated_pool: asyncpg.Pool
) -> None:
    """READONLY comes back as the error reply of one script call (the write inside it):
    that call is Unavailable, the calls of the same batch that did not write are answered."""
    master = create_redis(own_redis.url)
    replica = RedisServer(short_tmp / "replica")
    replica.start("--replicaof", "127.0.0.1", str(own_redis.port))
    redis = create_redis(replica.url)
    hots = hot_states(redis, migrated_pool)
    try:
        experiment_id, (a, b) = await create_experiment(migrated_pool)
        writer = HotState(master, migrated_pool, transport=PipelineTransport(master))
        await writer.init_experiment(experiment_id, [a, b], "conversion")
        await writer.assign(experiment_id, "s1", a, 0.5)
        await master.set("{t}:lock", "token")  # so that extending it writes
        synced = experiment_keys(experiment_id).asg
        await _until(replica, lambda c: c.hexists(synced, "s1") and c.exists("{t}:lock"), "sync")
        for hot in hots:
            for call in write_paths(hot, experiment_id, a):
                await unavailable(call)
            assert (await hot.get_assignment(experiment_id, "s1")) is not None  # reads work
            stored, not_assigned, mismatch = await hot.track_each(
                [
                    (experiment_id, event("s1", a)),  # writes: READONLY
                    (experiment_id, event("ghost", a)),  # answered without a write
                    (experiment_id, event("s1", b)),
                ]
            )
            assert isinstance(stored, Unavailable)
            assert stored.metadata["store"] == "redis"
            assert not_assigned == TrackOutcome(TrackStatus.NOT_ASSIGNED)
            assert mismatch == TrackOutcome(TrackStatus.MISMATCH, assigned_variant_id=a)
    finally:
        for hot in hots:
            await hot.close()
        await redis.aclose()
        await master.aclose()
        replica.stop()


async def test_a_replica_cut_from_its_master_is_unavailable_on_every_path(
    own_redis: RedisServer, short_tmp: Path, migrated_pool: asyncpg.Pool
) -> None:
    """MASTERDOWN: a replica told not to serve stale data once its master is gone."""
    master = create_redis(own_redis.url)
    replica = RedisServer(short_tmp / "replica")
    replica.start(
        "--replicaof", "127.0.0.1", str(own_redis.port), "--replica-serve-stale-data", "no"
    )
    redis = create_redis(replica.url)
    hots = hot_states(redis, migrated_pool)
    try:
        experiment_id, (a, b) = await create_experiment(migrated_pool)
        writer = HotState(master, migrated_pool, transport=PipelineTransport(master))
        await writer.init_experiment(experiment_id, [a, b], "conversion")
        await writer.assign(experiment_id, "s1", a, 0.5)
        synced = experiment_keys(experiment_id).asg
        await _until(replica, lambda c: c.hexists(synced, "s1"), "sync")
        own_redis.stop()
        await _until(replica, _master_down, "MASTERDOWN")
        for hot in hots:
            await every_path_is_unavailable(hot, experiment_id, a)
    finally:
        for hot in hots:
            await hot.close()
        await redis.aclose()
        await master.aclose()
        replica.stop()


# --- a sira-server on stores of its own -------------------------------------------------


def clients(server: RunningServer) -> tuple[AsyncClient, AsyncClient]:
    """(admin, pay), one attempt each and a generous deadline."""
    return (
        AsyncClient(
            server.address,
            token=mint_test_token("ops_admin"),
            retry=NO_RETRY,
            timeout=CLIENT_DEADLINE_SECONDS,
        ),
        AsyncClient(
            server.address,
            token=mint_test_token("pay_module"),
            retry=NO_RETRY,
            timeout=CLIENT_DEADLINE_SECONDS,
        ),
    )


def all_unavailable(results: list[tpb.TrackBatchResult]) -> bool:
    """Every event of a batch answered UNAVAILABLE (store_unavailable) on its own."""
    return bool(results) and all(
        r.WhichOneof("result") == "error"
        and r.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        and r.error.reason == erpb.ERROR_REASON_STORE_UNAVAILABLE
        for r in results
    )


async def launch(admin: AsyncClient) -> epb.Experiment:
    key = f"flt-{uuid.uuid4().hex[:8]}"
    spec = epb.Experiment(
        key=key, name=key, variants=[epb.Variant(name="A", is_control=True), epb.Variant(name="B")]
    )
    return await admin.start_experiment((await admin.create_experiment(spec)).id)


def conversion(experiment: epb.Experiment, subject: str, variant: str) -> tpb.TrackedEvent:
    return tracked_event(
        experiment=experiment.key,
        subject_id=subject,
        variant_id=variant,
        client_event_id=f"{subject}-{uuid.uuid4().hex[:8]}",
    )


async def health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=CLIENT_DEADLINE_SECONDS
        )
    return int(reply.status)


async def until_health(address: str, service: str, wanted: int) -> None:
    deadline = time.monotonic() + RECOVERY_DEADLINE_SECONDS
    while (status := await health(address, service)) != wanted:
        assert time.monotonic() < deadline, f"health {service!r} stays {status}"
        await asyncio.sleep(0.2)


async def test_frozen_redis_is_answered_unavailable_then_recovers(
    database: str, own_redis: RedisServer, short_tmp: Path
) -> None:
    with run_sira_server(database, own_redis.url, short_tmp / "server") as server:
        admin, pay = clients(server)
        experiment = await launch(admin)
        held = await pay.assign(experiment.key, "s1")
        assert held.reason == NEW
        own_redis.signal(signal.SIGSTOP)
        try:
            with pytest.raises(UnavailableError) as caught:
                await pay.track(conversion(experiment, "s1", held.variant.id))
            assert caught.value.metadata["store"] == "redis"
            with pytest.raises(UnavailableError):
                await pay.assign(experiment.key, "new-while-frozen")
            batch = await pay.track_batch(
                [conversion(experiment, "s1", held.variant.id) for _ in range(2)]
            )
            assert all_unavailable(batch)
            with pytest.raises(UnavailableError):
                await admin.get_results(experiment.key)
            sticky = await pay.assign(experiment.key, "s1")  # the in-process LRU
            assert (sticky.reason, sticky.variant.id) == (STICKY, held.variant.id)
            await until_health(server.address, "", health_pb2.HealthCheckResponse.NOT_SERVING)
        finally:
            own_redis.signal(signal.SIGCONT)
        answer = await _eventually(lambda: pay.track(conversion(experiment, "s1", held.variant.id)))
        assert answer.outcome == ACCEPTED
        assert (await pay.assign(experiment.key, "after-thaw")).reason == NEW
        await until_health(server.address, "", health_pb2.HealthCheckResponse.SERVING)
        await admin.close()
        await pay.close()


async def test_track_batch_answers_each_event_when_its_redis_turns_replica(
    database: str, own_redis: RedisServer, short_tmp: Path
) -> None:
    """A failover seen from the old master: it became a replica, so a script that writes
    gets READONLY. TrackBatch answers each event on its own: that event UNAVAILABLE (retry
    it), the others what they are (not assigned, unknown variant), the call itself OK."""
    other = RedisServer(short_tmp / "other")
    other.start("--replicaof", "127.0.0.1", str(own_redis.port))
    try:
        with run_sira_server(database, own_redis.url, short_tmp / "server") as server:
            admin, pay = clients(server)
            experiment = await launch(admin)
            held = await pay.assign(experiment.key, "s1")
            assigned = experiment_keys(experiment.id).asg
            await _until(other, lambda c: c.hexists(assigned, "s1"), "the replica has s1")
            other.client().replicaof("NO", "ONE")
            own_redis.client().replicaof("127.0.0.1", other.port)
            await _until(own_redis, _synced_replica, "demoted and in sync (no more LOADING)")
            stored, not_assigned, unknown = await pay.track_batch(
                [
                    conversion(experiment, "s1", held.variant.id),
                    conversion(experiment, "never-assigned", held.variant.id),
                    conversion(experiment, "s1", "no-such-variant"),
                ]
            )
            assert all_unavailable([stored])
            assert not_assigned.error.reason == erpb.ERROR_REASON_SUBJECT_NOT_ASSIGNED
            assert unknown.error.reason == erpb.ERROR_REASON_VARIANT_NOT_FOUND
            await admin.close()
            await pay.close()
    finally:
        other.stop()


async def test_loading_redis_is_answered_unavailable_by_the_server(
    database: str, own_redis: RedisServer, short_tmp: Path
) -> None:
    with run_sira_server(database, own_redis.url, short_tmp / "server") as server:
        admin, pay = clients(server)
        experiment = await launch(admin)
        held = await pay.assign(experiment.key, "s1")
        fill(own_redis.client(), LOADING_KEYS)
        own_redis.stop()
        own_redis.start("--key-load-delay", LOAD_DELAY_MICROSECONDS, wait=False)
        await _until_loading(own_redis)
        batch = await pay.track_batch([conversion(experiment, "s1", held.variant.id)] * 2)
        assert all_unavailable(batch)  # answered per event
        for call in (
            lambda: pay.track(conversion(experiment, "s1", held.variant.id)),
            lambda: pay.assign(experiment.key, "new-while-loading"),
            lambda: admin.get_results(experiment.key),
        ):
            with pytest.raises(UnavailableError) as caught:
                await call()
            assert caught.value.reason == "ERROR_REASON_STORE_UNAVAILABLE"
        answer = await _eventually(lambda: pay.track(conversion(experiment, "s1", held.variant.id)))
        assert answer.outcome == ACCEPTED
        await admin.close()
        await pay.close()


async def test_stale_redis_connections_after_a_restart_cost_no_call(
    database: str, own_redis: RedisServer, short_tmp: Path
) -> None:
    """Every pooled connection (and the script channel's) goes stale at once, as behind a
    NAT or load balancer when Redis restarts: no call fails, even without a retry."""
    proxy = PausableProxy("127.0.0.1", own_redis.port)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    try:
        with run_sira_server(database, url, short_tmp / "server") as server:
            admin, pay = clients(server)
            experiment = await launch(admin)
            subjects = [f"s{i}" for i in range(20)]
            decisions = await asyncio.gather(*(pay.assign(experiment.key, s) for s in subjects))
            await admin.get_results(experiment.key)
            for restart in (False, True):
                proxy.cut()
                if restart:
                    own_redis.stop()
                    own_redis.start()
                results = await asyncio.gather(
                    *(
                        pay.track(conversion(experiment, s, d.variant.id))
                        for s, d in zip(subjects, decisions, strict=True)
                    ),
                    pay.track_batch([conversion(experiment, "s0", decisions[0].variant.id)] * 2),
                    pay.assign(experiment.key, f"fresh-{restart}"),
                    admin.get_results(experiment.key),
                )
                assert all(r.outcome == ACCEPTED for r in results[: len(subjects)])
            await admin.close()
            await pay.close()
    finally:
        proxy.close()


def _dsn_via(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


async def test_stalled_postgres_turns_lifecycle_not_serving_and_calls_unavailable(
    database: str, own_redis: RedisServer, short_tmp: Path
) -> None:
    parts = urlsplit(database)
    proxy = PausableProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    try:
        with run_sira_server(
            _dsn_via(database, proxy.port),
            own_redis.url,
            short_tmp / "server",
            extra_env={"SIRA_STORE_COMMAND_TIMEOUT_SECONDS": "2"},
        ) as server:
            admin, pay = clients(server)
            experiment = await launch(admin)
            held = await pay.assign(experiment.key, "s1")
            proxy.pause()
            try:
                await until_health(
                    server.address,
                    "sira.experiments.v1.LifecycleService",
                    health_pb2.HealthCheckResponse.NOT_SERVING,
                )
                with pytest.raises(UnavailableError) as caught:
                    await admin.create_experiment(
                        epb.Experiment(
                            key=f"{experiment.key}-x",
                            name="x",
                            variants=[epb.Variant(name="A"), epb.Variant(name="B")],
                        )
                    )
                assert caught.value.metadata["store"] == "postgres"
                with pytest.raises(UnavailableError):  # not cached: looked up in Postgres
                    await pay.assign(f"unknown-{uuid.uuid4().hex[:8]}", "s1")
                # Decisions and tracking go on from Redis; so does the overall status.
                assert (await pay.assign(experiment.key, "s2")).reason == NEW
                answer = await pay.track(conversion(experiment, "s1", held.variant.id))
                assert answer.outcome == ACCEPTED
                assert await health(server.address) == health_pb2.HealthCheckResponse.SERVING
            finally:
                proxy.resume()
            await until_health(
                server.address,
                "sira.experiments.v1.LifecycleService",
                health_pb2.HealthCheckResponse.SERVING,
            )
            await _eventually(lambda: admin.get_experiment(experiment.key))
            await admin.close()
            await pay.close()
    finally:
        proxy.close()


async def test_assign_all_answers_each_experiment_when_one_cannot_decide(
    database: str, own_redis: RedisServer, short_tmp: Path
) -> None:
    """One experiment's hot state lost while Postgres stalls: its rebuild cannot finish,
    so AssignAll names it in `errors` and still answers the other experiment."""
    parts = urlsplit(database)
    proxy = PausableProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    try:
        with run_sira_server(
            _dsn_via(database, proxy.port),
            own_redis.url,
            short_tmp / "server",
            extra_env={"SIRA_STORE_COMMAND_TIMEOUT_SECONDS": "2", "SIRA_REBUILD_WAIT_SECONDS": "2"},
        ) as server:
            admin, pay = clients(server)
            healthy, lost = await launch(admin), await launch(admin)
            async with aioredis.from_url(own_redis.url) as redis:
                await redis.hdel(experiment_keys(lost.id).meta, "ready")
            stub = apb_grpc.AssignmentServiceStub(grpc.aio.insecure_channel(server.address))
            metadata = (("authorization", f"Bearer {mint_test_token('pay_module')}"),)
            request = apb.AssignAllRequest(subject_id="s-all")
            proxy.pause()
            try:
                answer = await stub.AssignAll(
                    request, metadata=metadata, timeout=CLIENT_DEADLINE_SECONDS
                )
            finally:
                proxy.resume()
            assert [d.experiment_key for d in answer.decisions] == [healthy.key]
            assert [(e.experiment_key, e.code) for e in answer.errors] == [
                (lost.key, grpc.StatusCode.UNAVAILABLE.value[0])
            ]
            assert answer.errors[0].reason == erpb.ERROR_REASON_STORE_UNAVAILABLE
            # Postgres back: both decide; the first decision stayed the only one.
            deadline = time.monotonic() + RECOVERY_DEADLINE_SECONDS
            while (
                again := await stub.AssignAll(
                    request, metadata=metadata, timeout=CLIENT_DEADLINE_SECONDS
                )
            ).errors:
                assert time.monotonic() < deadline, "AssignAll still answers errors"
                await asyncio.sleep(0.2)
            by_key = {d.experiment_key: d for d in again.decisions}
            assert set(by_key) == {healthy.key, lost.key}
            assert by_key[healthy.key].variant.id == answer.decisions[0].variant.id
            assert by_key[healthy.key].reason == STICKY
            await admin.close()
            await pay.close()
    finally:
        proxy.close()


async def test_killed_embedded_redis_is_restarted(short_tmp: Path) -> None:
    data_dir = short_tmp / "embedded"
    with run_sira_server(
        "", "", data_dir, extra_env={"SIRA_DATABASE_URL": "", "SIRA_REDIS_URL": ""}, timeout=300
    ) as server:
        admin, pay = clients(server)
        experiment = await launch(admin)
        held = await pay.assign(experiment.key, "s1")
        pid = int((data_dir / "redis" / "redis.pid").read_text().split()[0])
        kill(pid)
        deadline = time.monotonic() + RECOVERY_DEADLINE_SECONDS
        while pid_alive(pid):
            assert time.monotonic() < deadline, "redis-server survived SIGKILL"
            await asyncio.sleep(0.05)
        answer = await _eventually(lambda: pay.track(conversion(experiment, "s1", held.variant.id)))
        assert answer.outcome == ACCEPTED  # the append-only file kept the assignment
        assert (await pay.assign(experiment.key, "after-restart")).reason == NEW
        # The supervisor logs "restarted" once start() returns, which can be a moment
        # after the server already reconnected: wait for the line, with a deadline.
        while "embedded Redis restarted" not in server.log():
            assert time.monotonic() < deadline, f"no restart logged:\n{server.log()[-2000:]}"
            await asyncio.sleep(0.05)
        assert "embedded Redis died; restarting it" in server.log()
        await admin.close()
        await pay.close()


# --- helpers ------------------------------------------------------------------------------


async def _eventually(call: Callable[[], Awaitable[Any]]) -> Any:
    """The first answer of `call` that is not UNAVAILABLE, within the recovery deadline."""
    deadline = time.monotonic() + RECOVERY_DEADLINE_SECONDS
    while True:
        try:
            return await call()
        except (UnavailableError, Unavailable):
            assert time.monotonic() < deadline, "still UNAVAILABLE"
        await asyncio.sleep(0.2)


def _replies(client: Any, code: str) -> bool:
    try:
        client.ping()
    except redis_errors.RedisError as exc:
        return str(exc).startswith(code) or (
            code == "LOADING" and isinstance(exc, redis_errors.BusyLoadingError)
        )
    return False


def _synced_replica(client: Any) -> bool:
    replication = client.info("replication")
    return bool(replication["role"] == "slave" and replication.get("master_link_status") == "up")


def _master_down(client: Any) -> bool:
    try:
        client.get("{t}:probe")
    except redis_errors.MasterDownError:
        return True
    return False


async def _until(server: RedisServer, probe: Callable[[Any], bool], what: str) -> None:
    await asyncio.to_thread(server.wait_until, probe, what)


async def _until_loading(server: RedisServer) -> None:
    await _until(server, lambda c: _replies(c, "LOADING"), "LOADING")


def _quietly(call: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(redis_errors.RedisError, OSError):
        call(*args)
