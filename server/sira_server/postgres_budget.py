"""How many Postgres connections a SIRA process opens, and how it goes through PgBouncer.

A serving process (`--role serve` or `all`; each of `--workers N` is one) opens two
pools: the decision path's, which the write-behind flusher shares in `all`
(`SIRA_PG_POOL_SIZE`, 10), and the admin pool of lifecycle calls and reports
(`SIRA_ADMIN_POOL_SIZE`, 4). A flusher process (`--role flusher`) opens only the first.
asyncpg opens connections lazily up to a pool's max size, so the budget is a ceiling:
what the server's `max_connections` must cover when every process is busy. The launcher
logs it at start; docs/scaling.md adds up the Kubernetes manifests.

PgBouncer in transaction mode (`SIRA_PG_PGBOUNCER=1`) hands each transaction whichever
server connection is free, so nothing may outlive a transaction:
- asyncpg's named prepared statements: off (`statement_cache_size=0`, asyncpg then
  uses the unnamed statement of each query);
- session settings as startup parameters (PgBouncer refuses `statement_timeout` there):
  the admin pool's statement timeout becomes its client-side command timeout, which
  cancels the query through PgBouncer;
- session advisory locks: the autopilot's is transaction-scoped. `sira-server migrate`
  holds a session lock for a whole run, so `SIRA_MIGRATE_DATABASE_URL` must reach
  Postgres directly.
SIRA uses no LISTEN/NOTIFY (change events go through Redis). The flusher's temporary
tables are created `IF NOT EXISTS` in each transaction and emptied on commit, so a server
connection that already has them is as good as a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PostgresSettings:
    pool_size: int = 10
    """SIRA_PG_POOL_SIZE: connections of the decision path's pool (Assign's fallback
    while Redis is down, catalog loads, the autopilot, and the write-behind flusher in
    `--role all` / `flusher`), per process."""
    pgbouncer: bool = False
    """SIRA_PG_PGBOUNCER: `1` when SIRA_DATABASE_URL is a PgBouncer in transaction mode:
    no named prepared statements, no session settings (see the module doc)."""

    def pool_options(self) -> dict[str, Any]:
        """asyncpg.create_pool arguments these settings stand for."""
        return {"statement_cache_size": 0} if self.pgbouncer else {}


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    """The most Postgres connections one `sira-server` instance can hold at once."""

    role: str
    processes: int
    pool_size: int
    admin_pool_size: int
    """0 for the flusher role, which opens no admin pool."""

    @property
    def per_process(self) -> int:
        return self.pool_size + self.admin_pool_size

    @property
    def total(self) -> int:
        return self.processes * self.per_process

    def describe(self) -> str:
        pools = f"pool {self.pool_size}"
        if self.admin_pool_size:
            pools += f" + admin pool {self.admin_pool_size}"
        return (
            f"Postgres connection budget: at most {self.total} for this instance"
            f" ({self.processes} process(es) x ({pools}), role {self.role});"
            " every replica's budget together must stay under max_connections"
        )


def connection_budget(
    role: str, workers: int, pool_size: int, admin_pool_size: int
) -> ConnectionBudget:
    """The budget of one instance started with these settings."""
    if role == "flusher":
        return ConnectionBudget(role, 1, pool_size, 0)
    return ConnectionBudget(role, workers, pool_size, admin_pool_size)
