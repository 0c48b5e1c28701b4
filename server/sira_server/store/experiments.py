"""Experiments in Postgres: the system of record of the lifecycle.

Every mutation and its audit row commit in one transaction. A transition locks the
experiment row (``SELECT ... FOR UPDATE``) and then updates it with
``WHERE status = ANY(<allowed>)``, so two concurrent starts cannot both succeed: the
second waits for the first, then sees ``running``. Each change bumps ``version`` and
``updated_at``; ``on_change(experiment_id)`` runs after the commit (cache invalidation).

Postgres unreachable (refused, dropped connection, shutdown, pool acquire timeout)
raises `Unavailable`: nothing was written and the caller may retry.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import asyncpg

from sira_server.domain.experiment import (
    Allocation,
    AuditAction,
    AuditEvent,
    Experiment,
    ExperimentSpec,
    ExperimentStatus,
    FailFast,
    JsonObject,
    Operation,
    Reward,
    Variant,
    VariantState,
)
from sira_server.domain.targeting import targeting_from_json, targeting_to_json
from sira_server.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from sira_server.store import page_tokens

__all__ = ["ExperimentRepository", "OnChange", "Page"]

log = logging.getLogger(__name__)

OnChange = Callable[[str], Awaitable[None]]
"""Called with an experiment id after a change to it has committed."""

T = TypeVar("T")

UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError (pool acquire) is one too
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08, dropped connection
    asyncpg.OperatorInterventionError,  # 57P01..57P03: shutdown, crash, starting up
    asyncpg.TooManyConnectionsError,
)

_EXPERIMENT_COLUMNS = """
    id, key, name, description, status, targeting, allocation, exposure_percent,
    primary_metric, fail_fast_threshold, fail_fast_min_samples, auto_stop, reward,
    fail_fast_error_rate, fail_fast_min_effect, created_by, created_at, updated_at,
    started_at, stopped_at, archived_at,
    winner_variant_id, stop_reason, version
"""
_SELECT_EXPERIMENT = f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments"
_SELECT_VARIANTS = """
    SELECT id, experiment_id, key, name, config, is_control, weight, position, state, dropped_at
    FROM experiment_variants
    WHERE experiment_id = ANY($1::uuid[])
    ORDER BY experiment_id, position
"""
_INSERT_VARIANT = """
    INSERT INTO experiment_variants
        (id, experiment_id, key, name, config, is_control, weight, position)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""
_INSERT_AUDIT = """
    INSERT INTO experiment_audit_logs (experiment_id, actor, action, details)
    VALUES ($1, $2, $3, $4)
"""
_EXPERIMENT_KEY_CONSTRAINT = "experiments_key_key"
_VARIANT_KEY_CONSTRAINT = "experiment_variants_experiment_id_key_key"
_ONE_CONTROL_INDEX = "experiment_variants_one_control"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


THREAD_BUILD_ROWS = 20
"""Pages with more rows are turned into domain objects in a worker thread."""


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_page_token: str
    """Empty on the last page."""


class ExperimentRepository:
    """Create, read, transition and delete experiments; list them and their audit trail."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        on_change: OnChange | None = None,
        *,
        acquire_timeout: float = 10.0,
    ) -> None:
        self._pool = pool
        self._on_change = on_change
        self._acquire_timeout = acquire_timeout

    # --- reads ---------------------------------------------------------------------------

    async def get(self, ref: str) -> Experiment:
        """The experiment whose id (UUID) or key is ``ref``; NotFound otherwise."""
        async with self._connection() as conn:
            row = await self._find(conn, ref)
            return (await self._with_variants(conn, [row]))[0]

    async def exists(self, experiment_id: str) -> bool:
        """True while a row for ``experiment_id`` (a UUID) exists, whatever its status:
        only a deleted experiment is gone."""
        async with self._connection() as conn:
            row = await conn.fetchval("SELECT 1 FROM experiments WHERE id = $1", experiment_id)
        return row is not None

    async def list_experiments(
        self,
        *,
        status: ExperimentStatus | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> Page[Experiment]:
        """Newest first (created_at desc, id desc), keyset-paginated."""
        query = "experiments:" + (status.value if status else "")
        after_created: datetime | None = None
        after_id: uuid.UUID | None = None
        if page_token:
            position = page_tokens.decode(
                page_token, query, {"t": page_tokens.micros_in_range, "i": page_tokens.is_uuid_text}
            )
            after_created = _EPOCH + timedelta(microseconds=position["t"])
            after_id = uuid.UUID(position["i"])
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"""{_SELECT_EXPERIMENT}
                WHERE ($1::text IS NULL OR status = $1)
                  AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::uuid))
                ORDER BY created_at DESC, id DESC
                LIMIT $4""",
                status.value if status else None,
                after_created,
                after_id,
                page_size + 1,
            )
            experiments = await self._with_variants(conn, rows[:page_size])
        next_token = ""
        if len(rows) > page_size:
            last = rows[page_size - 1]
            micros = (last["created_at"] - _EPOCH) // timedelta(microseconds=1)
            next_token = page_tokens.encode(query, {"t": micros, "i": str(last["id"])})
        return Page(tuple(experiments), next_token)

    async def list_audit_events(
        self,
        *,
        experiment: str | None = None,
        page_size: int = 100,
        page_token: str = "",
    ) -> Page[AuditEvent]:
        """Newest first. ``experiment`` (id or key) narrows to one experiment; a UUID works
        for deleted experiments too, since the audit trail outlives them."""
        async with self._connection() as conn:
            experiment_id: uuid.UUID | None = None
            if experiment:
                experiment_id = await self._audit_subject(conn, experiment)
            query = f"audit:{experiment_id or ''}"
            before_id: int | None = None
            if page_token:
                before_id = page_tokens.decode(page_token, query, {"i": page_tokens.is_row_id})["i"]
            rows = await conn.fetch(
                """SELECT id, experiment_id, actor, action, details, created_at
                FROM experiment_audit_logs
                WHERE ($1::uuid IS NULL OR experiment_id = $1)
                  AND ($2::bigint IS NULL OR id < $2)
                ORDER BY id DESC
                LIMIT $3""",
                experiment_id,
                before_id,
                page_size + 1,
            )
        events = tuple(
            AuditEvent(
                id=row["id"],
                experiment_id=str(row["experiment_id"]) if row["experiment_id"] else None,
                actor=row["actor"],
                action=row["action"],
                details=row["details"],
                created_at=row["created_at"],
            )
            for row in rows[:page_size]
        )
        next_token = ""
        if len(rows) > page_size:
            next_token = page_tokens.encode(query, {"i": events[-1].id})
        return Page(events, next_token)

    # --- mutations -----------------------------------------------------------------------

    async def create(self, spec: ExperimentSpec, *, actor: str) -> Experiment:
        """Insert a draft with its variants and the ``created`` audit row, atomically.

        AlreadyExists (EXPERIMENT_KEY_EXISTS) when the key is taken.
        """
        experiment_id = uuid.uuid4()
        async with self._transaction() as conn:
            try:
                await conn.execute(
                    """INSERT INTO experiments (
                        id, key, name, description, targeting, allocation, exposure_percent,
                        primary_metric, fail_fast_threshold, fail_fast_min_samples, auto_stop,
                        reward, fail_fast_error_rate, fail_fast_min_effect, created_by)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)""",
                    experiment_id,
                    *_spec_columns(spec),
                    actor,
                )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == _EXPERIMENT_KEY_CONSTRAINT:
                    raise AlreadyExists(
                        f"an experiment with key '{spec.key}' already exists; "
                        "choose another key (or name)",
                        metadata={"key": spec.key},
                    ) from None
                raise
            await self._insert_variants(conn, experiment_id, spec, {})
            await self._audit(
                conn, experiment_id, actor, AuditAction.CREATED, {"experiment": spec.as_json()}
            )
            experiment = await self._load(conn, experiment_id)
        await self._changed(experiment.id)
        return experiment

    async def update(
        self,
        ref: str,
        change: Callable[[Experiment], ExperimentSpec],
        *,
        actor: str,
    ) -> Experiment:
        """Replace a draft's definition by ``change(current)`` (which validates the merge).

        The row is locked while ``change`` runs, so the merge sees the latest version.
        Variants that keep their key keep their id. A change that changes nothing
        writes nothing.
        """
        async with self._transaction() as conn:
            row = await self._find(conn, ref, for_update=True)
            current = (await self._with_variants(conn, [row]))[0]
            Operation.UPDATE.check(current.key, current.status)
            spec = change(current)
            before, after = current.spec().as_json(), spec.as_json()
            changes = {
                name: {"before": before[name], "after": after[name]}
                for name in after
                if before[name] != after[name]
            }
            if not changes:
                return current
            updated = await conn.fetchval(
                """UPDATE experiments SET
                    key = $2, name = $3, description = $4, targeting = $5, allocation = $6,
                    exposure_percent = $7, primary_metric = $8, fail_fast_threshold = $9,
                    fail_fast_min_samples = $10, auto_stop = $11, reward = $12,
                    fail_fast_error_rate = $13, fail_fast_min_effect = $14,
                    updated_at = now(), version = version + 1
                WHERE id = $1 AND status = ANY($15::text[])
                RETURNING version""",
                row["id"],
                *_spec_columns(spec),
                _statuses(Operation.UPDATE),
            )
            if updated is None:  # unreachable while the row lock holds; kept as a guard
                raise Operation.UPDATE.wrong_state(current.key, current.status)
            if "variants" in changes:
                await conn.execute(
                    "DELETE FROM experiment_variants WHERE experiment_id = $1", row["id"]
                )
                ids = {v.key: uuid.UUID(v.id) for v in current.variants}
                await self._insert_variants(conn, row["id"], spec, ids)
            await self._audit(
                conn, row["id"], actor, AuditAction.UPDATED, {"version": updated, **changes}
            )
            experiment = await self._load(conn, row["id"])
        await self._changed(experiment.id)
        return experiment

    async def start(self, ref: str, *, actor: str) -> Experiment:
        """DRAFT -> RUNNING, and a Beta(1, 1) bandit state row for every variant."""
        async with self._transaction() as conn:
            row = await self._lock_for(conn, ref, Operation.START)
            changed = await self._set_status(conn, row, Operation.START, "started_at = now()")
            seeded = await conn.execute(
                """INSERT INTO experiment_bandit_state (experiment_id, variant_id, alpha, beta)
                SELECT experiment_id, id, 1, 1 FROM experiment_variants WHERE experiment_id = $1
                ON CONFLICT (experiment_id, variant_id) DO NOTHING""",
                row["id"],
            )
            await self._audit(
                conn,
                row["id"],
                actor,
                AuditAction.STARTED,
                {
                    "started_at": changed["started_at"].isoformat(),
                    "version": changed["version"],
                    "bandit_states_initialized": _row_count(seeded),
                },
            )
            experiment = await self._load(conn, row["id"])
        await self._changed(experiment.id)
        return experiment

    async def stop(
        self,
        ref: str,
        *,
        actor: str,
        winner: str | None = None,
        reason: str = "",
        evidence: JsonObject | None = None,
    ) -> Experiment:
        """RUNNING -> STOPPED. ``winner`` (variant id or key) must be an active variant of
        this experiment: NotFound (VARIANT_NOT_FOUND) when it is not one of its variants,
        InvalidArgument (VARIANT_NOT_FOUND) when it was dropped."""
        async with self._transaction() as conn:
            row = await self._lock_for(conn, ref, Operation.STOP)
            winner_id: uuid.UUID | None = None
            winner_key: str | None = None
            if winner:
                winner_id, winner_key = await self._active_variant(conn, row, winner)
            changed = await self._set_status(
                conn,
                row,
                Operation.STOP,
                "stopped_at = now(), winner_variant_id = $3, stop_reason = $4",
                winner_id,
                reason,
            )
            started_at: datetime = row["started_at"]
            await self._audit(
                conn,
                row["id"],
                actor,
                AuditAction.STOPPED,
                {
                    "winner_variant_id": str(winner_id) if winner_id else None,
                    "winner_variant_key": winner_key,
                    "reason": reason,
                    "stopped_at": changed["stopped_at"].isoformat(),
                    "ran_seconds": (changed["stopped_at"] - started_at).total_seconds(),
                    "version": changed["version"],
                    **({"evidence": evidence} if evidence else {}),
                },
            )
            experiment = await self._load(conn, row["id"])
        await self._changed(experiment.id)
        return experiment

    async def drop_variants(
        self, ref: str, variant_ids: Sequence[str], *, actor: str, evidence: JsonObject
    ) -> Experiment:
        """Stop giving these variants to new subjects (their subjects stay sticky).

        RUNNING only; variants already dropped are left as they are; at least one variant
        must stay active (conclude the experiment instead). One audit row per variant,
        carrying the numbers that justified the drop."""
        async with self._transaction() as conn:
            row = await self._lock_for(conn, ref, Operation.STOP)
            dropped = await conn.fetch(
                """UPDATE experiment_variants SET state = 'dropped', dropped_at = now()
                WHERE experiment_id = $1 AND id = ANY($2::uuid[]) AND state = 'active'
                RETURNING id, key""",
                row["id"],
                [uuid.UUID(v) for v in variant_ids],
            )
            active = await conn.fetchval(
                "SELECT count(*) FROM experiment_variants "
                "WHERE experiment_id = $1 AND state = 'active'",
                row["id"],
            )
            if active == 0:
                raise InvalidArgument.from_violations(
                    [FieldViolation("variant_ids", "cannot drop every variant; stop instead")]
                )
            if dropped:
                await conn.execute(
                    "UPDATE experiments SET version = version + 1, updated_at = now() "
                    "WHERE id = $1",
                    row["id"],
                )
            for variant in dropped:
                await self._audit(
                    conn,
                    row["id"],
                    actor,
                    AuditAction.VARIANT_DROPPED,
                    {"variant_id": str(variant["id"]), "variant_key": variant["key"], **evidence},
                )
            experiment = await self._load(conn, row["id"])
        if dropped:
            await self._changed(experiment.id)
        return experiment

    async def archive(self, ref: str, *, actor: str) -> Experiment:
        """STOPPED -> ARCHIVED."""
        async with self._transaction() as conn:
            row = await self._lock_for(conn, ref, Operation.ARCHIVE)
            changed = await self._set_status(conn, row, Operation.ARCHIVE, "archived_at = now()")
            await self._audit(
                conn,
                row["id"],
                actor,
                AuditAction.ARCHIVED,
                {
                    "archived_at": changed["archived_at"].isoformat(),
                    "stopped_at": row["stopped_at"].isoformat(),
                    "version": changed["version"],
                },
            )
            experiment = await self._load(conn, row["id"])
        await self._changed(experiment.id)
        return experiment

    async def archive_stale(
        self, *, older_than_days: int, actor: str, dry_run: bool = False
    ) -> list[Experiment]:
        """Archive every experiment stopped more than ``older_than_days`` days ago (oldest
        first); with ``dry_run``, only return them."""
        stale = """status = 'stopped' AND stopped_at < now() - make_interval(days => $1)"""
        async with self._transaction() as conn:
            if dry_run:
                rows = await conn.fetch(
                    f"{_SELECT_EXPERIMENT} WHERE {stale} ORDER BY stopped_at, id",
                    older_than_days,
                )
                return await self._with_variants(conn, rows)
            rows = await conn.fetch(
                f"""UPDATE experiments
                SET status = 'archived', archived_at = now(), updated_at = now(),
                    version = version + 1
                WHERE {stale}
                RETURNING {_EXPERIMENT_COLUMNS}""",
                older_than_days,
            )
            rows = sorted(rows, key=lambda r: (r["stopped_at"], r["id"]))
            await conn.executemany(
                _INSERT_AUDIT,
                [
                    (
                        r["id"],
                        actor,
                        AuditAction.ARCHIVED.value,
                        {
                            "archived_at": r["archived_at"].isoformat(),
                            "stopped_at": r["stopped_at"].isoformat(),
                            "older_than_days": older_than_days,
                            "version": r["version"],
                        },
                    )
                    for r in rows
                ],
            )
            experiments = await self._with_variants(conn, rows)
        for experiment in experiments:
            await self._changed(experiment.id)
        return experiments

    async def delete(self, ref: str, *, actor: str) -> None:
        """Delete a DRAFT or STOPPED experiment and everything under it (variants,
        assignments, metrics, bandit state); its audit trail stays."""
        async with self._transaction() as conn:
            row = await self._lock_for(conn, ref, Operation.DELETE)
            counts = await conn.fetchrow(
                """SELECT
                    (SELECT count(*) FROM experiment_variants WHERE experiment_id = $1)
                        AS variants,
                    (SELECT count(*) FROM experiment_assignments WHERE experiment_id = $1)
                        AS assignments,
                    (SELECT count(*) FROM experiment_metrics WHERE experiment_id = $1)
                        AS metrics""",
                row["id"],
            )
            await conn.execute(
                "DELETE FROM experiments WHERE id = $1 AND status = ANY($2::text[])",
                row["id"],
                _statuses(Operation.DELETE),
            )
            await self._audit(
                conn,
                row["id"],
                actor,
                AuditAction.DELETED,
                {
                    "key": row["key"],
                    "name": row["name"],
                    "status": row["status"],
                    "version": row["version"],
                    **dict(counts),
                },
            )
        await self._changed(str(row["id"]))

    # --- helpers -------------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                try:
                    yield conn
                except UNAVAILABLE_ERRORS:
                    # A query past its deadline (TimeoutError) or a broken connection:
                    # close it now rather than wait on its clean-up (a stalled server
                    # would hold the caller for the cancellation too).
                    conn.terminate()
                    raise
        except UNAVAILABLE_ERRORS as exc:
            raise Unavailable(
                f"PostgreSQL is unavailable ({type(exc).__name__}); nothing was changed, retry",
                metadata={"store": "postgres"},
            ) from exc

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._connection() as conn, conn.transaction():
            yield conn

    async def _changed(self, experiment_id: str) -> None:
        if self._on_change is None:
            return
        try:
            await self._on_change(experiment_id)
        except Exception:  # committed already; the periodic version check catches up
            log.warning("on_change(%s) failed", experiment_id, exc_info=True)

    async def _find(
        self, conn: asyncpg.Connection, ref: str, *, for_update: bool = False
    ) -> asyncpg.Record:
        # A key may look like a UUID: the id wins, then the key.
        row: asyncpg.Record | None = await conn.fetchrow(
            f"""{_SELECT_EXPERIMENT}
            WHERE id = $1 OR key = $2
            ORDER BY (id = $1) IS TRUE DESC
            LIMIT 1{" FOR UPDATE" if for_update else ""}""",
            _as_uuid(ref),
            ref,
        )
        if row is None:
            raise NotFound(f"experiment '{ref}' not found", metadata={"experiment": ref})
        return row

    async def _lock_for(
        self, conn: asyncpg.Connection, ref: str, operation: Operation
    ) -> asyncpg.Record:
        row = await self._find(conn, ref, for_update=True)
        operation.check(row["key"], ExperimentStatus(row["status"]))
        return row

    async def _set_status(
        self,
        conn: asyncpg.Connection,
        row: asyncpg.Record,
        operation: Operation,
        assignments: str,
        *args: object,
    ) -> asyncpg.Record:
        """Conditional transition; ``assignments`` may use $3, $4... for ``args``."""
        target = operation.target
        assert target is not None
        changed: asyncpg.Record | None = await conn.fetchrow(
            f"""UPDATE experiments
            SET status = '{target.value}', {assignments}, updated_at = now(),
                version = version + 1
            WHERE id = $1 AND status = ANY($2::text[])
            RETURNING {_EXPERIMENT_COLUMNS}""",
            row["id"],
            _statuses(operation),
            *args,
        )
        if changed is None:  # unreachable while the row lock holds; kept as a guard
            raise operation.wrong_state(row["key"], ExperimentStatus(row["status"]))
        return changed

    async def _active_variant(
        self, conn: asyncpg.Connection, row: asyncpg.Record, ref: str
    ) -> tuple[uuid.UUID, str]:
        variant = await conn.fetchrow(
            """SELECT id, key, state FROM experiment_variants
            WHERE experiment_id = $1 AND (id = $2 OR key = $3)
            ORDER BY (id = $2) IS TRUE DESC
            LIMIT 1""",
            row["id"],
            _as_uuid(ref),
            ref,
        )
        metadata = {"experiment": row["key"], "variant": ref}
        if variant is None:
            raise NotFound(
                f"experiment '{row['key']}' has no variant '{ref}'",
                reason="ERROR_REASON_VARIANT_NOT_FOUND",
                metadata=metadata,
            )
        if variant["state"] != VariantState.ACTIVE.value:
            raise InvalidArgument(
                f"variant '{variant['key']}' of experiment '{row['key']}' was dropped and "
                "cannot win; name an active variant",
                reason="ERROR_REASON_VARIANT_NOT_FOUND",
                metadata=metadata,
                violations=[FieldViolation("winner_variant", "the variant was dropped")],
            )
        return variant["id"], variant["key"]

    async def _audit_subject(self, conn: asyncpg.Connection, ref: str) -> uuid.UUID:
        row = await conn.fetchrow(
            "SELECT id FROM experiments WHERE id = $1 OR key = $2 "
            "ORDER BY (id = $1) IS TRUE DESC LIMIT 1",
            _as_uuid(ref),
            ref,
        )
        if row is not None:
            found: uuid.UUID = row["id"]
            return found
        ref_id = _as_uuid(ref)
        if ref_id is None:
            raise NotFound(f"experiment '{ref}' not found", metadata={"experiment": ref})
        return ref_id  # perhaps deleted: its audit rows remain

    async def _insert_variants(
        self,
        conn: asyncpg.Connection,
        experiment_id: uuid.UUID,
        spec: ExperimentSpec,
        ids: Mapping[str, uuid.UUID],
    ) -> None:
        try:
            await conn.executemany(
                _INSERT_VARIANT,
                [
                    (
                        ids.get(v.key) or uuid.uuid4(),
                        experiment_id,
                        v.key,
                        v.name,
                        v.config,
                        v.is_control,
                        v.weight,
                        position,
                    )
                    for position, v in enumerate(spec.variants)
                ],
            )
        except asyncpg.UniqueViolationError as exc:
            # Validation catches these first; the constraints are the last word.
            if exc.constraint_name == _VARIANT_KEY_CONSTRAINT:
                raise InvalidArgument.from_violations(
                    [FieldViolation("experiment.variants", "variant keys must be unique")]
                ) from None
            if exc.constraint_name == _ONE_CONTROL_INDEX:
                raise InvalidArgument.from_violations(
                    [FieldViolation("experiment.variants", "at most one control")]
                ) from None
            raise

    async def _audit(
        self,
        conn: asyncpg.Connection,
        experiment_id: uuid.UUID,
        actor: str,
        action: AuditAction,
        details: JsonObject,
    ) -> None:
        await conn.execute(_INSERT_AUDIT, experiment_id, actor, action.value, details)

    async def _load(self, conn: asyncpg.Connection, experiment_id: uuid.UUID) -> Experiment:
        row = await conn.fetchrow(f"{_SELECT_EXPERIMENT} WHERE id = $1", experiment_id)
        assert row is not None
        return (await self._with_variants(conn, [row]))[0]

    async def _with_variants(
        self, conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]
    ) -> list[Experiment]:
        if not rows:
            return []
        variant_rows = await conn.fetch(_SELECT_VARIANTS, [r["id"] for r in rows])
        by_experiment: dict[uuid.UUID, list[Variant]] = {r["id"]: [] for r in rows}
        for v in variant_rows:
            by_experiment[v["experiment_id"]].append(
                Variant(
                    id=str(v["id"]),
                    key=v["key"],
                    name=v["name"],
                    config=v["config"],
                    is_control=v["is_control"],
                    weight=v["weight"],
                    position=v["position"],
                    state=VariantState(v["state"]),
                    dropped_at=v["dropped_at"],
                )
            )
        if len(rows) <= THREAD_BUILD_ROWS:
            return [_experiment(r, by_experiment[r["id"]]) for r in rows]
        # A long page (List calls) is built off the event loop: Assign/Track keep it.
        return await asyncio.to_thread(
            lambda: [_experiment(r, by_experiment[r["id"]]) for r in rows]
        )


def _experiment(row: asyncpg.Record, variants: list[Variant]) -> Experiment:
    winner = row["winner_variant_id"]
    return Experiment(
        id=str(row["id"]),
        key=row["key"],
        name=row["name"],
        description=row["description"],
        status=ExperimentStatus(row["status"]),
        targeting=targeting_from_json(row["targeting"]),
        allocation=Allocation(row["allocation"]),
        exposure_percent=row["exposure_percent"],
        primary_metric=row["primary_metric"],
        fail_fast=FailFast(
            row["fail_fast_threshold"],
            row["fail_fast_min_samples"],
            row["auto_stop"],
            row["fail_fast_error_rate"],
            row["fail_fast_min_effect"],
        ),
        reward=Reward(row["reward"]),
        variants=tuple(variants),
        created_by=row["created_by"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        version=row["version"],
        started_at=row["started_at"],
        stopped_at=row["stopped_at"],
        archived_at=row["archived_at"],
        winner_variant_id=str(winner) if winner else None,
        stop_reason=row["stop_reason"],
    )


def _spec_columns(spec: ExperimentSpec) -> tuple[Any, ...]:
    """Values of key .. fail_fast_min_effect, in the order of the INSERT and UPDATE
    statements."""
    return (
        spec.key,
        spec.name,
        spec.description,
        targeting_to_json(spec.targeting),
        spec.allocation.value,
        spec.exposure_percent,
        spec.primary_metric,
        spec.fail_fast.threshold,
        spec.fail_fast.min_samples,
        spec.fail_fast.auto_stop,
        spec.reward.value,
        spec.fail_fast.error_rate,
        spec.fail_fast.min_effect,
    )


def _statuses(operation: Operation) -> list[str]:
    return [s.value for s in operation.allowed_from]


def _as_uuid(ref: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(ref)
    except ValueError:
        return None


def _row_count(status: str) -> int:
    """Rows affected, from a command tag such as ``INSERT 0 3``."""
    return int(status.rsplit(" ", 1)[-1])
