"""The database roles: the owner migrates, the server runs as `sira_app` (least privilege).

`migrations/0003_app_role.sql` creates `sira_app`: it reads and writes rows but owns
nothing, so it cannot change the schema, disable the audit log's triggers, or
update, delete or truncate the audit log. The embedded default migrates as the
owner and serves as `sira_app` over its private unix socket; in production
`SIRA_MIGRATE_DATABASE_URL` (owner) and `SIRA_DATABASE_URL` (sira_app) are two DSNs.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

APP_ROLE = "sira_app"


def as_role(dsn: str, role: str = APP_ROLE) -> str:
    """The same server and database as `role`, without a password (URL-style DSNs)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))
