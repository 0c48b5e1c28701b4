"""Hot state of the decision path in Redis: sticky assignments, bandit counters.

The keys and the formats stored under them are in `store.hot_keys`; the Lua
scripts in `store.lua_scripts`, run through a `store.script_transport` (injectable; its
error replies mapped by `store.faults`). Each Assign is one EVALSHA, and so are up to
`TRACK_CALL_EVENTS` tracked events of one experiment: a state change and its write-behind
record are one atomic step, which is what "acknowledged" means. When a script finds no
``ready`` marker (Redis lost its data), the state is rebuilt from Postgres under a lock
and the call retried.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import asyncpg
from redis import exceptions as redis_errors

from sira_server.config import ConfigError, StoreTimeouts

# The ``X as X`` imports are re-exports: tests import those names from this module.
from sira_server.errors import NotFound, Unavailable
from sira_server.store.coalesce import Coalescer
from sira_server.store.faults import domain_error, parse_redis_error, redis_call
from sira_server.store.hot_keys import FLUSHER_GROUP as FLUSHER_GROUP
from sira_server.store.hot_keys import (
    LAYOUT_KEY,
    Assignment,
    ExperimentKeys,
    parse_assignment,
    shard_of_stream,
)
from sira_server.store.hot_keys import STREAM_REGISTRY as STREAM_REGISTRY
from sira_server.store.hot_keys import HotLayout as HotLayout
from sira_server.store.hot_keys import experiment_keys as experiment_keys
from sira_server.store.lua_scripts import ASSIGN_SCRIPT, TRACK_SCRIPT
from sira_server.store.redis_conn import RedisClient
from sira_server.store.script_transport import (
    ScriptCall,
    ScriptTransport,
    default_transport,
    run_scripts,
)

REWARD_CONVERSION = "conversion"
REWARD_CONVERSION_NOT_REFUNDED = "conversion_not_refunded"
REWARDS = (REWARD_CONVERSION, REWARD_CONVERSION_NOT_REFUNDED)

CONVERSION = "conversion"
REFUND = "refund"
CHURN = "churn"

MAX_REBUILD_ATTEMPTS = 3

ShardItem = TypeVar("ShardItem")
ShardResult = TypeVar("ShardResult")


# --- values -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssignRequest:
    """One subject to make sticky (the arguments of `HotState.assign`)."""

    subject_id: str
    variant_id: str
    propensity: float
    context_json: str = "{}"


@dataclass(frozen=True, slots=True)
class AssignOutcome:
    created: bool
    """True when this call made the assignment; False when it already existed."""
    variant_id: str
    propensity: float
    assigned_ms: int


class TrackStatus(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    """The event id was already recorded; nothing changed."""
    NOT_ASSIGNED = "not_assigned"
    """The subject has no assignment in this experiment; nothing changed."""
    MISMATCH = "mismatch"
    """The subject is assigned another variant; nothing changed."""
    CAPPED = "capped"
    """Over the subject's hourly cap for this event type (`TrackEvent.cap`); not recorded."""


@dataclass(frozen=True, slots=True)
class TrackEvent:
    subject_id: str
    variant_id: str
    event_type: str
    """``conversion``, ``refund``, ``churn`` or a custom event name (slug)."""
    event_id: str
    occurred_ms: int
    value: float = 0.0
    currency: str | None = None
    cap: int = 0
    """At most this many events of this subject, type and experiment per clock hour
    (0: no cap; used for tracking without a service token)."""


@dataclass(frozen=True, slots=True)
class TrackOutcome:
    status: TrackStatus
    first_conversion: bool = False
    """The event is the subject's first conversion (one success for its variant)."""
    assigned_variant_id: str | None = None
    """For MISMATCH: the variant the subject really has."""


@dataclass(frozen=True, slots=True)
class VariantCounters:
    """Observed results of one variant, from the hot counters."""

    assigned_subjects: int = 0
    successes: int = 0
    conversions: int = 0
    converted_subjects: int = 0
    refunds: int = 0
    refunded_subjects: int = 0
    churns: int = 0
    churned_subjects: int = 0
    revenue: dict[str, float] = field(default_factory=dict)
    """Sum of conversion values per currency."""
    refund_amount: dict[str, float] = field(default_factory=dict)
    """Sum of refund values per currency."""
    custom: dict[str, int] = field(default_factory=dict)
    """Custom event name -> count."""


Posteriors = dict[str, dict[str, tuple[int, int]]]
"""experiment_id -> variant_id -> (trials, successes)."""


# --- reads shared with the flusher ---------------------------------------------------


def _int_hash(raw: Mapping[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


async def read_posteriors(
    redis: RedisClient, experiment_ids: Sequence[str], layout: HotLayout | None = None
) -> tuple[Posteriors, list[str]]:
    """(trials, successes) per variant in one pipelined read, summed over the shards,
    and the ids not ready (some shard without its marker).

    Successes are read before trials: a success needs an earlier assignment, so the
    pair read this way always has successes <= trials, in each shard and in their sum.
    """
    layout = layout or HotLayout()
    pipe = redis.pipeline(transaction=False)
    for experiment_id in experiment_ids:
        for keys in layout.all_keys(experiment_id):
            pipe.hexists(keys.meta, "ready")
            pipe.hgetall(keys.succ)
            pipe.hgetall(keys.trials)
    results = iter(await pipe.execute())
    posteriors: Posteriors = {}
    missing: list[str] = []
    for experiment_id in experiment_ids:
        trials: dict[str, int] = {}
        succ: dict[str, int] = {}
        ready = True
        for _ in range(layout.shards):
            ready = bool(next(results)) and ready
            _add_counts(succ, _int_hash(next(results)))
            _add_counts(trials, _int_hash(next(results)))
        if not ready:
            missing.append(experiment_id)
            continue
        posteriors[experiment_id] = {
            variant: (count, succ.get(variant, 0)) for variant, count in trials.items()
        }
    return posteriors, missing


def _add_counts(total: dict[str, int], part: Mapping[str, int]) -> None:
    for name, count in part.items():
        total[name] = total.get(name, 0) + count


def _sum_hashes(hashes: Sequence[Mapping[bytes, bytes]]) -> dict[bytes, bytes]:
    """Field-wise sums of the shards' counter hashes (integers stay integers)."""
    if len(hashes) == 1:
        return dict(hashes[0])
    totals: dict[bytes, int | float] = {}
    for raw in hashes:
        for name, value in raw.items():
            number: int | float
            try:
                number = int(value)
            except ValueError:
                number = float(value)
            totals[name] = totals.get(name, 0) + number
    return {
        name: (str(total) if isinstance(total, int) else repr(total)).encode()
        for name, total in totals.items()
    }


def _counters_from_hashes(
    trials: Mapping[bytes, bytes], succ: Mapping[bytes, bytes], cnt: Mapping[bytes, bytes]
) -> dict[str, VariantCounters]:
    parts: dict[str, dict[str, Any]] = {}
    for raw_variant, raw_value in trials.items():
        parts.setdefault(raw_variant.decode(), {})["assigned_subjects"] = int(raw_value)
    for raw_variant, raw_value in succ.items():
        parts.setdefault(raw_variant.decode(), {})["successes"] = int(raw_value)
    for raw_field, raw_value in cnt.items():
        variant, name, *rest = raw_field.decode().split("|")
        entry = parts.setdefault(variant, {})
        if rest:  # revenue|CUR, refund_amount|CUR, custom|name
            converted: float | int = int(raw_value) if name == "custom" else float(raw_value)
            entry.setdefault(name, {})[rest[0]] = converted
        else:
            entry[name] = int(raw_value)
    return {variant: VariantCounters(**values) for variant, values in parts.items()}


# --- the hot state -------------------------------------------------------------------


class AppliedWork(Protocol):
    """Told what the scripts applied, as their replies come back. Metrics count here,
    not on the response: a call its client abandoned still counts what it stored."""

    def assignment_created(self, experiment_id: str) -> None: ...

    def event_accepted(self, experiment_id: str, event_type: str) -> None: ...


class HotState:
    """The only interface to the hot Redis state; one per process.

    Every method is one pipelined round trip per shard it touches in the normal case
    (Assign and Track: one; the counters: one per shard, concurrently; a rebuild, when
    Redis lost the state, adds its own). Redis failures the store may recover
    from (`store.faults`) raise ``Unavailable`` with metadata ``store=redis``, and so
    does a round trip of a request past ``timeouts.redis_seconds`` or a wait for a
    rebuild past ``timeouts.rebuild_wait_seconds``. The client must return
    bytes (``decode_responses=False``, as `store.redis_conn.create_redis`).
    """

    def __init__(
        self,
        redis: RedisClient,
        pool: asyncpg.Pool,
        *,
        transport: ScriptTransport | None = None,
        rebuild_lock_ms: int = 120_000,
        rebuild_wait_seconds: float = 60.0,
        applied: AppliedWork | None = None,
        timeouts: StoreTimeouts | None = None,
        layout: HotLayout | None = None,
    ) -> None:
        """`transport`: how the Assign/Track scripts reach Redis (default: production's,
        `script_transport.default_transport`); closed by `close()`.
        `applied`: told of every new assignment and accepted event.
        `layout`: the shard count (`store.hot_keys`; one shard by default)."""
        self.redis = redis
        self.layout = layout or HotLayout()
        self._applied = applied
        self.pool = pool
        self.rebuild_lock_ms = rebuild_lock_ms
        self.rebuild_wait_seconds = rebuild_wait_seconds
        self.timeouts = timeouts or StoreTimeouts()
        self._rebuilds: dict[ExperimentKeys, asyncio.Future[bool]] = {}
        self.transport = transport or default_transport(redis, timeouts=self.timeouts)
        # Batches per shard: one round trip's scripts share a slot (and a WAIT target).
        self._assigns: Coalescer[ExperimentKeys, AssignRequest, AssignOutcome] = Coalescer(
            self._assign_shard
        )
        self._tracks: Coalescer[ExperimentKeys, TrackEvent, TrackOutcome] = Coalescer(
            self._track_shard
        )

    async def close(self) -> None:
        await self.transport.aclose()

    # --- lifecycle ---

    async def init_experiment(
        self, experiment_id: str, variant_ids: Sequence[str], reward: str
    ) -> None:
        """On Start (idempotent, any process, any time): make the hot state exist.

        Ready state: only the stream registration and the variants' zero
        counters are ensured. Missing state is built from Postgres (the rebuild:
        zero counters for a new experiment), never assumed empty, so calling
        this after Redis lost its data cannot reset counters or stickiness.
        """
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}")
        from sira_server.store.rebuild import rebuild_experiment  # imports this module

        async with redis_call():
            for keys in self.layout.all_keys(experiment_id):
                if not await self.redis.hexists(keys.meta, "ready"):
                    await rebuild_experiment(
                        self.redis,
                        self.pool,
                        experiment_id,
                        variant_ids,
                        reward,
                        lock_ms=self.rebuild_lock_ms,
                        wait_seconds=self.rebuild_wait_seconds,
                        keys=keys,
                    )
                    continue
                await ensure_stream(self.redis, keys)
                pipe = self.redis.pipeline(transaction=True)  # one slot: MULTI is cluster safe
                for variant_id in variant_ids:  # raw commands: see `counters`
                    pipe.execute_command("HSETNX", keys.trials, variant_id, 0)
                    pipe.execute_command("HSETNX", keys.succ, variant_id, 0)
                await pipe.execute()

    async def drop_experiment(self, experiment_id: str) -> None:
        """On Delete: every key of the experiment, unflushed records included."""
        async with redis_call():
            for keys in self.layout.all_keys(experiment_id):  # one slot per shard
                await self.redis.srem(STREAM_REGISTRY, keys.wb)
                await self.redis.delete(*keys.all)

    async def ensure_ready(
        self, experiment_id: str, *, force: bool = False, shard: int | None = None
    ) -> bool:
        """Rebuild the experiment's hot state (or only shard `shard`'s) from Postgres
        unless it exists.

        True when this process rebuilt some. Concurrent callers of one process
        share one attempt per shard (no herd polling the lock). NotFound when Postgres
        does not know the experiment; Unavailable when Redis or Postgres is down.
        """
        shards = range(self.layout.shards) if shard is None else (shard,)
        done = await asyncio.gather(  # shards at once: each is its own lock and query
            *(self._ensure_shard(self.layout.keys(experiment_id, s), force=force) for s in shards)
        )
        return any(done)

    async def _ensure_shard(self, keys: ExperimentKeys, *, force: bool) -> bool:
        if force:
            return await self._rebuild(keys, force=True)
        task = self._rebuilds.get(keys)
        if task is None:
            task = asyncio.ensure_future(self._rebuild(keys, force=False))
            self._rebuilds[keys] = task
            task.add_done_callback(lambda done: self._rebuild_done(keys, done))
        # Shielded: a cancelled request must not cancel the rebuild others wait for.
        try:
            async with asyncio.timeout(self.timeouts.rebuild_wait_seconds):
                return await asyncio.shield(task)
        except TimeoutError as exc:
            experiment_id = keys.experiment_id
            raise Unavailable(
                f"the hot state of experiment {experiment_id} is being rebuilt from"
                f" Postgres (over {self.timeouts.rebuild_wait_seconds:g}s); retry",
                metadata={"store": "redis", "experiment_id": experiment_id},
            ) from exc

    def _rebuild_done(self, keys: ExperimentKeys, task: asyncio.Future[bool]) -> None:
        self._rebuilds.pop(keys, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter gets it; none may be left

    async def _rebuild(self, keys: ExperimentKeys, *, force: bool) -> bool:
        from sira_server.store.rebuild import rebuild_from_postgres  # imports this module

        async with redis_call():
            return await rebuild_from_postgres(
                self.redis,
                self.pool,
                keys.experiment_id,
                force=force,
                lock_ms=self.rebuild_lock_ms,
                wait_seconds=self.rebuild_wait_seconds,
                keys=keys,
            )

    # --- decisions ---

    async def assign(
        self,
        experiment_id: str,
        subject_id: str,
        variant_id: str,
        propensity: float,
        context_json: str = "{}",
    ) -> AssignOutcome:
        """Make `variant_id` the subject's sticky assignment unless it already has one.

        The outcome carries the assignment that holds (possibly an older one). Calls for
        the same experiment that arrive together share one round trip (`coalesce`).
        """
        request = AssignRequest(subject_id, variant_id, propensity, context_json)
        keys = self.layout.keys_of_subject(experiment_id, subject_id)
        return await self._assigns.submit(keys, request)

    async def assign_many(
        self, experiment_id: str, requests: Sequence[AssignRequest]
    ) -> list[AssignOutcome | BaseException]:
        """Run the assign script for each request, in order, in one pipelined round trip
        per shard; an unknown variant fails only its own request (NotFound)."""
        return await self._per_shard(
            experiment_id, requests, [r.subject_id for r in requests], self._assign_shard
        )

    async def _per_shard(
        self,
        experiment_id: str,
        items: Sequence[ShardItem],
        subjects: Sequence[str],
        run: Callable[
            [ExperimentKeys, Sequence[ShardItem]], Awaitable[list[ShardResult | BaseException]]
        ],
    ) -> list[ShardResult | BaseException]:
        """`run` on each shard's share of `items` (the shards concurrently), answers in
        the order of `items`."""
        if self.layout.shards == 1:
            return await run(self.layout.keys(experiment_id, 0), items)
        by_shard: dict[ExperimentKeys, list[int]] = {}
        for index, subject_id in enumerate(subjects):
            keys = self.layout.keys_of_subject(experiment_id, subject_id)
            by_shard.setdefault(keys, []).append(index)
        answers: list[ShardResult | BaseException | None] = [None] * len(items)
        shares = list(by_shard.items())
        results = await asyncio.gather(
            *(run(k, [items[i] for i in ix]) for k, ix in shares), return_exceptions=True
        )
        for (_, indexes), result in zip(shares, results, strict=True):
            if isinstance(result, BaseException):  # that shard failed: its items only
                for index in indexes:
                    answers[index] = result
                continue
            for index, answer in zip(indexes, result, strict=True):
                answers[index] = answer
        return [answer for answer in answers if answer is not None]

    async def _assign_shard(
        self, keys: ExperimentKeys, requests: Sequence[AssignRequest]
    ) -> list[AssignOutcome | BaseException]:
        experiment_id = keys.experiment_id
        script_keys = (keys.meta, keys.asg, keys.trials, keys.wb)
        now_ms = _now_ms()
        outcomes: list[AssignOutcome | BaseException | None] = [None] * len(requests)
        todo = list(range(len(requests)))
        for _ in range(MAX_REBUILD_ATTEMPTS):
            calls = [(script_keys, _assign_args(requests[i], now_ms)) for i in todo]
            replies = await run_scripts(
                self.transport, ASSIGN_SCRIPT, calls, self.timeouts.redis_seconds
            )
            retry = []
            for index, reply in zip(todo, replies, strict=True):
                if isinstance(reply, BaseException):  # fails this request only
                    outcomes[index] = reply
                    continue
                tag = reply[0]
                if tag == b"R":
                    retry.append(index)
                elif tag == b"U":
                    outcomes[index] = _unknown_variant(experiment_id, requests[index].variant_id)
                else:
                    held = parse_assignment(reply[1])
                    if tag == b"C" and self._applied is not None:
                        self._applied.assignment_created(experiment_id)
                    outcomes[index] = AssignOutcome(
                        tag == b"C", held.variant_id, held.propensity, held.assigned_ms
                    )
            if not retry:
                return [outcome for outcome in outcomes if outcome is not None]
            await self.ensure_ready(experiment_id, shard=keys.shard)
            todo = retry
        raise _not_rebuilt(experiment_id)

    async def get_assignment(self, experiment_id: str, subject_id: str) -> Assignment | None:
        keys = self.layout.keys_of_subject(experiment_id, subject_id)
        for _ in range(MAX_REBUILD_ATTEMPTS):
            async with redis_call(self.timeouts.redis_seconds):
                pipe = self.redis.pipeline(transaction=False)
                pipe.hexists(keys.meta, "ready")
                pipe.hget(keys.asg, subject_id)
                ready, value = await pipe.execute()
            if not ready:
                await self.ensure_ready(experiment_id, shard=keys.shard)
                continue
            return None if value is None else parse_assignment(value)
        raise _not_rebuilt(experiment_id)

    # --- tracking ---

    async def track(self, experiment_id: str, event: TrackEvent) -> TrackOutcome:
        """One event; events of the same experiment that arrive together (Track and
        TrackBatch calls alike) share one round trip (`coalesce`)."""
        keys = self.layout.keys_of_subject(experiment_id, event.subject_id)
        return await self._tracks.submit(keys, event)

    async def track_each(
        self, events: Sequence[tuple[str, TrackEvent]]
    ) -> list[TrackOutcome | BaseException]:
        """(experiment id, event) pairs, each answered on its own, in order: an outcome or
        that event's error. Each shard's events join its next batch together, in the
        order given, with the `track` calls waiting there (one round trip per shard
        while idle)."""
        by_shard: dict[ExperimentKeys, list[int]] = {}
        for index, (experiment_id, event) in enumerate(events):
            keys = self.layout.keys_of_subject(experiment_id, event.subject_id)
            by_shard.setdefault(keys, []).append(index)
        groups = [
            (indexes, self._tracks.enqueue(keys, [events[i][1] for i in indexes]))
            for keys, indexes in by_shard.items()
        ]
        outcomes: dict[int, TrackOutcome | BaseException] = {}
        try:
            for indexes, group in groups:
                try:
                    results = await group
                except Exception as exc:  # the shard's whole round trip failed
                    results = [exc] * len(indexes)
                for index, result in zip(indexes, results, strict=True):
                    outcomes[index] = result
        except BaseException:  # cancelled: the other shards' answers are not wanted
            for _, group in groups:
                group.cancel()
            raise
        return [outcomes[index] for index in range(len(events))]

    async def track_many(
        self, experiment_id: str, events: Sequence[TrackEvent]
    ) -> list[TrackOutcome | BaseException]:
        """Apply the events in order, one pipelined round trip per shard; one outcome
        each, or the error of that event alone (its own error reply, or that of its script
        call: Unavailable, or a bug)."""
        return await self._per_shard(
            experiment_id, events, [e.subject_id for e in events], self._track_shard
        )

    async def _track_shard(
        self, keys: ExperimentKeys, events: Sequence[TrackEvent]
    ) -> list[TrackOutcome | BaseException]:
        """One track.lua call per `TRACK_CALL_EVENTS` of the events, in one round trip."""
        if not events:
            return []
        experiment_id = keys.experiment_id
        received_ms = _now_ms()
        outcomes: list[TrackOutcome | BaseException | None] = [None] * len(events)
        todo = list(range(len(events)))
        for _ in range(MAX_REBUILD_ATTEMPTS):
            chunks = [
                todo[at : at + TRACK_CALL_EVENTS] for at in range(0, len(todo), TRACK_CALL_EVENTS)
            ]
            calls = [track_call(keys, [events[i] for i in chunk], received_ms) for chunk in chunks]
            replies = await run_scripts(
                self.transport, TRACK_SCRIPT, calls, self.timeouts.redis_seconds
            )
            retry: list[int] = []
            for chunk, reply in zip(chunks, replies, strict=True):
                if isinstance(reply, BaseException):  # the call failed: each of its events
                    for index in chunk:
                        outcomes[index] = reply
                elif reply == b"R":  # nothing ran
                    retry += chunk
                else:
                    for index, answer in zip(chunk, reply, strict=True):
                        done = outcomes[index] = _track_outcome(answer)
                        if self._applied is not None and done in _ACCEPTED:
                            self._applied.event_accepted(experiment_id, events[index].event_type)
            if not retry:
                return [outcome for outcome in outcomes if outcome is not None]
            await self.ensure_ready(experiment_id, shard=keys.shard)
            todo = retry
        raise _not_rebuilt(experiment_id)

    # --- reads ---

    async def posteriors(self, experiment_ids: Sequence[str]) -> Posteriors:
        """(trials, successes) per variant of each experiment; one pipelined read.

        Experiments whose hot state is missing are rebuilt first; those
        Postgres does not know are left out.
        """
        async with redis_call(self.timeouts.redis_seconds):
            result, missing = await read_posteriors(self.redis, experiment_ids, self.layout)
        if missing:
            rebuilt = []
            for experiment_id in missing:
                try:
                    await self.ensure_ready(experiment_id)
                except NotFound:
                    continue
                rebuilt.append(experiment_id)
            async with redis_call(self.timeouts.redis_seconds):
                again, _ = await read_posteriors(self.redis, rebuilt, self.layout)
            result.update(again)
        return result

    async def counters(self, experiment_id: str) -> dict[str, VariantCounters]:
        """Results counters per variant (for GetResults), summed over the shards."""
        shards = await asyncio.gather(
            *(self._shard_counters(keys) for keys in self.layout.all_keys(experiment_id))
        )
        trials, succ, cnt = (_sum_hashes([shard[part] for shard in shards]) for part in range(3))
        return _counters_from_hashes(trials, succ, cnt)

    async def _shard_counters(self, keys: ExperimentKeys) -> tuple[Mapping[bytes, bytes], ...]:
        """(trials, succ, cnt) hashes of one shard, read as one consistent view."""
        for _ in range(MAX_REBUILD_ATTEMPTS):
            async with redis_call(self.timeouts.redis_seconds):
                pipe = self.redis.pipeline(transaction=True)  # one slot: a consistent view
                # Raw commands: redis-py 8.1's cluster MULTI passes a command method's
                # keyword arguments to the reply callbacks, which refuse them.
                pipe.execute_command("HEXISTS", keys.meta, "ready")
                pipe.execute_command("HGETALL", keys.trials)
                pipe.execute_command("HGETALL", keys.succ)
                pipe.execute_command("HGETALL", keys.cnt)
                ready, trials, succ, cnt = await pipe.execute()
            if not ready:
                await self.ensure_ready(keys.experiment_id, shard=keys.shard)
                continue
            return trials, succ, cnt
        raise _not_rebuilt(keys.experiment_id)


async def held_layout(redis: RedisClient) -> HotLayout | None:
    """The layout the hot state in Redis was written with: recorded by the servers, or,
    from a release that recorded none, read off the registered streams' names (then one
    shard); None when Redis holds no hot state."""
    async with redis_call():
        held = await redis.get(LAYOUT_KEY)
        if held is not None:
            return _recorded_layout(held)
        streams = await redis.smembers(STREAM_REGISTRY)
    shards = [shard_of_stream(stream) for stream in streams]
    if not shards:
        return None
    return HotLayout(1 if None in shards else max(s for s in shards if s is not None) + 1)


def _recorded_layout(held: bytes | str) -> HotLayout:
    """`sira:layout` as written by `claim_layout`; anything else is refused, not guessed."""
    try:
        return HotLayout(int(held))
    except ValueError:
        raise ConfigError(
            f"{LAYOUT_KEY} in Redis holds {held[:20]!r}, not a shard count; set it to the"
            " SIRA_REDIS_SHARDS the hot state was written with"
        ) from None


async def claim_layout(redis: RedisClient, layout: HotLayout) -> None:
    """Record the shard count in Redis, or refuse to start when the state there was
    written with another: the processes of a deployment must agree, or subjects would
    be looked up in the wrong shard (docs/scaling.md says how to change it)."""
    held = await held_layout(redis) or layout
    if held.shards == layout.shards:
        async with redis_call():
            await redis.set(LAYOUT_KEY, layout.shards, nx=True)
            recorded = await redis.get(LAYOUT_KEY)  # a racing process with another count
        held = _recorded_layout(recorded) if recorded is not None else layout
    if held.shards != layout.shards:
        raise ConfigError(
            f"SIRA_REDIS_SHARDS is {layout.shards} but the hot state in Redis was written"
            f" with {held.shards} shard(s); set SIRA_REDIS_SHARDS={held.shards}, or change it"
            " as docs/scaling.md describes (drain the write-behind, then reset the hot state)"
        )


async def ensure_stream(redis: RedisClient, keys: ExperimentKeys) -> None:
    """Create the write-behind stream with its consumer group, and register it."""
    try:
        await redis.xgroup_create(keys.wb, FLUSHER_GROUP, id="0", mkstream=True)
    except redis_errors.ResponseError as exc:
        if not str(exc).startswith("BUSYGROUP"):
            raise
    await redis.sadd(STREAM_REGISTRY, keys.wb)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _assign_args(request: AssignRequest, now_ms: int) -> tuple[str | int, ...]:
    return (
        request.subject_id,
        request.variant_id,
        repr(float(request.propensity)),
        now_ms,
        request.context_json,
    )


def _unknown_variant(experiment_id: str, variant_id: str) -> NotFound:
    return NotFound(
        f"variant {variant_id} is not a variant of experiment {experiment_id}",
        reason="ERROR_REASON_VARIANT_NOT_FOUND",
        metadata={"experiment_id": experiment_id, "variant_id": variant_id},
    )


TRACK_CALL_EVENTS = 100
"""At most this many events per track.lua call: a call holds Redis for all of its events
(other clients wait meanwhile), and its replies come back together."""

CAP_WINDOW_MS = 3_600_000


def track_call(keys: ExperimentKeys, events: Sequence[TrackEvent], received_ms: int) -> ScriptCall:
    """The keys and arguments of one track.lua call for `events`, applied in order (the
    layout is in track.lua)."""
    cap_keys: list[str] = []
    args: list[str | int] = [received_ms, CAP_WINDOW_MS]
    for event in events:
        if event.cap != 0:
            cap_keys.append(cap_key(keys, event, received_ms))
        args += (
            event.subject_id,
            event.variant_id,
            event.event_type,
            repr(float(event.value)),
            event.currency or "",
            event.event_id,
            event.occurred_ms,
            event.cap,
        )
    script_keys = (
        keys.meta,
        keys.asg,
        keys.succ,
        keys.conv,
        keys.refunded,
        keys.churned,
        keys.events,
        keys.cnt,
        keys.wb,
        keys.outcome,
        *cap_keys,
    )
    return script_keys, args


def cap_key(keys: ExperimentKeys, event: TrackEvent, received_ms: int) -> str:
    """The counter of `event`'s subject and type in this clock hour (same slot as the
    experiment's other keys; expires with the window)."""
    hour = received_ms // CAP_WINDOW_MS
    return f"{keys.meta[: -len('meta')]}cap:{hour}:{event.event_type}:{event.subject_id}"


_ACCEPTED = (
    TrackOutcome(TrackStatus.ACCEPTED),
    TrackOutcome(TrackStatus.ACCEPTED, first_conversion=True),
)
_TRACK_OUTCOMES: dict[bytes, TrackOutcome] = {
    b"A0": _ACCEPTED[0],
    b"A1": _ACCEPTED[1],
    b"D": TrackOutcome(TrackStatus.DUPLICATE),
    b"N": TrackOutcome(TrackStatus.NOT_ASSIGNED),
    b"L": TrackOutcome(TrackStatus.CAPPED),
}
"""track.lua's replies per event that carry nothing else (outcomes are immutable)."""

_LUA_CAUGHT_PREFIX = "@user_script"


def _track_outcome(answer: bytes) -> TrackOutcome | BaseException:
    """One event's reply from track.lua: its outcome, or its error (as `store.faults`
    maps an error reply)."""
    outcome = _TRACK_OUTCOMES.get(answer)
    if outcome is not None:
        return outcome
    tag, rest = answer[:1], answer[1:].decode()
    if tag == b"M":
        return TrackOutcome(TrackStatus.MISMATCH, assigned_variant_id=rest)
    if tag == b"E":
        # Redis 6 words an error reply caught in a script "@user_script: <line>: -<reply>".
        if rest.startswith(_LUA_CAUGHT_PREFIX) and ": -" in rest:
            rest = rest.split(": -", 1)[1]
        return domain_error(parse_redis_error(rest))
    raise ValueError(f"unexpected reply from track.lua: {answer!r}")


def _not_rebuilt(experiment_id: str) -> Unavailable:
    return Unavailable(
        f"the hot state of experiment {experiment_id} could not be rebuilt; retry",
        metadata={"store": "redis", "experiment_id": experiment_id},
    )
