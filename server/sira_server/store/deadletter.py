"""Dead letters: write-behind records Postgres rejected, kept visible and replayable.

The flusher moves a record it cannot write (a constraint Postgres enforces and
the edge did not, e.g. after a schema drift; an orphan metric past its grace;
a malformed entry) to its experiment's ``dead`` stream, with the reason, and
counts it (`sira_write_behind_dead_lettered_entries_total`). The server's
gauge `sira_write_behind_dead_letters{experiment_id}` and its health service
``write-behind`` (NOT_SERVING while any record is parked) say so until an
operator acts: `sira-server deadletter list` shows them, `sira-server deadletter replay`
writes them again once the cause is fixed.

Replay goes through the flusher's own write path (same SQL, same isolation of
bad records), so it is idempotent: a record already in Postgres is not doubled,
and the Redis counters, which counted it when it was acknowledged, are not
touched. A replayed record leaves the dead stream only when it is written (or
its experiment no longer exists); otherwise it stays, with its new reason.

With shards (`store.hot_keys.HotLayout`) an experiment has a dead stream per shard, found
through the stream registry; entry ids are per stream, so `replay --id` replays the
entry of that id in each of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from sira_server.store.flusher import WriteBehindEntry, WriteBehindFlusher, parse_entry
from sira_server.store.hot_keys import (
    STREAM_REGISTRY,
    dead_key_of_stream,
    experiment_id_of_stream,
    experiment_keys,
)
from sira_server.store.redis_conn import RedisClient

DEAD_FIELDS = (b"reason", b"origin")
"""Fields the flusher adds to a dead record; the rest is the original entry."""
REPLAY_BATCH = 500


@dataclass(frozen=True, slots=True)
class DeadLetter:
    experiment_id: str
    entry_id: str
    """Id in the dead stream (what `replay --id` takes)."""
    kind: str
    """assignment, metric or malformed."""
    subject_id: str
    reason: str
    origin: str
    """Id the record had in the write-behind stream."""


@dataclass
class ReplayReport:
    written: list[str] = field(default_factory=list)
    """Dead entry ids now in Postgres (or already there), removed from the dead stream."""
    discarded: list[str] = field(default_factory=list)
    """Entries of deleted experiments or variants, removed."""
    still_dead: dict[str, str] = field(default_factory=dict)
    """Entry id -> why it still cannot be written; left in the dead stream."""


async def dead_letter_experiments(redis: RedisClient) -> list[str]:
    """Experiments with a write-behind stream (the flusher's registry), sorted, once each
    (an experiment has a stream per shard)."""
    ids = set()
    for raw in await redis.smembers(STREAM_REGISTRY):
        try:
            ids.add(experiment_id_of_stream(raw))
        except ValueError:
            continue
    return sorted(ids)


async def count_dead_letters(
    redis: RedisClient, experiment_ids: Sequence[str] | None = None
) -> dict[str, int]:
    """Parked records per experiment (every registered experiment when not given)."""
    ids = (
        list(experiment_ids) if experiment_ids is not None else await dead_letter_experiments(redis)
    )
    if not ids:
        return {}
    streams = await _streams_of(redis, ids)
    pipe = redis.pipeline(transaction=False)
    for experiment_id in ids:
        for _, dead_key in streams[experiment_id]:
            pipe.xlen(dead_key)
    lengths = iter(await pipe.execute())
    return {e: sum(int(next(lengths)) for _ in streams[e]) for e in ids}


async def list_dead_letters(
    redis: RedisClient, experiment_ids: Sequence[str] | None = None, *, limit: int = 1000
) -> list[DeadLetter]:
    """Parked records, oldest first per experiment, at most `limit` in all."""
    ids = (
        list(experiment_ids) if experiment_ids is not None else await dead_letter_experiments(redis)
    )
    letters: list[DeadLetter] = []
    streams = await _streams_of(redis, ids)
    for experiment_id in ids:
        for _, dead_key in streams[experiment_id]:
            if len(letters) >= limit:
                return letters
            entries = await _xrange(redis, dead_key, "-", limit - len(letters))
            for entry_id, fields in entries:
                letters.append(_letter(experiment_id, entry_id, fields))
    return letters


async def replay_dead_letters(
    redis: RedisClient,
    pool: asyncpg.Pool,
    experiment_ids: Sequence[str] | None = None,
    *,
    entry_ids: Sequence[str] = (),
) -> ReplayReport:
    """Write parked records again (all, or only `entry_ids`); see the module doc."""
    ids = (
        list(experiment_ids) if experiment_ids is not None else await dead_letter_experiments(redis)
    )
    wanted = {e.encode() for e in entry_ids}
    report = ReplayReport()
    flusher = WriteBehindFlusher(redis, pool, "deadletter-replay")
    streams = await _streams_of(redis, ids)
    for experiment_id in ids:
        for stream, dead_key in streams[experiment_id]:
            start = "-"
            while True:
                page = await _xrange(redis, dead_key, start, REPLAY_BATCH)
                if not page:
                    break
                start = "(" + page[-1][0].decode()
                batch = [(eid, f) for eid, f in page if not wanted or eid in wanted]
                if batch:
                    await _replay(redis, flusher, stream, dead_key, batch, report)
                if len(page) < REPLAY_BATCH:
                    break
    return report


async def _streams_of(
    redis: RedisClient, experiment_ids: Sequence[str]
) -> dict[str, list[tuple[str, str]]]:
    """(write-behind stream, dead stream) of each experiment: one per shard registered,
    and the one-shard layout's always (its dead letters outlive a change of layout)."""
    streams: dict[str, list[tuple[str, str]]] = {}
    for experiment_id in experiment_ids:
        legacy = experiment_keys(experiment_id)
        streams[experiment_id] = [(legacy.wb, legacy.dead)]
    for raw in sorted(await redis.smembers(STREAM_REGISTRY)):
        stream = raw.decode() if isinstance(raw, bytes) else str(raw)
        try:
            experiment_id = experiment_id_of_stream(stream)
        except ValueError:
            continue
        known = streams.get(experiment_id)
        if known is not None and all(stream != wb for wb, _ in known):
            known.append((stream, dead_key_of_stream(stream)))
    return streams


async def _replay(
    redis: RedisClient,
    flusher: WriteBehindFlusher,
    stream: str,
    dead_key: str,
    batch: Sequence[tuple[bytes, dict[bytes, bytes]]],
    report: ReplayReport,
) -> None:
    entries: list[WriteBehindEntry] = []
    for entry_id, fields in batch:
        raw = {k: v for k, v in fields.items() if k not in DEAD_FIELDS}
        entries.append(parse_entry(stream, entry_id, raw))
    outcome = await flusher.write_entries(entries)
    done: list[bytes] = []
    for i, entry in enumerate(entries):
        name = entry.entry_id.decode()
        if i in outcome.dead:
            report.still_dead[name] = outcome.dead[i]
        elif i in outcome.orphans:
            report.still_dead[name] = "its assignment is not in PostgreSQL (replay it first)"
        elif i in outcome.discarded:
            report.discarded.append(name)
            done.append(entry.entry_id)
        else:
            report.written.append(name)
            done.append(entry.entry_id)
    if done:
        await redis.xdel(dead_key, *done)


async def _xrange(
    redis: RedisClient, key: str, start: str, count: int
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE from `start` (inclusive, or exclusive with a leading "(")."""
    entries: Any = await redis.xrange(key, min=start, count=count)
    return list(entries)


def _letter(experiment_id: str, entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    kind = {b"a": "assignment", b"m": "metric"}.get(fields.get(b"t", b""), "malformed")
    return DeadLetter(
        experiment_id=experiment_id,
        entry_id=entry_id.decode(),
        kind=kind,
        subject_id=fields.get(b"s", b"").decode(errors="replace"),
        reason=fields.get(b"reason", b"").decode(errors="replace"),
        origin=fields.get(b"origin", b"").decode(errors="replace"),
    )
