"""Apply `migrations/NNNN_name.sql` files in order, once each, from any number of processes.

Each file runs in its own transaction together with its row in
`schema_migrations`, so a migration is either wholly applied and recorded or
not at all. A session-level advisory lock serialises concurrent runs (several
pods starting at once): the second runner waits, then finds nothing to do.
A file edited after it was applied is refused, never re-run. Files must not
contain their own BEGIN/COMMIT.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from sira_server.store.postgres import connect

log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 0x5349_5241_4D49_4752
"""pg_advisory_lock key held during a run: the ASCII bytes of "SIRAMIGR"."""

MIGRATIONS_DIR_ENV = "SIRA_MIGRATIONS_DIR"
FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9][a-z0-9_]*)\.sql$")

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migrations cannot be applied as they are; the message says which file and why."""


@dataclass(frozen=True)
class Migration:
    version: str
    """Four digits from the file name, e.g. "0001"; the ledger's primary key."""
    name: str
    path: Path
    sql: str
    checksum: str
    """sha256 of the file's bytes."""


def default_migrations_dir() -> Path:
    """SIRA_MIGRATIONS_DIR if set (the Docker image sets it), else the repository's."""
    configured = os.environ.get(MIGRATIONS_DIR_ENV, "").strip()
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3] / "migrations"


def discover_migrations(migrations_dir: Path) -> list[Migration]:
    """Every `NNNN_name.sql` file of the directory, in version order."""
    if not migrations_dir.is_dir():
        raise MigrationError(f"migrations directory {migrations_dir} does not exist")
    found: dict[str, Migration] = {}
    for path in sorted(migrations_dir.glob("*.sql")):
        match = FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(
                f"{path}: migration files are named NNNN_name.sql"
                " (four digits, lowercase letters, digits and underscores)"
            )
        version = match["version"]
        if version in found:
            raise MigrationError(
                f"{path}: version {version} is also used by {found[version].path.name}"
            )
        data = path.read_bytes()
        found[version] = Migration(
            version=version,
            name=match["name"],
            path=path,
            sql=data.decode("utf-8"),
            checksum=hashlib.sha256(data).hexdigest(),
        )
    return [found[version] for version in sorted(found)]


async def apply_migrations(dsn: str, migrations_dir: Path | None = None) -> list[str]:
    """Apply pending migrations; return the versions applied by this call.

    Raises PostgresUnreachable when the database cannot be reached and
    MigrationError when a file is malformed, was changed after being applied,
    or fails (that file's transaction is rolled back; earlier ones stay applied).
    """
    migrations = discover_migrations(migrations_dir or default_migrations_dir())
    conn = await connect(dsn)
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY):
            log.info("another process is migrating this database; waiting for it")
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        return await _apply_pending(conn, migrations)
    finally:
        # Ending the session releases the advisory lock, even if it broke mid-run.
        try:
            await conn.close(timeout=5)
        except Exception:
            conn.terminate()


async def require_migrated(conn: asyncpg.Connection, migrations_dir: Path | None = None) -> None:
    """MigrationError unless every migration of this release is applied: the code reads
    and writes the schema they make (an external database is migrated by the operator,
    `sira-server migrate`, before the new release serves). Without its migrations
    directory (a bare pip install, no SIRA_MIGRATIONS_DIR) it cannot tell: a warning."""
    directory = migrations_dir or default_migrations_dir()
    if not directory.is_dir():
        log.warning("cannot check the schema: no migrations directory %s", directory)
        return
    migrations = discover_migrations(directory)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        rows = []
    applied = {row["version"] for row in rows}
    pending = [f"{m.version}_{m.name}" for m in migrations if m.version not in applied]
    if pending:
        raise MigrationError(
            f"the database lacks migration(s) {', '.join(pending)} of this release;"
            " run `sira-server migrate` (with SIRA_DATABASE_URL) first"
        )


async def _apply_pending(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    await conn.execute(CREATE_LEDGER)
    applied: dict[str, str] = {
        row["version"]: row["checksum"]
        for row in await conn.fetch("SELECT version, checksum FROM schema_migrations")
    }
    for migration in migrations:
        recorded = applied.get(migration.version)
        if recorded is not None and recorded != migration.checksum:
            raise MigrationError(
                f"{migration.path.name} was changed after it was applied"
                f" (applied checksum {recorded[:12]}, file now {migration.checksum[:12]});"
                " never edit an applied migration: restore it and add a new file"
            )
    unknown = sorted(set(applied) - {m.version for m in migrations})
    if unknown:
        # A newer release migrated this database; its files are not ours to judge.
        log.warning("database has migrations this release does not know: %s", unknown)

    done: list[str] = []
    for migration in migrations:
        if migration.version in applied:
            continue
        try:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
        except asyncpg.PostgresError as exc:
            raise MigrationError(
                f"{migration.path.name} failed and was rolled back: {type(exc).__name__}: {exc}"
            ) from exc
        log.info("applied migration %s_%s", migration.version, migration.name)
        done.append(migration.version)
    return done
