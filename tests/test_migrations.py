"""store.migrate: ordered, once-only, concurrency-safe, tamper-evident migrations."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from sira_server.store.migrate import (
    MIGRATION_LOCK_KEY,
    MigrationError,
    apply_migrations,
    default_migrations_dir,
    discover_migrations,
    require_migrated,
)
from sira_server.store.postgres import PostgresUnreachable

REPO_MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
# Whatever the repository holds; files the tests add are numbered 9xxx to stay clear of it.
ALL = [m.version for m in discover_migrations(REPO_MIGRATIONS)]
LEDGER = [(m.version, m.name) for m in discover_migrations(REPO_MIGRATIONS)]
SEED_TABLES = {
    "experiments",
    "experiment_variants",
    "experiment_assignments",
    "experiment_metrics",
    "experiment_audit_logs",
    "experiment_bandit_state",
}


async def _tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    finally:
        await conn.close()
    return {row["table_name"] for row in rows}


async def _ledger(dsn: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    return [(row["version"], row["name"]) for row in rows]


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A private copy of the repository's migrations, free to edit."""
    target = tmp_path / "migrations"
    shutil.copytree(REPO_MIGRATIONS, target)
    return target


def test_default_dir_is_the_repository_migrations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIRA_MIGRATIONS_DIR", raising=False)
    assert default_migrations_dir() == REPO_MIGRATIONS
    monkeypatch.setenv("SIRA_MIGRATIONS_DIR", "/opt/sira/migrations")
    assert default_migrations_dir() == Path("/opt/sira/migrations")


def test_discover_orders_by_version(tmp_path: Path) -> None:
    for name in ("0010_later.sql", "0002_second.sql", "0001_first.sql"):
        (tmp_path / name).write_text("SELECT 1;")
    (tmp_path / "README.md").write_text("not a migration")
    assert [m.version for m in discover_migrations(tmp_path)] == ["0001", "0002", "0010"]
    assert discover_migrations(tmp_path)[0].name == "first"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["0001_a.sql", "0001_b.sql"], "also used by"),
        (["1_short.sql"], "NNNN_name.sql"),
        (["0001_Upper.sql"], "NNNN_name.sql"),
    ],
)
def test_discover_rejects_bad_file_sets(tmp_path: Path, files: list[str], message: str) -> None:
    for name in files:
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=message):
        discover_migrations(tmp_path)


async def test_missing_directory_is_a_clear_error(fresh_database_dsn: str, tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="does not exist"):
        await apply_migrations(fresh_database_dsn, tmp_path / "nope")


async def test_applies_the_schema_to_an_empty_database(fresh_database_dsn: str) -> None:
    assert await _tables(fresh_database_dsn) == set()
    assert await apply_migrations(fresh_database_dsn) == ALL
    assert await _tables(fresh_database_dsn) >= {*SEED_TABLES, "schema_migrations"}
    assert await _ledger(fresh_database_dsn) == LEDGER


async def test_second_run_applies_nothing(fresh_database_dsn: str) -> None:
    assert await apply_migrations(fresh_database_dsn) == ALL
    assert await apply_migrations(fresh_database_dsn) == []
    assert await _ledger(fresh_database_dsn) == LEDGER


async def test_only_pending_files_run(fresh_database_dsn: str, migrations_copy: Path) -> None:
    assert await apply_migrations(fresh_database_dsn, migrations_copy) == ALL
    (migrations_copy / "9001_add_note.sql").write_text(
        "ALTER TABLE experiments ADD COLUMN note text NOT NULL DEFAULT '';"
    )
    assert await apply_migrations(fresh_database_dsn, migrations_copy) == ["9001"]
    assert await _ledger(fresh_database_dsn) == [*LEDGER, ("9001", "add_note")]


async def test_a_release_refuses_a_database_missing_its_migrations(
    fresh_database_dsn: str, migrations_copy: Path
) -> None:
    """`sira-server` checks at start (app.check_stores_fit) that an external database has
    every migration it ships, and says which and what to run."""
    conn = await asyncpg.connect(fresh_database_dsn)
    try:
        with pytest.raises(MigrationError, match="lacks migration"):
            await require_migrated(conn, migrations_copy)  # not even the ledger yet
        await apply_migrations(fresh_database_dsn, migrations_copy)
        await require_migrated(conn, migrations_copy)
        (migrations_copy / "9001_add_note.sql").write_text("SELECT 1;")
        with pytest.raises(MigrationError, match=r"9001_add_note of this release.*sira-server mig"):
            await require_migrated(conn, migrations_copy)
        await require_migrated(conn, migrations_copy / "absent")  # cannot tell: warns only
    finally:
        await conn.close()


async def test_changed_file_is_refused(fresh_database_dsn: str, migrations_copy: Path) -> None:
    await apply_migrations(fresh_database_dsn, migrations_copy)
    initial = migrations_copy / "0001_initial.sql"
    initial.write_text(initial.read_text() + "\n-- an innocent-looking edit\n")
    (migrations_copy / "9001_more.sql").write_text("CREATE TABLE never_created (id int);")

    with pytest.raises(MigrationError, match=r"0001_initial\.sql was changed after it was applied"):
        await apply_migrations(fresh_database_dsn, migrations_copy)
    # Refused before anything ran: the next file was not applied either.
    assert "never_created" not in await _tables(fresh_database_dsn)
    assert await _ledger(fresh_database_dsn) == LEDGER


async def test_failing_file_rolls_back_wholly(
    fresh_database_dsn: str, migrations_copy: Path
) -> None:
    (migrations_copy / "9001_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\n"
        "INSERT INTO half_done VALUES (1);\n"
        "SELECT * FROM no_such_table;\n"
    )
    with pytest.raises(MigrationError, match=r"9001_broken\.sql failed.*no_such_table"):
        await apply_migrations(fresh_database_dsn, migrations_copy)

    tables = await _tables(fresh_database_dsn)
    assert "half_done" not in tables
    assert tables >= SEED_TABLES  # earlier files ran in their own transactions and stay
    assert await _ledger(fresh_database_dsn) == LEDGER


async def test_failing_first_file_records_nothing(fresh_database_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "0001_bad.sql").write_text("CREATE TABLE t (id int); CREATE TABLE t (id int);")
    with pytest.raises(MigrationError, match="DuplicateTableError"):
        await apply_migrations(fresh_database_dsn, tmp_path)
    assert await _tables(fresh_database_dsn) == {"schema_migrations"}
    assert await _ledger(fresh_database_dsn) == []


async def test_unreachable_database_is_a_clear_error() -> None:
    dsn = "postgresql://sira:s3cret@127.0.0.1:1/sira"
    with pytest.raises(PostgresUnreachable, match="cannot connect to PostgreSQL") as caught:
        await apply_migrations(dsn)
    assert "s3cret" not in str(caught.value)
    assert caught.value.status_name == "UNAVAILABLE"


def _spawn_migrator(dsn: str) -> subprocess.Popen[str]:
    code = (
        "import asyncio, json, sys\n"
        "from sira_server.store.migrate import apply_migrations\n"
        "print(json.dumps(asyncio.run(apply_migrations(sys.argv[1]))))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_two_processes_at_once_apply_exactly_once(fresh_database_dsn: str) -> None:
    # Hold the migration lock so both processes queue on it, then let them race.
    holder = await asyncpg.connect(fresh_database_dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        processes = [_spawn_migrator(fresh_database_dsn) for _ in range(2)]
        try:
            deadline = time.monotonic() + 120
            while await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ) < len(processes):
                exited = [p for p in processes if p.poll() is not None]
                assert not exited, exited[0].communicate()
                assert time.monotonic() < deadline, "migrators never queued on the lock"
                await asyncio.sleep(0.05)
        finally:
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await holder.close()

    results = []
    for process in processes:
        stdout, stderr = await asyncio.to_thread(process.communicate, timeout=120)
        assert process.returncode == 0, stderr
        results.append(json.loads(stdout))
    assert sorted(results) == [[], ALL]
    assert await _ledger(fresh_database_dsn) == LEDGER
