"""Where the hot state lives in Redis, and the formats of the values stored there.

Every key of one experiment carries the hash tag ``{exp:<id>}``, so each Lua
script touches a single slot (Redis Cluster safe). With S > 1 shards
(`HotLayout`, ``SIRA_REDIS_SHARDS``) the experiment's state is split by subject: shard
s has every key below under ``{exp:<id>:<s>}`` instead, s = `shard_of(subject)`, so a
subject's keys (its assignment, its events, its cap) still share one slot and each
script stays atomic for that subject, while one experiment's traffic spreads over up
to S slots, so over the cluster's masters. Counters are per shard; their sum is the
experiment's (`store.hot_state`)::

    sira:{exp:<id>}:meta      HASH  ready=1 once the state exists; reward mode
    sira:{exp:<id>}:asg       HASH  subject -> "variant_id|propensity|assigned_ms"
    sira:{exp:<id>}:trials    HASH  variant -> assigned subjects
    sira:{exp:<id>}:succ      HASH  variant -> successes (per the reward rule)
    sira:{exp:<id>}:conv      SET   subjects with a conversion
    sira:{exp:<id>}:refunded  SET   subjects with a refund
    sira:{exp:<id>}:churned   SET   subjects with a churn
    sira:{exp:<id>}:outcome   HASH  subject -> "latest conversion ms|latest refund ms"
                                    (reward conversion_not_refunded only)
    sira:{exp:<id>}:events    SET   "event id NUL subject" seen (dedupe, `event_member`)
    sira:{exp:<id>}:cnt       HASH  "variant|counter[|currency or name]" -> number
    sira:{exp:<id>}:wb        STREAM write-behind records for the flusher
    sira:{exp:<id>}:dead      STREAM records the flusher could not write
    sira:{exp:<id>}:lock      STRING rebuild lock
    sira:{exp:<id>}:cap:<hour>:<type>:<subject>  STRING  events counted against a
                              subject's hourly cap (expires after the hour)
    sira:streams              SET   every write-behind stream (flusher registry)
    sira:layout               STRING  the shard count S the state was written with

The Lua scripts in ``store/lua/`` write the same formats; change both together.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

LAYOUT_KEY = "sira:layout"
"""The shard count every process of a deployment must share (`store.hot_state`)."""
STREAM_REGISTRY = "sira:streams"
"""SET of every experiment's write-behind stream key."""
FLUSHER_GROUP = "flusher"
"""Consumer group of the write-behind flushers."""

_STREAM_PREFIX = "sira:{exp:"
_STREAM_SUFFIX = "}:wb"


# --- key layout ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExperimentKeys:
    """Names of one experiment's Redis keys, or of one of its shards' (all in the slot of
    ``{exp:<id>}``, or ``{exp:<id>:<shard>}`` when the layout has more than one shard)."""

    experiment_id: str
    shard: int
    shards: int
    meta: str
    asg: str
    trials: str
    succ: str
    conv: str
    refunded: str
    churned: str
    outcome: str
    events: str
    cnt: str
    wb: str
    dead: str
    lock: str

    @property
    def state(self) -> tuple[str, ...]:
        """Keys a rebuild recomputes (not the stream, the dead letters or the lock)."""
        return (
            self.meta,
            self.asg,
            self.trials,
            self.succ,
            self.conv,
            self.refunded,
            self.churned,
            self.outcome,
            self.events,
            self.cnt,
        )

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.state, self.wb, self.dead, self.lock)


@functools.lru_cache(maxsize=4096)  # hot path: built once per experiment and shard
def experiment_keys(experiment_id: str, shard: int = 0, shards: int = 1) -> ExperimentKeys:
    """Keys of `experiment_id` (one shard: ``{exp:<id>}``), or of its shard `shard` of
    `shards` (``{exp:<id>:<shard>}``)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shard(s)")
    tag = f"exp:{experiment_id}" if shards == 1 else f"exp:{experiment_id}:{shard}"
    base = f"sira:{{{tag}}}:"
    return ExperimentKeys(
        experiment_id=experiment_id,
        shard=shard,
        shards=shards,
        meta=base + "meta",
        asg=base + "asg",
        trials=base + "trials",
        succ=base + "succ",
        conv=base + "conv",
        refunded=base + "refunded",
        churned=base + "churned",
        outcome=base + "outcome",
        events=base + "events",
        cnt=base + "cnt",
        wb=base + "wb",
        dead=base + "dead",
        lock=base + "lock",
    )


def experiment_id_of_stream(stream_key: str | bytes) -> str:
    """The experiment id in ``sira:{exp:<id>}:wb`` or ``sira:{exp:<id>:<shard>}:wb``
    (experiment ids are UUIDs: no colon)."""
    key = stream_key.decode() if isinstance(stream_key, bytes) else stream_key
    if not (key.startswith(_STREAM_PREFIX) and key.endswith(_STREAM_SUFFIX)):
        raise ValueError(f"not a write-behind stream key: {key!r}")
    return key[len(_STREAM_PREFIX) : -len(_STREAM_SUFFIX)].split(":", 1)[0]


def shard_of_stream(stream_key: str | bytes) -> int | None:
    """The shard in ``sira:{exp:<id>:<shard>}:wb``; None for the one-shard layout's
    ``sira:{exp:<id>}:wb`` (or a key that is no stream of ours)."""
    key = stream_key.decode() if isinstance(stream_key, bytes) else stream_key
    if not (key.startswith(_STREAM_PREFIX) and key.endswith(_STREAM_SUFFIX)):
        return None
    _, found, shard = key[len(_STREAM_PREFIX) : -len(_STREAM_SUFFIX)].partition(":")
    return int(shard) if found and shard.isdigit() else None


def dead_key_of_stream(stream_key: str | bytes) -> str:
    """The dead-letter stream next to a write-behind stream (same experiment, shard)."""
    key = stream_key.decode() if isinstance(stream_key, bytes) else stream_key
    experiment_id_of_stream(key)  # validates
    return key[: -len("wb")] + "dead"


# --- shards ---------------------------------------------------------------------------


def shard_of(subject_id: str, shards: int) -> int:
    """The shard holding `subject_id`'s state: the first 32 bits of the MD5 of its UTF-8
    bytes, modulo `shards`. Stable across processes and languages, and Postgres computes
    the same (`SHARD_SQL`), so a rebuild reads only its shard's rows."""
    if shards == 1:
        return 0
    digest = hashlib.md5(subject_id.encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "big") % shards


SHARD_SQL = (
    "((('x' || substr(md5(convert_to({column}, 'UTF8')), 1, 8))::bit(32)::bigint) % {shards})"
)
"""`shard_of` in SQL, for a text column (hashing its UTF-8 bytes whatever the database
encoding)."""


@dataclass(frozen=True, slots=True)
class HotLayout:
    """How many shards each experiment's hot state is split into (the same for every
    process of a deployment; `store.hot_state.claim_layout` checks it)."""

    shards: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"shards must be in 1..{MAX_SHARDS}, got {self.shards}")

    def keys(self, experiment_id: str, shard: int) -> ExperimentKeys:
        return experiment_keys(experiment_id, shard, self.shards)

    def all_keys(self, experiment_id: str) -> tuple[ExperimentKeys, ...]:
        return tuple(self.keys(experiment_id, s) for s in range(self.shards))

    def keys_of_subject(self, experiment_id: str, subject_id: str) -> ExperimentKeys:
        return self.keys(experiment_id, shard_of(subject_id, self.shards))


MAX_SHARDS = 256
"""More shards than a cluster has masters buys nothing; each one costs every read of
the counters a key."""


def event_member(event_id: str, subject_id: str) -> str:
    """The ``events`` set member of an event (track.lua builds the same): an event id is
    an idempotency key per subject, since a subject's events live in its shard and no
    script can see the other shards; Postgres's key agrees (migration 0005). NUL cannot
    occur in either id (refused at the edge: Postgres text cannot hold it)."""
    return f"{event_id}\0{subject_id}"


# --- sticky assignments (the ``asg`` hash values) -------------------------------------


@dataclass(frozen=True, slots=True)
class Assignment:
    variant_id: str
    propensity: float
    assigned_ms: int


def format_assignment(variant_id: str, propensity: float, assigned_ms: int) -> str:
    """The ``asg`` hash value (the Lua script builds the same string)."""
    return f"{variant_id}|{float(propensity)!r}|{assigned_ms}"


def parse_assignment(value: bytes | str) -> Assignment:
    text = value.decode() if isinstance(value, bytes) else value
    variant_id, propensity, assigned_ms = text.split("|")
    return Assignment(variant_id, float(propensity), int(assigned_ms))


# --- write-behind records (the stream format the Lua scripts write) ----------------


@dataclass(frozen=True, slots=True)
class AssignmentRecord:
    subject_id: str
    variant_id: str
    propensity: float
    assigned_ms: int
    context_json: str


@dataclass(frozen=True, slots=True)
class MetricRecord:
    subject_id: str
    variant_id: str
    event_type: str
    value: float
    currency: str | None
    event_id: str
    occurred_ms: int
    received_ms: int


def parse_record(fields: Mapping[bytes, bytes]) -> AssignmentRecord | MetricRecord:
    """Decode one stream entry; ValueError/KeyError when it is malformed."""
    kind = fields[b"t"]
    if kind == b"a":
        return AssignmentRecord(
            subject_id=fields[b"s"].decode(),
            variant_id=fields[b"v"].decode(),
            propensity=float(fields[b"p"]),
            assigned_ms=int(fields[b"ts"]),
            context_json=fields[b"c"].decode(),
        )
    if kind == b"m":
        currency = fields[b"cur"].decode()
        return MetricRecord(
            subject_id=fields[b"s"].decode(),
            variant_id=fields[b"v"].decode(),
            event_type=fields[b"e"].decode(),
            value=float(fields[b"x"]),
            currency=currency or None,
            event_id=fields[b"id"].decode(),
            occurred_ms=int(fields[b"ts"]),
            received_ms=int(fields[b"rts"]),
        )
    raise ValueError(f"unknown write-behind record type {kind!r}")
