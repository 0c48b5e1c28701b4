"""Where the hot state lives in Redis, and the formats of the values stored there.

Every key of one experiment carries the hash tag ``{exp:<id>}``, so each Lua
script touches a single slot (Redis Cluster safe)::

    sira:{exp:<id>}:meta      HASH  ready=1 once the state exists; reward mode
    sira:{exp:<id>}:asg       HASH  subject -> "variant_id|propensity|assigned_ms"
    sira:{exp:<id>}:trials    HASH  variant -> assigned subjects
    sira:{exp:<id>}:succ      HASH  variant -> successes (per the reward rule)
    sira:{exp:<id>}:conv      SET   subjects with a conversion
    sira:{exp:<id>}:refunded  SET   subjects with a refund
    sira:{exp:<id>}:churned   SET   subjects with a churn
    sira:{exp:<id>}:outcome   HASH  subject -> "latest conversion ms|latest refund ms"
                                    (reward conversion_not_refunded only)
    sira:{exp:<id>}:events    SET   event ids seen (dedupe)
    sira:{exp:<id>}:cnt       HASH  "variant|counter[|currency or name]" -> number
    sira:{exp:<id>}:wb        STREAM write-behind records for the flusher
    sira:{exp:<id>}:dead      STREAM records the flusher could not write
    sira:{exp:<id>}:lock      STRING rebuild lock
    sira:{exp:<id>}:cap:<hour>:<type>:<subject>  STRING  events counted against a
                              subject's hourly cap (expires after the hour)
    sira:streams              SET   every write-behind stream (flusher registry)

The Lua scripts in ``store/lua/`` write the same formats; change both together.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

STREAM_REGISTRY = "sira:streams"
"""SET of every experiment's write-behind stream key."""
FLUSHER_GROUP = "flusher"
"""Consumer group of the write-behind flushers."""

_STREAM_PREFIX = "sira:{exp:"
_STREAM_SUFFIX = "}:wb"


# --- key layout ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExperimentKeys:
    """Names of one experiment's Redis keys (all in the slot of ``{exp:<id>}``)."""

    experiment_id: str
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


@functools.lru_cache(maxsize=4096)  # hot path: built once per experiment
def experiment_keys(experiment_id: str) -> ExperimentKeys:
    base = f"sira:{{exp:{experiment_id}}}:"
    return ExperimentKeys(
        experiment_id=experiment_id,
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
    """The experiment id in ``sira:{exp:<id>}:wb``."""
    key = stream_key.decode() if isinstance(stream_key, bytes) else stream_key
    if not (key.startswith(_STREAM_PREFIX) and key.endswith(_STREAM_SUFFIX)):
        raise ValueError(f"not a write-behind stream key: {key!r}")
    return key[len(_STREAM_PREFIX) : -len(_STREAM_SUFFIX)]


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
