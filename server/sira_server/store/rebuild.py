"""Rebuild an experiment's hot Redis state from Postgres (the system of record).

Used when Redis comes back without the state (the Lua scripts find no
``ready`` marker) or on demand. The image is Postgres's rows plus whatever
the write-behind stream still holds (records not flushed yet), merged with
the same rules as the Lua scripts, so nothing the stream still has is lost.
Records acknowledged by Redis but lost with its data before the flusher
wrote them are gone: that is the documented loss window (none with
``appendfsync always``).

While the marker is absent every script refuses to write, so the image
cannot go stale during the rebuild; a lock (SET NX PX) makes one process
rebuild while the others wait for the marker.

With S shards (`store.hot_keys.HotLayout`) each shard is rebuilt on its own, from its
subjects' rows (Postgres computes the shard of each row, `SHARD_SQL`) and its own
stream: a master lost with a few shards costs only their rebuild.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import asyncpg

from sira_server.errors import NotFound, Unavailable
from sira_server.store.hot_keys import (
    SHARD_SQL,
    AssignmentRecord,
    ExperimentKeys,
    MetricRecord,
    event_member,
    experiment_keys,
    format_assignment,
    parse_assignment,
    parse_record,
)
from sira_server.store.hot_state import (
    CHURN,
    CONVERSION,
    REFUND,
    REWARD_CONVERSION_NOT_REFUNDED,
    REWARDS,
    ensure_stream,
)
from sira_server.store.lua_scripts import LOCK_SCRIPT
from sira_server.store.redis_conn import RedisClient
from sira_server.store.script_transport import PipelineTransport, run_script

WRITE_CHUNK = 1000
"""Fields or members per Redis command when writing the image."""
POLL_SECONDS = 0.02

POSTGRES_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection broken mid-operation
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
)


@dataclass
class HotImage:
    """In-memory hot state of one experiment, built with the Lua scripts' rules."""

    variant_ids: Sequence[str]
    reward: str
    assignments: dict[str, str] = field(default_factory=dict)
    """subject -> "variant_id|propensity|assigned_ms"."""
    trials: Counter[str] = field(default_factory=Counter)
    converted: set[str] = field(default_factory=set)
    refunded: set[str] = field(default_factory=set)
    churned: set[str] = field(default_factory=set)
    outcome: dict[str, tuple[int, int]] = field(default_factory=dict)
    """subject -> (latest conversion ms, latest refund ms), 0 for none (track.lua's
    ``outcome`` hash, kept under reward conversion_not_refunded only)."""
    events: set[str] = field(default_factory=set)
    counters: dict[str, float] = field(default_factory=dict)
    """``cnt`` hash fields; float only for amounts."""

    def add_assignment(
        self, subject_id: str, variant_id: str, propensity: float, assigned_ms: int
    ) -> None:
        if subject_id in self.assignments:  # first one wins, as in assign.lua
            return
        self.assignments[subject_id] = format_assignment(variant_id, propensity, assigned_ms)
        self.trials[variant_id] += 1

    def add_metric(
        self,
        subject_id: str,
        variant_id: str,
        event_type: str,
        value: float,
        currency: str | None,
        event_id: str,
        occurred_ms: int,
    ) -> None:
        held = self.assignments.get(subject_id)
        if held is None or parse_assignment(held).variant_id != variant_id:
            return
        member = event_member(event_id, subject_id)
        if member in self.events:
            return
        self.events.add(member)
        prefix = f"{variant_id}|"
        has_amount = bool(currency) and value > 0
        if event_type == CONVERSION:
            self._bump(prefix + "conversions")
            if has_amount:
                self._bump(f"{prefix}revenue|{currency}", value)
            if subject_id not in self.converted:
                self.converted.add(subject_id)
                self._bump(prefix + "converted_subjects")
            self._settle(subject_id, occurred_ms, conversion=True)
        elif event_type == REFUND:
            self._bump(prefix + "refunds")
            if has_amount:
                self._bump(f"{prefix}refund_amount|{currency}", value)
            if subject_id not in self.refunded:
                self.refunded.add(subject_id)
                self._bump(prefix + "refunded_subjects")
            self._settle(subject_id, occurred_ms, conversion=False)
        elif event_type == CHURN:
            self._bump(prefix + "churns")
            if subject_id not in self.churned:
                self.churned.add(subject_id)
                self._bump(prefix + "churned_subjects")
        else:
            self._bump(f"{prefix}custom|{event_type}")

    def add_record(self, record: AssignmentRecord | MetricRecord) -> None:
        if isinstance(record, AssignmentRecord):
            self.add_assignment(
                record.subject_id, record.variant_id, record.propensity, record.assigned_ms
            )
        else:
            self.add_metric(
                record.subject_id,
                record.variant_id,
                record.event_type,
                record.value,
                record.currency,
                record.event_id,
                record.occurred_ms,
            )

    def _settle(self, subject_id: str, occurred_ms: int, *, conversion: bool) -> None:
        if self.reward != REWARD_CONVERSION_NOT_REFUNDED:
            return
        conv_ms, refund_ms = self.outcome.get(subject_id, (0, 0))
        if conversion:
            conv_ms = max(conv_ms, occurred_ms)
        else:
            refund_ms = max(refund_ms, occurred_ms)
        self.outcome[subject_id] = (conv_ms, refund_ms)

    def successes(self) -> Counter[str]:
        """Converted subjects per variant. Under reward conversion_not_refunded, minus those
        with a refund at or after their latest conversion (by occurrence time, as track.lua:
        a refund before any conversion blocks nothing, a later conversion counts again)."""
        result: Counter[str] = Counter()
        for subject_id in self.converted:
            if self.reward == REWARD_CONVERSION_NOT_REFUNDED:
                conv_ms, refund_ms = self.outcome[subject_id]
                if refund_ms >= conv_ms:
                    continue
            result[parse_assignment(self.assignments[subject_id]).variant_id] += 1
        return result

    def _bump(self, name: str, amount: float = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount


async def load_experiment_shape(
    pool: asyncpg.Pool, experiment_id: str
) -> tuple[list[str], str] | None:
    """(variant ids, reward) of the experiment, or None when Postgres does not know it."""
    async with pool.acquire() as conn:
        reward = await conn.fetchval("SELECT reward FROM experiments WHERE id = $1", experiment_id)
        if reward is None:
            return None
        rows = await conn.fetch(
            "SELECT id::text FROM experiment_variants WHERE experiment_id = $1 ORDER BY position",
            experiment_id,
        )
    return [row[0] for row in rows], str(reward)


async def rebuild_from_postgres(
    redis: RedisClient,
    pool: asyncpg.Pool,
    experiment_id: str,
    *,
    force: bool = False,
    lock_ms: int = 120_000,
    wait_seconds: float = 60.0,
    keys: ExperimentKeys | None = None,
) -> bool:
    """Like `rebuild_experiment`, reading the variants and reward from Postgres."""
    keys = keys or experiment_keys(experiment_id)
    if not force and await redis.hexists(keys.meta, "ready"):
        return False
    try:
        shape = await load_experiment_shape(pool, experiment_id)
    except POSTGRES_ERRORS as exc:
        raise _postgres_unavailable(exc) from exc
    if shape is None:
        raise NotFound(
            f"experiment {experiment_id} does not exist",
            metadata={"experiment_id": experiment_id},
        )
    variant_ids, reward = shape
    return await rebuild_experiment(
        redis,
        pool,
        experiment_id,
        variant_ids,
        reward,
        force=force,
        lock_ms=lock_ms,
        wait_seconds=wait_seconds,
        keys=keys,
    )


async def rebuild_experiment(
    redis: RedisClient,
    pool: asyncpg.Pool,
    experiment_id: str,
    variant_ids: Sequence[str],
    reward: str,
    *,
    force: bool = False,
    lock_ms: int = 120_000,
    wait_seconds: float = 60.0,
    keys: ExperimentKeys | None = None,
) -> bool:
    """Recompute the hot state from Postgres (+ the unflushed stream) and mark it ready;
    with `keys`, only that shard's (default: the one-shard layout).

    Returns True when this call rebuilt, False when the state was already
    ready or another process rebuilt it meanwhile. With ``force`` the state
    is rebuilt even if ready (scripts wait for it meanwhile).
    """
    if reward not in REWARDS:
        raise ValueError(f"unknown reward {reward!r}")
    keys = keys or experiment_keys(experiment_id)
    token = secrets.token_hex(16)
    deadline = time.monotonic() + wait_seconds
    while True:
        if not force and await redis.hexists(keys.meta, "ready"):
            return False
        if await redis.set(keys.lock, token, nx=True, px=lock_ms):
            break
        if time.monotonic() >= deadline:
            raise Unavailable(
                f"timed out waiting for the rebuild of experiment {experiment_id}",
                metadata={"store": "redis", "experiment_id": experiment_id},
            )
        await asyncio.sleep(POLL_SECONDS)
    try:
        if not force and await redis.hexists(keys.meta, "ready"):
            return False  # rebuilt by the previous lock holder
        # Scripts stop writing from here on: the image cannot go stale.
        await redis.hdel(keys.meta, "ready")
        image = HotImage(variant_ids=list(variant_ids), reward=reward)
        # Stream first, then Postgres: an entry flushed (and deleted) in
        # between is then in Postgres; one in both is deduplicated.
        unflushed = await _unflushed_records(redis, keys)
        try:
            await _load_postgres(pool, keys, image)
        except POSTGRES_ERRORS as exc:
            raise _postgres_unavailable(exc) from exc
        for record in unflushed:
            image.add_record(record)
        await _write_image(redis, keys, image, token, lock_ms)
        return True
    finally:
        await run_script(PipelineTransport(redis), LOCK_SCRIPT, (keys.lock,), (token, "release", 0))


async def _unflushed_records(
    redis: RedisClient, keys: ExperimentKeys
) -> list[AssignmentRecord | MetricRecord]:
    records: list[AssignmentRecord | MetricRecord] = []
    start = "-"
    while True:
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await redis.xrange(keys.wb, min=start, max="+", count=WRITE_CHUNK),
        )
        for _entry_id, fields in entries:
            try:
                records.append(parse_record(fields))
            except (KeyError, ValueError):
                continue  # the flusher dead-letters it
        if len(entries) < WRITE_CHUNK:
            return records
        start = "(" + entries[-1][0].decode()


async def _load_postgres(pool: asyncpg.Pool, keys: ExperimentKeys, image: HotImage) -> None:
    """Assignments, then metrics, from one snapshot (metrics never lack their assignment);
    only the subjects of `keys`' shard."""
    in_shard = ""
    if keys.shards > 1:
        in_shard = f" AND {SHARD_SQL.format(column='molam_id', shards=keys.shards)} = {keys.shard}"
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        async for row in conn.cursor(
            "SELECT molam_id, variant_id::text, propensity,"
            " (extract(epoch FROM assigned_at) * 1000)::bigint"
            " FROM experiment_assignments WHERE experiment_id = $1" + in_shard,
            keys.experiment_id,
            prefetch=WRITE_CHUNK * 5,
        ):
            image.add_assignment(row[0], row[1], row[2], row[3])
        async for row in conn.cursor(
            "SELECT molam_id, variant_id::text, event_type, value, currency, event_id,"
            " (extract(epoch FROM occurred_at) * 1000)::bigint"
            " FROM experiment_metrics WHERE experiment_id = $1" + in_shard,
            keys.experiment_id,
            prefetch=WRITE_CHUNK * 5,
        ):
            image.add_metric(row[0], row[1], row[2], row[3], row[4], row[5], row[6])


def _image_commands(keys: ExperimentKeys, image: HotImage) -> Iterator[tuple[str, str, list[str]]]:
    """(command, key, arguments) writing the image, each at most WRITE_CHUNK items."""
    variants = sorted({*image.variant_ids, *image.trials})
    successes = image.successes()
    hashes: list[tuple[str, Iterable[tuple[str, str]]]] = [
        (keys.trials, ((v, str(image.trials.get(v, 0))) for v in variants)),
        (keys.succ, ((v, str(successes.get(v, 0))) for v in variants)),
        (keys.asg, image.assignments.items()),
        (keys.cnt, ((name, _number(value)) for name, value in image.counters.items())),
        (keys.outcome, ((s, f"{c}|{r}") for s, (c, r) in image.outcome.items())),
    ]
    for key, pairs in hashes:
        flat: list[str] = []
        for name, value in pairs:
            flat += (name, value)
            if len(flat) >= 2 * WRITE_CHUNK:
                yield "HSET", key, flat
                flat = []
        if flat:
            yield "HSET", key, flat
    sets = [
        (keys.conv, image.converted),
        (keys.refunded, image.refunded),
        (keys.churned, image.churned),
        (keys.events, image.events),
    ]
    for key, members in sets:
        ordered = sorted(members)
        for start in range(0, len(ordered), WRITE_CHUNK):
            yield "SADD", key, ordered[start : start + WRITE_CHUNK]


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


async def _write_image(
    redis: RedisClient, keys: ExperimentKeys, image: HotImage, token: str, lock_ms: int
) -> None:
    """Replace the state keys with the image; the ready marker goes last."""
    await redis.delete(*keys.state)
    pipe = redis.pipeline(transaction=False)
    for queued, (command, key, arguments) in enumerate(_image_commands(keys, image), 1):
        pipe.execute_command(command, key, *arguments)
        if queued % 20 == 0:  # bounded pipelines; the lock stays ours meanwhile
            await pipe.execute()
            await _keep_lock(redis, keys, token, lock_ms)
            pipe = redis.pipeline(transaction=False)
    await pipe.execute()
    await ensure_stream(redis, keys)
    await _keep_lock(redis, keys, token, lock_ms)
    await redis.hset(keys.meta, mapping={"reward": image.reward, "ready": 1})


async def _keep_lock(redis: RedisClient, keys: ExperimentKeys, token: str, lock_ms: int) -> None:
    """Extend the lock; if it expired and another process took over, stop writing."""
    lock = (keys.lock,), (token, "extend", lock_ms)
    if not await run_script(PipelineTransport(redis), LOCK_SCRIPT, *lock):
        raise Unavailable(
            f"lost the rebuild lock of experiment {keys.experiment_id}; retry",
            metadata={"store": "redis", "experiment_id": keys.experiment_id},
        )


def _postgres_unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(
        f"cannot rebuild the hot state: PostgreSQL is unavailable ({exc or type(exc).__name__})",
        metadata={"store": "postgres"},
    )
