"""Least privilege: the server's role `sira_app` writes rows, never the schema or the audit trail;
the embedded default serves as that role and listens on loopback only."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import psutil
import pytest
from fault_stores import free_port
from server_fixtures import run_sira_server

from sira_server.store.migrate import apply_migrations
from sira_server.store.roles import APP_ROLE, as_role

DENIED = asyncpg.InsufficientPrivilegeError


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a freshly migrated database as the application role."""
    conn = await asyncpg.connect(as_role(database_url))
    try:
        yield conn
    finally:
        await conn.close()


async def test_the_app_role_has_no_cluster_powers(app: asyncpg.Connection) -> None:
    row = await app.fetchrow(
        "SELECT current_user AS me, rolsuper, rolcreaterole, rolcreatedb, rolreplication,"
        " rolbypassrls FROM pg_roles WHERE rolname = current_user"
    )
    assert row["me"] == APP_ROLE
    assert not any(row[k] for k in ("rolsuper", "rolcreaterole", "rolcreatedb"))
    assert not row["rolreplication"]
    assert not row["rolbypassrls"]


async def test_the_app_role_only_appends_to_the_audit_log(app: asyncpg.Connection) -> None:
    await app.execute(
        "INSERT INTO experiment_audit_logs (actor, action) VALUES ('alice', 'created')"
    )
    assert await app.fetchval("SELECT count(*) FROM experiment_audit_logs") == 1
    for sql in (
        "UPDATE experiment_audit_logs SET actor = 'mallory'",
        "DELETE FROM experiment_audit_logs",
        "TRUNCATE experiment_audit_logs",
        # The triggers that make it append-only cannot be switched off by their writer.
        "ALTER TABLE experiment_audit_logs DISABLE TRIGGER ALL",
        "ALTER TABLE experiment_audit_logs DISABLE TRIGGER experiment_audit_logs_no_truncate",
        "DROP TRIGGER experiment_audit_logs_no_update_delete ON experiment_audit_logs",
        "CREATE OR REPLACE FUNCTION experiment_audit_logs_immutable() RETURNS trigger"
        " LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
    ):
        with pytest.raises(DENIED):
            await app.execute(sql)
    assert await app.fetchval("SELECT actor FROM experiment_audit_logs") == "alice"


async def test_the_app_role_cannot_change_the_schema(app: asyncpg.Connection) -> None:
    for sql in (
        "CREATE TABLE sneaky (id int)",
        "ALTER TABLE experiments ADD COLUMN sneaky int",
        "ALTER TABLE experiment_metrics DROP CONSTRAINT experiment_metrics_value_check",
        "DROP TABLE experiment_bandit_state",
        "CREATE INDEX sneaky ON experiments (name)",
        "INSERT INTO schema_migrations (version, name, checksum) VALUES ('9999', 'x', 'x')",
    ):
        with pytest.raises(DENIED):
            await app.execute(sql)
    # What the write-behind needs: temporary tables of its own session.
    await app.execute("CREATE TEMP TABLE scratch (id int)")


async def test_tables_of_later_migrations_are_usable_by_the_app_role(
    database_url: str, app: asyncpg.Connection
) -> None:
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute("CREATE TABLE later_table (id int PRIMARY KEY)")
    finally:
        await owner.close()
    await app.execute("INSERT INTO later_table VALUES (1)")
    assert await app.fetchval("SELECT id FROM later_table") == 1
    with pytest.raises(DENIED):
        await app.execute("ALTER TABLE later_table ADD COLUMN x int")


async def test_concurrent_migrations_share_the_role(
    postgres_server_dsn: str, fresh_database_dsn: str
) -> None:
    """The role is cluster-wide: concurrent runs on several databases all succeed."""
    from conftest import _create_database, _drop_database

    other = await _create_database(postgres_server_dsn, "sira_empty")
    try:
        applied = await asyncio.gather(
            apply_migrations(fresh_database_dsn), apply_migrations(other)
        )
        assert all("0003" in versions for versions in applied)
        for dsn in (fresh_database_dsn, other):
            conn = await asyncpg.connect(as_role(dsn))
            try:
                assert await conn.fetchval("SELECT count(*) FROM experiments") == 0
            finally:
                await conn.close()
    finally:
        await _drop_database(postgres_server_dsn, other)


@pytest.mark.slow
async def test_the_embedded_default_serves_as_the_app_role_on_loopback() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="sira-approle-"))  # see test_server's embedded test
    metrics_port = free_port()
    env = {
        "SIRA_JWT_SECRET": "",
        "SIRA_GRPC_HOST": "",  # the defaults, not the fixture's explicit loopback
        "SIRA_METRICS_HOST": "",
        "SIRA_METRICS_PORT": str(metrics_port),
    }
    try:
        with run_sira_server("", "", data_dir, extra_env=env) as server:
            host, port = server.address.rsplit(":", 1)
            assert host == "127.0.0.1"
            listening = {
                (c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)  # gRPC's v4-mapped socket
                for c in psutil.Process(server.process.pid).net_connections("inet")
                if c.status == psutil.CONN_LISTEN
            }
            assert ("127.0.0.1", int(port)) in listening
            assert ("127.0.0.1", metrics_port) in listening
            assert not [addr for addr in listening if addr[0] in ("0.0.0.0", "::")]
            users = await _session_users(data_dir / "postgres")
            assert users == {APP_ROLE}
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def _session_users(pgdata: Path) -> set[str]:
    """Roles of the client sessions open on the embedded database `sira`."""
    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    socket_dir, port = lines[4], lines[3]
    owner = await asyncpg.connect(host=socket_dir, port=int(port), user="postgres", database="sira")
    try:
        rows = await owner.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity"
            " WHERE datname = 'sira' AND backend_type = 'client backend'"
            " AND pid <> pg_backend_pid()"
        )
    finally:
        await owner.close()
    return {row["usename"] for row in rows}


def test_as_role_keeps_the_server_and_drops_the_password() -> None:
    embedded = as_role("postgresql://postgres:@/sira?host=/data/run")
    assert embedded == "postgresql://sira_app@/sira?host=/data/run"
    assert parse_qs(urlsplit(embedded).query) == {"host": ["/data/run"]}
    assert as_role("postgresql://owner:secret@db:5432/sira") == "postgresql://sira_app@db:5432/sira"


def test_migrate_runs_as_the_owner_the_server_as_the_app_role() -> None:
    from sira_server.cli import build_parser

    env = {"SIRA_DATABASE_URL": "postgresql://sira_app@db/sira"}
    assert build_parser(env).parse_args(["migrate"]).database_url == env["SIRA_DATABASE_URL"]
    env["SIRA_MIGRATE_DATABASE_URL"] = "postgresql://owner@db/sira"
    assert build_parser(env).parse_args(["migrate"]).database_url == "postgresql://owner@db/sira"


def test_listening_addresses_default_to_loopback() -> None:
    from sira_server.config import Settings

    settings = Settings.from_env({})
    assert (settings.grpc_host, settings.listen.metrics_host) == ("127.0.0.1", "127.0.0.1")
    exposed = Settings.from_env({"SIRA_GRPC_HOST": "0.0.0.0", "SIRA_METRICS_HOST": "0.0.0.0"})
    assert (exposed.grpc_host, exposed.listen.metrics_host) == ("0.0.0.0", "0.0.0.0")


def test_the_k8s_manifests_listen_on_the_pod_address() -> None:
    import yaml

    repo = Path(__file__).resolve().parents[1]
    deployment = yaml.safe_load((repo / "k8s/deployment.yaml").read_text())
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["SIRA_GRPC_HOST"] == env["SIRA_METRICS_HOST"] == "0.0.0.0"
    job = yaml.safe_load((repo / "k8s/migrate-job.yaml").read_text())
    names = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "SIRA_MIGRATE_DATABASE_URL" in names
