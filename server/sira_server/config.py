"""Server settings, read once from the environment in `main` and passed down.

Nothing reads the environment at import time. Every field documents its
variable; `Settings.from_env` is the only place that parses them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sira_server.domain.limits import DEFAULT_MAX_EVENT_VALUE
from sira_server.limit_settings import LimitSettings
from sira_server.postgres_budget import PostgresSettings
from sira_server.store.hot_keys import MAX_SHARDS, HotLayout

DEV_SECRET_FILE = "dev-jwt-secret"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class JwtSettings:
    algorithm: str = "HS256"
    """SIRA_JWT_ALGORITHM: HS256 (shared secret), RS256 or ES256 (public key)."""
    secret: str | None = None
    """SIRA_JWT_SECRET: HS256 shared secret. Embedded default: generated once
    and kept in `<data dir>/dev-jwt-secret`."""
    public_key: str | None = None
    """SIRA_JWT_PUBLIC_KEY (PEM text) or SIRA_JWT_PUBLIC_KEY_FILE: for RS256/ES256."""
    audience: str | None = None
    """SIRA_JWT_AUDIENCE: when set, tokens must carry this `aud`."""
    issuer: str | None = None
    """SIRA_JWT_ISSUER: when set, tokens must carry this `iss`."""
    leeway_seconds: float = 30.0
    """SIRA_JWT_LEEWAY_SECONDS: clock skew tolerated on exp/nbf."""


@dataclass(frozen=True)
class ListenSettings:
    """Where the server listens besides gRPC (kept apart from the gRPC fields for merges)."""

    metrics_host: str = "127.0.0.1"
    """SIRA_METRICS_HOST: interface the Prometheus exporter binds. Loopback unless told
    otherwise (the k8s manifests set 0.0.0.0 for the scraper)."""


DEFAULT_HTTP_PORT = 8051
"""The dashboard's port in the embedded default (next to gRPC's 50051)."""


@dataclass(frozen=True)
class HttpSettings:
    """The dashboard and its browser RPC (Connect), served next to gRPC (`sira_server.web`)."""

    host: str = "127.0.0.1"
    """SIRA_HTTP_HOST: interface the HTTP server binds. Loopback unless told otherwise."""
    port: int | None = DEFAULT_HTTP_PORT
    """SIRA_HTTP_PORT: HTTP port; `0` picks a free one; `off` (None) serves no HTTP."""
    cors_origins: tuple[str, ...] = ()
    """SIRA_HTTP_CORS_ORIGINS: comma-separated origins (`https://ops.example.com`) whose
    pages may call the RPCs cross-origin. Empty: same origin only (no CORS headers)."""
    dev_sign_in: bool = False
    """Not read from the environment: the launcher sets it in the embedded default, where
    the server signs with the development secret of its data dir (`/dev/sign-in`)."""


def parse_http_port(raw: str | None) -> int | None:
    """`SIRA_HTTP_PORT`: unset -> the default, `off` -> None, else a port (0: any free)."""
    if raw is None:
        return DEFAULT_HTTP_PORT
    if raw.lower() in ("off", "none", "disabled"):
        return None
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(
            f"SIRA_HTTP_PORT must be a port number or 'off', got {raw[:40]!r}"
        ) from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"SIRA_HTTP_PORT must be within 0..65535, got {port}")
    return port


def parse_origins(raw: str | None) -> tuple[str, ...]:
    """`SIRA_HTTP_CORS_ORIGINS`: exact origins, scheme://host[:port], no path, no `*`."""
    origins = []
    for item in (raw or "").split(","):
        origin = item.strip().rstrip("/")
        if not origin:
            continue
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest or "*" in rest:
            raise ConfigError(
                "SIRA_HTTP_CORS_ORIGINS must list origins like https://ops.example.com "
                f"(scheme and host, no path, no wildcard), got {origin[:60]!r}"
            )
        origins.append(origin)
    return tuple(origins)


@dataclass(frozen=True)
class StoreTimeouts:
    """How long the server waits on Redis and Postgres before answering UNAVAILABLE.

    A store that is frozen, stalled or restarting is answered, never waited out: the
    caller gets UNAVAILABLE (and retries: Assign is sticky, Track idempotent)."""

    redis_seconds: float = 1.0
    """SIRA_REDIS_TIMEOUT_SECONDS: one Redis round trip of a request (Assign, Track,
    results, the posterior refresh), connect included."""
    postgres_seconds: float = 1.0
    """SIRA_POSTGRES_TIMEOUT_SECONDS: Postgres on the decision path (Assign's sticky
    fallback while Redis is down, the first lookup of an experiment not cached)."""
    rebuild_wait_seconds: float = 5.0
    """SIRA_REBUILD_WAIT_SECONDS: a request whose experiment's hot state is being
    rebuilt from Postgres waits this long; the rebuild itself goes on."""
    command_seconds: float = 5.0
    """SIRA_STORE_COMMAND_TIMEOUT_SECONDS: any other Redis or Postgres command
    (lifecycle, audit, reports, write-behind, rebuild): asyncpg's command_timeout and
    redis-py's socket timeout, so no store wait anywhere is unbounded."""
    health_probe_seconds: float = 2.0
    """SIRA_HEALTH_PROBE_SECONDS: interval and deadline of the health probes of each
    store; a store that does not answer turns its services NOT_SERVING."""


CLUSTER_DEFAULT_SHARDS = 8
"""Shards per experiment on a Redis Cluster unless SIRA_REDIS_SHARDS says otherwise: a
hot experiment spreads over up to 8 masters (docs/scaling.md has the reasoning)."""

ROLES = ("all", "serve", "flusher")
"""What one `sira-server` process does: see `Settings.role`."""

EVENT_LOOPS = ("uvloop", "asyncio")
"""What runs a `sira-server` process's coroutines: see `Settings.event_loop`."""


@dataclass(frozen=True, slots=True)
class ReplicaWait:
    """SIRA_REDIS_WAIT_REPLICAS / SIRA_REDIS_WAIT_TIMEOUT_MS: after the Lua scripts of
    each Assign/Track round trip, ``WAIT replicas timeout_ms`` on the same connection;
    fewer replicas confirming in time means the call is not acknowledged (UNAVAILABLE,
    the caller retries). See `store.replica_wait`."""

    replicas: int
    timeout_ms: int


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_flag(name: str, raw: str | None) -> bool:
    """A boolean setting: 1/true/yes/on or 0/false/no/off (unset: false)."""
    text = (raw or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true/false), got {text[:40]!r}")


def parse_role(raw: str) -> str:
    role = raw.strip().lower()
    if role not in ROLES:
        raise ConfigError(f"SIRA_ROLE / --role must be one of {', '.join(ROLES)}, got {raw[:40]!r}")
    return role


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    """SIRA_DATABASE_URL: Postgres DSN. Unset: start the embedded Postgres."""
    redis_url: str | None = None
    """SIRA_REDIS_URL: Redis URL. Unset: start the embedded Redis."""
    redis_cluster: bool = False
    """SIRA_REDIS_CLUSTER: `SIRA_REDIS_URL` names a node of a Redis Cluster (redis-py's
    cluster client: slot routing, MOVED/ASK, failover). Needs an external Redis."""
    replica_wait: ReplicaWait | None = None
    """SIRA_REDIS_WAIT_REPLICAS (0: None) and SIRA_REDIS_WAIT_TIMEOUT_MS."""
    hot_layout: HotLayout = field(default_factory=HotLayout)
    """SIRA_REDIS_SHARDS: shards of each experiment's hot state (`store.hot_keys`);
    default 1 on one Redis, `CLUSTER_DEFAULT_SHARDS` on a Redis Cluster. Every process
    of a deployment must use the same (checked at start). docs/scaling.md."""
    grpc_host: str = "127.0.0.1"
    """SIRA_GRPC_HOST: interface the gRPC server binds. Loopback unless told otherwise
    (containers set 0.0.0.0: the Dockerfile and the k8s manifests)."""
    grpc_port: int = 50051
    """SIRA_GRPC_PORT: gRPC port (0 picks a free one)."""
    metrics_port: int | None = 9464
    """SIRA_METRICS_PORT: Prometheus exporter port; 0 or empty disables it."""
    data_dir: Path = field(default_factory=lambda: Path(".sira"))
    """SIRA_DATA_DIR: where the embedded servers and the dev secret live."""
    jwt: JwtSettings = field(default_factory=JwtSettings)
    shutdown_grace_seconds: float = 10.0
    """SIRA_SHUTDOWN_GRACE_SECONDS: time in-flight RPCs get on SIGTERM."""
    workers: int = 1
    """SIRA_WORKERS: server processes sharing the port (SO_REUSEPORT)."""
    tls_cert_file: Path | None = None
    """SIRA_TLS_CERT_FILE / SIRA_TLS_KEY_FILE: serve TLS when both are set."""
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    """SIRA_TLS_CLIENT_CA_FILE: require client certificates signed by this CA (mTLS)."""
    log_level: str = "INFO"
    """SIRA_LOG_LEVEL: Python logging level."""
    role: str = "all"
    """SIRA_ROLE (or `--role`): `all` serves gRPC and runs the write-behind flusher in
    the same process (the embedded default); `serve` only serves, so its CPU goes to
    decisions; `flusher` only drains the write-behind streams into Postgres (no gRPC;
    external stores only). Run `serve` pods next to `flusher` pods, or `all`."""
    limits: LimitSettings = field(default_factory=LimitSettings)
    """Tracking tokens, caps, rate, input and connection limits (`limit_settings`)."""
    listen: ListenSettings = field(default_factory=ListenSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    timeouts: StoreTimeouts = field(default_factory=StoreTimeouts)
    postgres: PostgresSettings = field(default_factory=PostgresSettings)
    """Pool size and PgBouncer mode (`postgres_budget`)."""
    script_transport: str = "channel"
    """SIRA_SCRIPT_TRANSPORT: how the Lua scripts reach Redis: `channel` (the pipelined
    script channel, where it can connect: one node, no TLS, no replica WAIT; redis-py's
    pipelines otherwise, so always with SIRA_REDIS_CLUSTER or SIRA_REDIS_WAIT_REPLICAS)
    or `pipeline` (always redis-py). docs/design.md, "Scripts"."""
    event_loop: str = "uvloop"
    """SIRA_EVENT_LOOP: `uvloop` (libuv under asyncio: 6-9 % less server CPU per call,
    docs/benchmarks.md) or `asyncio` (the standard library's loop)."""
    insights_history_seconds: float = 60.0
    """SIRA_INSIGHTS_HISTORY_SECONDS: interval between two recorded points of every
    running experiment's allocation and P(best) (GetInsightsHistory)."""

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.redis_url is None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def text(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def integer(name: str, default: int, minimum: int = 0) -> int:
            raw = text(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
            if value < minimum:
                raise ConfigError(f"{name} must be >= {minimum}, got {value}")
            return value

        def number(name: str, default: float) -> float:
            raw = text(name)
            if raw is None:
                return default
            try:
                return float(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {raw!r}") from None

        def flag(name: str) -> bool:
            raw = (text(name) or "0").lower()
            if raw not in ("0", "1", "true", "false"):
                raise ConfigError(f"{name} must be 1 or 0, got {raw[:40]!r}")
            return raw in ("1", "true")

        def seconds(name: str, default: float) -> float:
            value = number(name, default)
            if not 0 < value < 3600:  # NaN fails too
                raise ConfigError(f"{name} must be between 0 and 3600 seconds, got {value}")
            return value

        public_key = text("SIRA_JWT_PUBLIC_KEY")
        key_file = text("SIRA_JWT_PUBLIC_KEY_FILE")
        if public_key is None and key_file is not None:
            try:
                public_key = Path(key_file).read_text()
            except OSError as exc:
                raise ConfigError(
                    f"SIRA_JWT_PUBLIC_KEY_FILE: cannot read {key_file}: {exc}"
                ) from None
        algorithm = (text("SIRA_JWT_ALGORITHM") or "HS256").upper()
        if algorithm not in ("HS256", "RS256", "ES256"):
            raise ConfigError(f"SIRA_JWT_ALGORITHM must be HS256, RS256 or ES256, got {algorithm}")
        if algorithm != "HS256" and public_key is None:
            raise ConfigError(f"SIRA_JWT_ALGORITHM={algorithm} needs SIRA_JWT_PUBLIC_KEY(_FILE)")
        max_event_value = number("SIRA_MAX_EVENT_VALUE", DEFAULT_MAX_EVENT_VALUE)
        if not (0 < max_event_value < float("inf")):
            raise ConfigError(
                f"SIRA_MAX_EVENT_VALUE must be a finite number > 0, got {max_event_value}"
            )
        metrics_port = integer("SIRA_METRICS_PORT", 9464)
        cert, key = text("SIRA_TLS_CERT_FILE"), text("SIRA_TLS_KEY_FILE")
        if (cert is None) != (key is None):
            raise ConfigError("SIRA_TLS_CERT_FILE and SIRA_TLS_KEY_FILE must be set together")
        client_ca = text("SIRA_TLS_CLIENT_CA_FILE")
        if (text("SIRA_DATABASE_URL") is None) != (text("SIRA_REDIS_URL") is None):
            raise ConfigError(
                "set both SIRA_DATABASE_URL and SIRA_REDIS_URL, or neither for the embedded "
                "Postgres and Redis"
            )
        script_transport = text("SIRA_SCRIPT_TRANSPORT") or "channel"
        if script_transport not in ("channel", "pipeline"):
            raise ConfigError(
                f"SIRA_SCRIPT_TRANSPORT must be channel or pipeline, got {script_transport!r}"
            )
        event_loop = text("SIRA_EVENT_LOOP") or "uvloop"
        if event_loop not in EVENT_LOOPS:
            raise ConfigError(f"SIRA_EVENT_LOOP must be uvloop or asyncio, got {event_loop!r}")
        redis_cluster = parse_flag("SIRA_REDIS_CLUSTER", text("SIRA_REDIS_CLUSTER"))
        if redis_cluster and text("SIRA_REDIS_URL") is None:
            raise ConfigError(
                "SIRA_REDIS_CLUSTER=1 needs SIRA_REDIS_URL (any node of the cluster) and "
                "SIRA_DATABASE_URL: the embedded Redis is a single server, not a cluster"
            )
        shards = integer(
            "SIRA_REDIS_SHARDS", CLUSTER_DEFAULT_SHARDS if redis_cluster else 1, minimum=1
        )
        if shards > MAX_SHARDS:
            raise ConfigError(f"SIRA_REDIS_SHARDS must be <= {MAX_SHARDS}, got {shards}")
        wait_replicas = integer("SIRA_REDIS_WAIT_REPLICAS", 0)
        wait_timeout_ms = integer("SIRA_REDIS_WAIT_TIMEOUT_MS", 100, minimum=1)
        return cls(
            script_transport=script_transport,
            event_loop=event_loop,
            insights_history_seconds=seconds("SIRA_INSIGHTS_HISTORY_SECONDS", 60.0),
            database_url=text("SIRA_DATABASE_URL"),
            redis_url=text("SIRA_REDIS_URL"),
            redis_cluster=redis_cluster,
            hot_layout=HotLayout(shards),
            replica_wait=(
                ReplicaWait(wait_replicas, wait_timeout_ms) if wait_replicas > 0 else None
            ),
            grpc_host=text("SIRA_GRPC_HOST") or "127.0.0.1",
            grpc_port=integer("SIRA_GRPC_PORT", 50051),
            metrics_port=metrics_port or None,
            data_dir=Path(text("SIRA_DATA_DIR") or ".sira"),
            jwt=JwtSettings(
                algorithm=algorithm,
                secret=text("SIRA_JWT_SECRET"),
                public_key=public_key,
                audience=text("SIRA_JWT_AUDIENCE"),
                issuer=text("SIRA_JWT_ISSUER"),
                leeway_seconds=number("SIRA_JWT_LEEWAY_SECONDS", 30.0),
            ),
            shutdown_grace_seconds=number("SIRA_SHUTDOWN_GRACE_SECONDS", 10.0),
            workers=integer("SIRA_WORKERS", 1, minimum=1),
            tls_cert_file=Path(cert) if cert else None,
            tls_key_file=Path(key) if key else None,
            tls_client_ca_file=Path(client_ca) if client_ca else None,
            log_level=(text("SIRA_LOG_LEVEL") or "INFO").upper(),
            role=parse_role(text("SIRA_ROLE") or "all"),
            limits=replace(
                LimitSettings.from_env(text, integer, ConfigError),
                max_event_value=max_event_value,
            ),
            listen=ListenSettings(metrics_host=text("SIRA_METRICS_HOST") or "127.0.0.1"),
            http=HttpSettings(
                host=text("SIRA_HTTP_HOST") or "127.0.0.1",
                port=parse_http_port(text("SIRA_HTTP_PORT")),
                cors_origins=parse_origins(text("SIRA_HTTP_CORS_ORIGINS")),
            ),
            timeouts=StoreTimeouts(
                redis_seconds=seconds("SIRA_REDIS_TIMEOUT_SECONDS", 1.0),
                postgres_seconds=seconds("SIRA_POSTGRES_TIMEOUT_SECONDS", 1.0),
                rebuild_wait_seconds=seconds("SIRA_REBUILD_WAIT_SECONDS", 5.0),
                command_seconds=seconds("SIRA_STORE_COMMAND_TIMEOUT_SECONDS", 5.0),
                health_probe_seconds=seconds("SIRA_HEALTH_PROBE_SECONDS", 2.0),
            ),
            postgres=PostgresSettings(
                pool_size=integer("SIRA_PG_POOL_SIZE", 10, minimum=1),
                pgbouncer=flag("SIRA_PG_PGBOUNCER"),
            ),
        )
