"""Write-behind flusher: the experiments' Redis streams -> Postgres, exactly once.

Each process runs one consumer of the group ``flusher`` on every stream in
``sira:streams``. One pass (`flush_once`) reads, per stream, this consumer's
own pending entries (retries), entries other consumers left idle too long
(XAUTOCLAIM: they crashed) and new ones; writes them in ONE Postgres
transaction (COPY into temp tables, then ``INSERT ... SELECT ... ON CONFLICT
DO NOTHING``, assignments before metrics); and only after the commit
acknowledges and deletes them (``ack.lua``). Delivery is at least once, the
tables are idempotent (primary keys, unique event ids): nothing lost, nothing
doubled.

A metric needs its assignment row (foreign key). In one stream the
assignment record always precedes the subject's metrics, so it is in the
same batch or an earlier one; only when an earlier batch is still held by
another consumer (crashed, not reclaimed yet) can a metric arrive first. Such
a metric is left pending and retried on the next passes; after
``orphan_grace_seconds`` it is moved to the ``dead`` stream. Records of a
deleted experiment (no variant row) are discarded. A record Postgres rejects
outright (constraint violation) is isolated and dead-lettered, so one bad
record never blocks the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis import exceptions as redis_errors

from sira_server.errors import Unavailable
from sira_server.store.faults import is_closed_writer_race
from sira_server.store.hot_keys import (
    FLUSHER_GROUP,
    STREAM_REGISTRY,
    AssignmentRecord,
    HotLayout,
    MetricRecord,
    dead_key_of_stream,
    experiment_id_of_stream,
    parse_record,
)
from sira_server.store.hot_state import read_posteriors
from sira_server.store.lua_scripts import ACK_SCRIPT
from sira_server.store.redis_conn import RedisClient
from sira_server.store.script_transport import PipelineTransport, run_scripts

log = logging.getLogger(__name__)

BANDIT_REFRESH_LOCK = "sira:bandit_state_refresh"
DEAD_LETTER_MAXLEN = 100_000
MAX_REASON_CHARS = 500
LINGER_SECONDS = 0.25
"""Pause after a part batch so the next one grows: Postgres pays a transaction, two
temp tables and an INSERT per pass. 50 ms -> 250 ms: flusher CPU per record down by
a third to a half, Postgres's by about 40 % (docs/benchmarks.md, "Group commit");
Postgres lags Redis by up to this much more under load (it is write-behind)."""

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # includes TimeoutError, refused connections
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # "cannot switch to state ...": a connection broken mid-operation (Postgres stopped).
    asyncpg.InternalClientError,
    redis_errors.RedisError,
    redis_errors.RedisClusterException,  # a cluster failover in progress (not a RedisError)
    Unavailable,  # a Redis failure as `store.faults` maps it (the ack script's path)
)
"""Failures a pass reports and `run` retries with backoff; entries stay pending."""


def is_transient(exc: BaseException) -> bool:
    """A failure a pass reports and `run` retries: one of TRANSIENT_ERRORS, or redis-py's
    closed-writer race (`store.faults`), which escapes as AttributeError or RuntimeError
    when a Redis connection is reset under a write (a failover)."""
    return isinstance(exc, TRANSIENT_ERRORS) or is_closed_writer_race(exc)


DATA_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)
"""Postgres rejects some record itself: isolate it instead of retrying the batch."""


class SimulatedCrashError(Exception):
    """Raised by the crash-simulation flags (tests): the pass stops right there."""


@dataclass
class FlushStats:
    """What one pass (or a drain) did; fed to `on_flush` for metrics."""

    entries_read: int = 0
    assignments_inserted: int = 0
    """Rows really inserted (replays of rows already there are not counted)."""
    metrics_inserted: int = 0
    acked: int = 0
    orphans: int = 0
    """Metrics left pending: their assignment is not in Postgres yet."""
    dead_lettered: int = 0
    discarded: int = 0
    """Records of deleted experiments/variants, acknowledged without a write."""
    latency_seconds: float = 0.0
    """Duration of the pass, read to acknowledgement."""

    def add(self, other: FlushStats) -> None:
        for name in (
            "entries_read",
            "assignments_inserted",
            "metrics_inserted",
            "acked",
            "orphans",
            "dead_lettered",
            "discarded",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency_seconds += other.latency_seconds


@dataclass
class _Entry:
    stream: str
    entry_id: bytes
    record: AssignmentRecord | MetricRecord | None
    """None: malformed, dead-letter it."""
    raw: dict[bytes, bytes]


WriteBehindEntry = _Entry
"""One stream entry as the flusher writes it (public for the dead-letter replay)."""


def parse_entry(stream: str, entry_id: bytes, raw: dict[bytes, bytes]) -> _Entry:
    """An entry of `stream` (its write-behind stream key) from its raw fields."""
    return _Entry(stream, entry_id, _parse(raw), raw)


@dataclass
class _Outcome:
    """Per entry index: how the write went."""

    orphans: set[int] = field(default_factory=set)
    dead: dict[int, str] = field(default_factory=dict)
    discarded: set[int] = field(default_factory=set)
    assignments_inserted: int = 0
    metrics_inserted: int = 0

    def copy(self) -> _Outcome:
        return _Outcome(set(self.orphans), dict(self.dead), set(self.discarded))


class WriteBehindFlusher:
    """One consumer of the write-behind streams (one per process)."""

    fail_before_commit: bool = False
    """Test hook: raise SimulatedCrashError inside the transaction (it rolls back)."""
    fail_after_commit_before_ack: bool = False
    """Test hook: raise SimulatedCrashError after the commit, before XACK."""

    def __init__(
        self,
        redis: RedisClient,
        pool: asyncpg.Pool,
        consumer_name: str,
        *,
        batch_size: int = 1000,
        claim_idle_ms: int = 30_000,
        idle_sleep_seconds: float = 0.1,
        linger_seconds: float = LINGER_SECONDS,
        backoff_initial_seconds: float = 0.1,
        backoff_max_seconds: float = 5.0,
        bandit_refresh_seconds: float = 5.0,
        orphan_grace_seconds: float = 300.0,
        on_flush: Callable[[FlushStats], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        layout: HotLayout | None = None,
    ) -> None:
        self.redis = redis
        self.layout = layout or HotLayout()
        self.pool = pool
        self.consumer_name = consumer_name
        self.batch_size = batch_size
        self.claim_idle_ms = claim_idle_ms
        self.idle_sleep_seconds = idle_sleep_seconds
        self.linger_seconds = linger_seconds
        self.backoff_initial_seconds = backoff_initial_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.bandit_refresh_seconds = bandit_refresh_seconds
        self.orphan_grace_seconds = orphan_grace_seconds
        self.on_flush = on_flush
        self.on_error = on_error
        self._claim_cursor: dict[str, str] = {}
        self._orphan_since: dict[tuple[str, bytes], float] = {}
        self._stop = asyncio.Event()

    # --- loop ---

    async def run(self) -> None:
        """Flush until `stop()`; transient failures back off, entries stay pending.

        Also refreshes ``experiment_bandit_state`` every ``bandit_refresh_seconds``.
        On shutdown: `stop()`, await this task, then `drain()`.
        """
        backoff = self.backoff_initial_seconds
        next_refresh = time.monotonic()
        while not self._stop.is_set():
            try:
                stats = await self.flush_once()
                if time.monotonic() >= next_refresh:
                    await self.refresh_bandit_state()
                    next_refresh = time.monotonic() + self.bandit_refresh_seconds
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("write-behind flush failed, retrying in %.1fs: %s", backoff, exc)
                if self.on_error is not None:
                    self.on_error(exc)
                await self._sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max_seconds)
                continue
            backoff = self.backoff_initial_seconds
            if stats.acked == 0:
                await self._sleep(self.idle_sleep_seconds)
            elif stats.entries_read < self.batch_size:
                # A part batch: let the next one grow. Postgres pays a transaction, two
                # temp tables and an INSERT per pass, so a pass every few milliseconds
                # under steady load costs several times the CPU per row (docs/benchmarks.md).
                await self._sleep(self.linger_seconds)

    def stop(self) -> None:
        self._stop.set()

    async def drain(self, timeout: float) -> FlushStats:  # noqa: ASYNC109 (stops between passes)
        """On shutdown: flush until nothing is left to write, or `timeout` seconds."""
        total = FlushStats()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                stats = await asyncio.wait_for(
                    self.flush_once(), timeout=max(0.1, deadline - time.monotonic())
                )
            except Exception as exc:  # TimeoutError is an OSError
                if not is_transient(exc):
                    raise
                log.warning("write-behind drain: %s", exc)
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                continue
            total.add(stats)
            if stats.acked == 0:
                break
        return total

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # --- one pass ---

    async def flush_once(self) -> FlushStats:
        """Read, write in one transaction, then acknowledge. Raises on failure."""
        started = time.monotonic()
        stats = FlushStats()
        streams = await self._streams()
        entries = await self._read(streams)
        stats.entries_read = len(entries)
        if not entries:
            return stats
        outcome = await self._write(entries)
        await self._dead_letter(entries, outcome.dead)
        done = [
            i
            for i in range(len(entries))
            if i not in outcome.orphans  # stays pending, retried
        ]
        await self._ack(entries, done)
        now = time.monotonic()
        for i in done:
            self._orphan_since.pop((entries[i].stream, entries[i].entry_id), None)
        stats.assignments_inserted = outcome.assignments_inserted
        stats.metrics_inserted = outcome.metrics_inserted
        stats.acked = len(done)
        stats.orphans = len(outcome.orphans)
        stats.dead_lettered = len(outcome.dead)
        stats.discarded = len(outcome.discarded)
        stats.latency_seconds = now - started
        if self.on_flush is not None:
            self.on_flush(stats)
        return stats

    async def _streams(self) -> list[str]:
        """Registered write-behind streams (anything else in the registry is ignored)."""
        streams = []
        for raw in await self.redis.smembers(STREAM_REGISTRY):
            key = _decode(raw)
            try:
                experiment_id_of_stream(key)
            except ValueError:
                log.error("ignoring %r in %s: not a write-behind stream", key, STREAM_REGISTRY)
                continue
            streams.append(key)
        return sorted(streams)

    async def _read(self, streams: Sequence[str]) -> list[_Entry]:
        """Own pending, reclaimed idle and new entries of every stream, one round trip."""
        if not streams:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xreadgroup(FLUSHER_GROUP, self.consumer_name, {stream: "0"}, count=self.batch_size)
            pipe.xautoclaim(
                stream,
                FLUSHER_GROUP,
                self.consumer_name,
                self.claim_idle_ms,
                start_id=self._claim_cursor.get(stream, "0-0"),
                count=self.batch_size,
            )
            pipe.xreadgroup(FLUSHER_GROUP, self.consumer_name, {stream: ">"}, count=self.batch_size)
        replies = await pipe.execute(raise_on_error=False)
        entries: list[_Entry] = []
        seen: set[tuple[str, bytes]] = set()
        for index, stream in enumerate(streams):
            own, claimed, new = replies[3 * index : 3 * index + 3]
            if any(_is_missing_group(reply) for reply in (own, claimed, new)):
                continue  # stream or group gone (experiment deleted, Redis emptied)
            for reply in (own, claimed, new):
                if isinstance(reply, Exception):
                    raise reply
            self._claim_cursor[stream] = _decode(claimed[0])
            batch: list[tuple[bytes, dict[bytes, bytes]]] = []
            batch.extend(_stream_entries(own))
            batch.extend(claimed[1])
            batch.extend(_stream_entries(new))
            for entry_id, fields in sorted(batch, key=lambda item: _id_key(item[0])):
                if (stream, entry_id) in seen:
                    continue
                seen.add((stream, entry_id))
                entries.append(_Entry(stream, entry_id, _parse(fields), fields))
        return entries

    async def _write(self, entries: Sequence[_Entry]) -> _Outcome:
        base = _Outcome()
        for i, entry in enumerate(entries):
            if not entry.raw:
                base.discarded.add(i)  # content deleted: only the acknowledgement is left
            elif entry.record is None:
                base.dead[i] = "malformed write-behind record"
        live = [i for i, entry in enumerate(entries) if entry.record is not None]
        async with self.pool.acquire() as conn:
            outcome = base.copy()
            try:
                async with conn.transaction():
                    await _write_batch(conn, entries, live, outcome)
                    await self._hook("before_commit")
            except DATA_ERRORS as exc:
                log.warning("write-behind batch rejected (%s); isolating the bad records", exc)
                outcome = base.copy()
                await _write_one_by_one(conn, entries, live, outcome)
        await self._hook("after_commit")
        self._age_orphans(entries, outcome)
        return outcome

    async def write_entries(self, entries: Sequence[_Entry]) -> _Outcome:
        """Write entries read elsewhere (the dead-letter replay) as a pass would; no ack."""
        return await self._write(entries)

    async def _hook(self, stage: str) -> None:
        if stage == "before_commit" and self.fail_before_commit:
            raise SimulatedCrashError("simulated crash before the Postgres commit")
        if stage == "after_commit" and self.fail_after_commit_before_ack:
            raise SimulatedCrashError("simulated crash after the Postgres commit, before XACK")

    def _age_orphans(self, entries: Sequence[_Entry], outcome: _Outcome) -> None:
        """Orphans past their grace period go to the dead-letter stream."""
        now = time.monotonic()
        for i in list(outcome.orphans):
            since = self._orphan_since.setdefault((entries[i].stream, entries[i].entry_id), now)
            if now - since >= self.orphan_grace_seconds:
                outcome.orphans.discard(i)
                outcome.dead[i] = "assignment never reached Postgres"

    async def _dead_letter(self, entries: Sequence[_Entry], dead: dict[int, str]) -> None:
        if not dead:
            return
        pipe = self.redis.pipeline(transaction=False)
        for i, reason in dead.items():
            entry = entries[i]
            reason = reason[:MAX_REASON_CHARS]  # Postgres may quote the whole row
            log.error(
                "write-behind entry %s of %s dead-lettered (`sira-server deadletter list`): %s",
                entry.entry_id.decode(),
                entry.stream,
                reason,
            )
            dead_key = dead_key_of_stream(entry.stream)
            fields: dict[Any, Any] = {
                **entry.raw,
                b"reason": reason.encode(),
                b"origin": entry.entry_id,
            }
            pipe.xadd(dead_key, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        await pipe.execute()

    async def _ack(self, entries: Sequence[_Entry], indexes: Sequence[int]) -> None:
        by_stream: dict[str, list[bytes]] = {}
        for i in indexes:
            by_stream.setdefault(entries[i].stream, []).append(entries[i].entry_id)
        calls: list[tuple[Sequence[str], Sequence[Any]]] = []
        for stream, ids in by_stream.items():
            for start in range(0, len(ids), 1000):  # Lua unpack() stack limit
                calls.append(((stream,), (FLUSHER_GROUP, *ids[start : start + 1000])))
        if calls:
            replies = await run_scripts(PipelineTransport(self.redis), ACK_SCRIPT, calls)
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply

    # --- observability and snapshots ---

    async def backlog(self) -> dict[str, int]:
        """Entries per experiment not yet in Postgres (acked entries are deleted)."""
        streams = await self._streams()
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xlen(stream)
        lengths = await pipe.execute()
        backlog: dict[str, int] = {}
        for stream, length in zip(streams, lengths, strict=True):  # a stream per shard
            experiment_id = experiment_id_of_stream(stream)
            backlog[experiment_id] = backlog.get(experiment_id, 0) + int(length)
        return backlog

    async def refresh_bandit_state(self, *, force: bool = False) -> int:
        """UPSERT experiment_bandit_state from the hot counters; rows written.

        One process per interval does it (a Redis lock), unless `force`.
        """
        if not force:
            interval_ms = max(1, int(self.bandit_refresh_seconds * 1000))
            if not await self.redis.set(
                BANDIT_REFRESH_LOCK, self.consumer_name, nx=True, px=interval_ms
            ):
                return 0
        experiment_ids = [experiment_id_of_stream(s) for s in await self._streams()]
        experiment_ids = list(dict.fromkeys(experiment_ids))  # one per experiment, not shard
        posteriors, _missing = await read_posteriors(self.redis, experiment_ids, self.layout)
        exp_col: list[str] = []
        var_col: list[str] = []
        trials_col: list[int] = []
        succ_col: list[int] = []
        for experiment_id, variants in posteriors.items():
            for variant_id, (trials, successes) in variants.items():
                exp_col.append(experiment_id)
                var_col.append(variant_id)
                trials_col.append(trials)
                succ_col.append(successes)
        if not exp_col:
            return 0
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                _UPSERT_BANDIT_STATE, exp_col, var_col, trials_col, succ_col
            )
        return _row_count(status)


# --- Postgres ------------------------------------------------------------------------

_CREATE_TEMP_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS sira_wb_assignments (
    ord int, experiment_id text, molam_id text, variant_id text,
    propensity float8, context text, assigned_ms bigint
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS sira_wb_metrics (
    ord int, experiment_id text, event_id text, variant_id text, molam_id text,
    event_type text, value float8, currency text, occurred_ms bigint, received_ms bigint
) ON COMMIT DELETE ROWS;
TRUNCATE sira_wb_assignments, sira_wb_metrics;
"""

_ASSIGNMENT_COLUMNS = (
    "ord", "experiment_id", "molam_id", "variant_id", "propensity", "context", "assigned_ms",
)  # fmt: skip
_METRIC_COLUMNS = (
    "ord", "experiment_id", "event_id", "variant_id", "molam_id", "event_type", "value",
    "currency", "occurred_ms", "received_ms",
)  # fmt: skip

# Milliseconds -> timestamptz without going through a float.
_MS = "(timestamptz 'epoch' + {} * interval '1 millisecond')"

# Each write is one statement, so the rows it inserts and the rows it reports back are
# judged on one snapshot: under READ COMMITTED two statements could see another
# consumer commit in between. One statement is also one round trip and one plan per
# batch instead of two.

# Only for a variant that exists: a missing one means a deleted experiment (its ords come
# back, to be discarded).
_INSERT_ASSIGNMENTS = f"""
WITH inserted AS (
    INSERT INTO experiment_assignments
        (experiment_id, molam_id, variant_id, propensity, context, assigned_at)
    SELECT t.experiment_id::uuid, t.molam_id, t.variant_id::uuid, t.propensity,
           t.context::jsonb, {_MS.format("t.assigned_ms")}
    FROM sira_wb_assignments t
    JOIN experiment_variants v
      ON v.experiment_id = t.experiment_id::uuid AND v.id = t.variant_id::uuid
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted) AS inserted,
       array(SELECT t.ord FROM sira_wb_assignments t
             WHERE NOT EXISTS (SELECT 1 FROM experiment_variants v
                               WHERE v.experiment_id = t.experiment_id::uuid
                                 AND v.id = t.variant_id::uuid)) AS unknown_variant
"""

# Only for a subject whose assignment row is there (the foreign key); the others come
# back: orphans if their variant exists (the assignment may still be on its way),
# discarded if not. The assignment is probed once per row through LATERAL ... LIMIT 1,
# which the planner cannot flatten into a join: as a join (or an EXISTS), with no
# statistics on the temp table, it hashed the whole experiment_assignments table on
# every pass of a mid-sized table (7 us per row at 20,000 assignments, growing with it).
_INSERT_METRICS = f"""
WITH checked AS MATERIALIZED (
    SELECT t.*, a.found IS NOT NULL AS assigned
    FROM sira_wb_metrics t
    LEFT JOIN LATERAL (
        SELECT true AS found FROM experiment_assignments a
        WHERE a.experiment_id = t.experiment_id::uuid AND a.molam_id = t.molam_id
          AND a.variant_id = t.variant_id::uuid
        LIMIT 1
    ) a ON true
), inserted AS (
    INSERT INTO experiment_metrics
        (experiment_id, event_id, variant_id, molam_id, event_type, value, currency,
         occurred_at, received_at)
    SELECT t.experiment_id::uuid, t.event_id, t.variant_id::uuid, t.molam_id, t.event_type,
           t.value, t.currency, {_MS.format("t.occurred_ms")}, {_MS.format("t.received_ms")}
    FROM checked t
    WHERE t.assigned
    ON CONFLICT DO NOTHING
    RETURNING 1
), unassigned AS (
    SELECT t.ord,
           EXISTS (SELECT 1 FROM experiment_variants v
                   WHERE v.experiment_id = t.experiment_id::uuid
                     AND v.id = t.variant_id::uuid) AS variant_exists
    FROM checked t
    WHERE NOT t.assigned
)
SELECT (SELECT count(*) FROM inserted) AS inserted,
       array(SELECT ord FROM unassigned WHERE variant_exists) AS orphans,
       array(SELECT ord FROM unassigned WHERE NOT variant_exists) AS unknown_variant
"""

_UPSERT_BANDIT_STATE = """
INSERT INTO experiment_bandit_state
    (experiment_id, variant_id, alpha, beta, total_samples, successes, updated_at)
SELECT x.e, x.v, 1 + x.s, 1 + x.t - x.s, x.t, x.s, now()
FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::bigint[]) AS x(e, v, t, s)
JOIN experiment_variants ev ON ev.experiment_id = x.e AND ev.id = x.v
ON CONFLICT (experiment_id, variant_id) DO UPDATE
SET alpha = EXCLUDED.alpha, beta = EXCLUDED.beta, total_samples = EXCLUDED.total_samples,
    successes = EXCLUDED.successes, updated_at = EXCLUDED.updated_at
"""


async def _write_batch(
    conn: asyncpg.Connection, entries: Sequence[_Entry], indexes: Sequence[int], out: _Outcome
) -> None:
    """COPY the records into temp tables and insert them; fills `out`."""
    assignments: list[tuple[Any, ...]] = []
    metrics: list[tuple[Any, ...]] = []
    for i in indexes:
        entry = entries[i]
        record = entry.record
        experiment_id = experiment_id_of_stream(entry.stream)
        if isinstance(record, AssignmentRecord):
            assignments.append((
                i, experiment_id, record.subject_id, record.variant_id, record.propensity,
                record.context_json, record.assigned_ms,
            ))  # fmt: skip
        elif isinstance(record, MetricRecord):
            metrics.append((
                i, experiment_id, record.event_id, record.variant_id, record.subject_id,
                record.event_type, record.value, record.currency, record.occurred_ms,
                record.received_ms,
            ))  # fmt: skip
    await conn.execute(_CREATE_TEMP_TABLES)
    if assignments:
        await conn.copy_records_to_table(
            "sira_wb_assignments", records=assignments, columns=_ASSIGNMENT_COLUMNS
        )
        written = await conn.fetchrow(_INSERT_ASSIGNMENTS)
        out.assignments_inserted += written["inserted"]
        out.discarded.update(written["unknown_variant"])
    if metrics:
        await conn.copy_records_to_table(
            "sira_wb_metrics", records=metrics, columns=_METRIC_COLUMNS
        )
        written = await conn.fetchrow(_INSERT_METRICS)
        out.metrics_inserted += written["inserted"]
        out.orphans.update(written["orphans"])
        out.discarded.update(written["unknown_variant"])


async def _write_one_by_one(
    conn: asyncpg.Connection, entries: Sequence[_Entry], indexes: Sequence[int], out: _Outcome
) -> None:
    """Fallback after a rejected batch: each record in its own savepoint."""
    async with conn.transaction():
        for i in indexes:
            try:
                async with conn.transaction():
                    await _write_batch(conn, entries, [i], out)
            except DATA_ERRORS as exc:
                out.dead[i] = f"rejected by PostgreSQL: {exc}"


def _row_count(status: str) -> int:
    """Rows of an ``INSERT 0 n`` command tag."""
    return int(status.rsplit(" ", 1)[-1])


# --- stream replies ------------------------------------------------------------------


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, seq = entry_id.split(b"-")
    return int(ms), int(seq)


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Entries of an XREADGROUP reply on one stream ([[stream, entries]])."""
    if not reply:
        return []
    entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1]
    return entries


def _is_missing_group(reply: Any) -> bool:
    return isinstance(reply, redis_errors.ResponseError) and str(reply).startswith("NOGROUP")


def _parse(fields: dict[bytes, bytes]) -> AssignmentRecord | MetricRecord | None:
    if not fields:
        return None
    try:
        return parse_record(fields)
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


RESTART_SECONDS = 1.0


async def run_restarting(
    flusher: WriteBehindFlusher, restart_seconds: float = RESTART_SECONDS
) -> None:
    """`flusher.run()` until `stop()`, restarted after any error it lets escape: a dead
    flusher would silently stop every write to Postgres while the streams grow (its
    entries stay pending, so a restart loses nothing)."""
    while True:
        try:
            await flusher.run()
            return  # stop() was called
        except Exception:
            log.exception("write-behind flusher crashed; restarting it")
        await asyncio.sleep(restart_seconds)
