"""Composition root: build the gRPC server from its dependencies and run it.

Start-up order: stores reachable (embedded ones started first when no URL is
set) -> migrations (embedded only) -> servicers -> bind -> health SERVING.
Shutdown order (SIGTERM/SIGINT): health NOT_SERVING, `server.stop(grace)`,
stop background tasks, close pools, stop embedded servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import asyncpg
import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sira.experiments.v1 import (
    assignment_service_pb2,
    assignment_service_pb2_grpc,
    insights_service_pb2,
    insights_service_pb2_grpc,
    lifecycle_service_pb2,
    lifecycle_service_pb2_grpc,
    tracking_service_pb2,
    tracking_service_pb2_grpc,
)
from sira_server.api.assignment import AssignmentServicer, new_assigner
from sira_server.api.call_limits import CallLimits
from sira_server.api.guards import GuardedRegistrar
from sira_server.api.health import HealthServicer
from sira_server.api.insights import InsightsServicer
from sira_server.api.lifecycle import LifecycleServicer
from sira_server.api.reflection import enable_reflection
from sira_server.api.tracking import TrackingServicer
from sira_server.auth import TokenVerifier, ensure_dev_secret
from sira_server.config import ConfigError, Settings, StoreTimeouts
from sira_server.domain import bayes
from sira_server.engine.autopilot import FailFastAutopilot
from sira_server.engine.catalog import ExperimentCatalog
from sira_server.engine.hot_prep import HotStatePreparer
from sira_server.engine.insights_book import InsightsBook
from sira_server.engine.posteriors import PosteriorBook
from sira_server.limit_settings import LimitSettings
from sira_server.metrics import Metrics, start_exporter
from sira_server.postgres_budget import PostgresSettings
from sira_server.store.deadletter import count_dead_letters
from sira_server.store.experiments import ExperimentRepository
from sira_server.store.faults import bounded
from sira_server.store.flusher import WriteBehindFlusher, run_restarting
from sira_server.store.hot_state import HotState, claim_layout
from sira_server.store.migrate import require_migrated
from sira_server.store.postgres import create_pool
from sira_server.store.redis_conn import RedisClient, create_redis
from sira_server.store.script_transport import default_transport
from sira_server.tracking_token import TrackingTokens, derive_key, ensure_key_file
from sira_server.web.http_server import HttpServer, open_http_server

log = logging.getLogger("sira_server")

SERVICES: tuple[ServiceDescriptor, ...] = (
    lifecycle_service_pb2.DESCRIPTOR.services_by_name["LifecycleService"],
    assignment_service_pb2.DESCRIPTOR.services_by_name["AssignmentService"],
    tracking_service_pb2.DESCRIPTOR.services_by_name["TrackingService"],
    insights_service_pb2.DESCRIPTOR.services_by_name["InsightsService"],
)
"""The API's four services (served over gRPC, and over Connect by `sira_server.web`)."""
LIFECYCLE, ASSIGNMENT, TRACKING, INSIGHTS = (service.full_name for service in SERVICES)
SERVICE_NAMES: tuple[str, ...] = (LIFECYCLE, ASSIGNMENT, TRACKING, INSIGHTS)
# Health service name that stays SERVING while the process runs, even when a
# store is down: Kubernetes liveness must not restart pods during a Postgres
# outage (decisions go on from Redis), readiness uses the overall status "".
LIVENESS_SERVICE = "liveness"
# Health service name that is NOT_SERVING while write-behind records are parked as dead
# letters (Postgres rejected them): the data is safe in Redis, an operator must act.
WRITE_BEHIND_SERVICE = "write-behind"
GAUGE_SECONDS = 5.0
SHUTDOWN_SLACK_SECONDS = 10.0
CLOSE_SECONDS = 5.0


async def _answers(store: str, probe: Awaitable[object], seconds: float) -> bool:
    try:
        # `bounded`: a stalled store's clean-up (a query's cancellation) cannot hold
        # the probe, so health follows within `seconds`.
        await bounded(probe, seconds, store)
    except Exception as exc:  # any failure means "not serving"; the reason is logged
        log.warning("health probe: %s does not answer: %s", store, exc)
        return False
    return True


@dataclass
class Stores:
    pool: asyncpg.Pool
    redis: RedisClient
    admin_pool: asyncpg.Pool | None = None
    """Lifecycle and reports, with a statement timeout: admin traffic cannot take the
    decision path's connections (None: share `pool`)."""
    probe_seconds: float = StoreTimeouts.health_probe_seconds

    async def postgres_ok(self) -> bool:
        return await _answers("Postgres", self.pool.fetchval("SELECT 1"), self.probe_seconds)

    async def redis_ok(self) -> bool:
        return await _answers("Redis", self.redis.ping(), self.probe_seconds)

    async def ping(self) -> bool:
        """True when both Postgres and Redis answer right now."""
        postgres, redis = await asyncio.gather(self.postgres_ok(), self.redis_ok())
        return postgres and redis

    async def close(self) -> None:
        """Close both pools; a store that does not answer cannot hold the exit."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.redis.aclose(), timeout=CLOSE_SECONDS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.pool.close(), timeout=CLOSE_SECONDS)
        self.pool.terminate()
        if self.admin_pool is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.admin_pool.close(), timeout=CLOSE_SECONDS)
            self.admin_pool.terminate()


class SiraServer:
    """The gRPC server with its servicers, background tasks, health and reflection."""

    def __init__(
        self,
        settings: Settings,
        stores: Stores,
        verifier: TokenVerifier,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.stores = stores
        self.metrics = metrics or Metrics()
        self.health = HealthServicer()
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
                *settings.limits.grpc_options(),
            ],
        )
        limited = self.metrics.limited
        self.call_limits = CallLimits(settings.limits, lambda limit: limited.labels(limit).inc())
        guarded = GuardedRegistrar(
            self.server, verifier, self.metrics.count_rpc, limits=self.call_limits
        )
        tokens = TrackingTokens(
            tracking_key(settings), settings.limits.tracking_token_max_age_seconds
        )
        timeouts = settings.timeouts
        self.hot = HotState(
            stores.redis,
            stores.pool,
            transport=default_transport(
                stores.redis, settings.script_transport, timeouts, settings.replica_wait
            ),
            applied=self.metrics,
            timeouts=timeouts,
            layout=settings.hot_layout,
        )
        self.repository = ExperimentRepository(
            stores.pool, on_change=self._changed, acquire_timeout=timeouts.command_seconds
        )
        self.catalog = ExperimentCatalog(
            self.repository, stores.pool, stores.redis, lookup_seconds=timeouts.postgres_seconds
        )
        self.catalog.add_listener(HotStatePreparer(self.hot, self.repository))
        self.posteriors = PosteriorBook(self.catalog, self.hot)
        self.insights = InsightsBook(self.hot)
        self.autopilot = FailFastAutopilot(
            self.catalog,
            self.insights,
            self.repository,
            stores.pool,
            history_seconds=settings.insights_history_seconds,
            on_round=self.metrics.autopilot_round,
        )
        self.flusher = WriteBehindFlusher(
            stores.redis,
            stores.pool,
            f"{socket.gethostname()}-{os.getpid()}",
            on_flush=self.metrics.record_flush,
            layout=settings.hot_layout,
        )
        # Lifecycle and reports on their own pool (same change notifications).
        admin = ExperimentRepository(
            stores.admin_pool or stores.pool,
            on_change=self._changed,
            acquire_timeout=timeouts.command_seconds,
        )
        lifecycle_service_pb2_grpc.add_LifecycleServiceServicer_to_server(
            LifecycleServicer(admin), guarded
        )
        assignment_service_pb2_grpc.add_AssignmentServiceServicer_to_server(
            AssignmentServicer(
                self.catalog,
                new_assigner(self.catalog, self.posteriors, self.hot, stores.pool),
                self.metrics,
                tokens=tokens,
            ),
            guarded,
        )
        tracking_service_pb2_grpc.add_TrackingServiceServicer_to_server(
            TrackingServicer(
                self.catalog,
                self.hot,
                self.metrics,
                tokens,
                subject_events_per_hour=settings.limits.subject_events_per_hour,
                max_event_value=settings.limits.max_event_value,
            ),
            guarded,
        )
        insights_service_pb2_grpc.add_InsightsServiceServicer_to_server(
            InsightsServicer(
                self.catalog,
                admin,
                self.hot,
                self.insights,
                stores.admin_pool or stores.pool,
                history_seconds=settings.insights_history_seconds,
            ),
            guarded,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection(self.server, (*SERVICE_NAMES, health.SERVICE_NAME))
        self.port = self._bind()
        self._probe_task: asyncio.Task[None] | None = None
        self._flusher_task: asyncio.Task[None] | None = None
        self._gauges_task: asyncio.Task[None] | None = None
        self._serving: dict[str, bool] = {}
        self._dead_letters = 0

    async def _changed(self, experiment_id: str) -> None:
        """After a lifecycle commit: refresh every process's catalog. Bounded: a store
        that stalls now cannot hold the committed call (the version check catches up)."""
        async with asyncio.timeout(self.settings.timeouts.command_seconds):
            await self.catalog.changed(experiment_id)

    def _bind(self) -> int:
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        s = self.settings
        if s.tls_cert_file is not None and s.tls_key_file is not None:
            credentials = grpc.ssl_server_credentials(
                [(s.tls_key_file.read_bytes(), s.tls_cert_file.read_bytes())],
                root_certificates=(
                    s.tls_client_ca_file.read_bytes() if s.tls_client_ca_file else None
                ),
                require_client_auth=s.tls_client_ca_file is not None,
            )
            port = self.server.add_secure_port(address, credentials)
        else:
            port = self.server.add_insecure_port(address)
        port = int(port)
        if port == 0:
            raise ConfigError(f"cannot bind gRPC port {address}: already in use?")
        return port

    async def _set_serving(self, serving: bool) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, _status(serving))

    async def _probe_stores(self) -> None:
        """Health follows the stores, per service: lifecycle needs Postgres; decisions,
        tracking and insights need Redis (Postgres may be down: the write-behind
        catches up). The overall status, which load balancers read, follows Redis."""
        while True:
            await asyncio.sleep(self.settings.timeouts.health_probe_seconds)
            postgres, redis = await asyncio.gather(
                self.stores.postgres_ok(), self.stores.redis_ok()
            )
            wanted = {
                "": redis,
                LIFECYCLE: postgres,
                ASSIGNMENT: redis,
                TRACKING: redis,
                INSIGHTS: redis,
            }
            for name, serving in wanted.items():
                if self._serving.get(name) != serving:
                    log.warning("health %s: %s", name or "(overall)", _status_name(serving))
                    await self.health.set(name, _status(serving))
                    self._serving[name] = serving

    async def start(self) -> None:
        await self._set_serving(False)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(WRITE_BEHIND_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        if not await self.stores.ping():
            raise ConfigError("Postgres or Redis did not answer at start-up; see the log")
        # Compile (or load from cache) every numba kernel before the first request.
        await asyncio.to_thread(bayes.warm_up)
        await self.catalog.start()
        await self.posteriors.refresh()
        await self.posteriors.start()
        await self.insights.start()
        await self.autopilot.start()
        if self.settings.role == "all":  # `serve`: `sira-server --role flusher` drains
            self._flusher_task = asyncio.create_task(
                run_restarting(self.flusher), name="write-behind"
            )
        self._gauges_task = asyncio.create_task(self._update_gauges(), name="gauges")
        await self._set_serving(True)
        self._serving = dict.fromkeys(("", *SERVICE_NAMES), True)
        self._probe_task = asyncio.create_task(self._probe_stores(), name="health-probe")

    async def stop(self) -> None:
        """Health NOT_SERVING, let in-flight calls finish, then flush what they wrote."""
        await self.health.enter_graceful_shutdown()
        await _cancel(self._probe_task)
        await _cancel(self._gauges_task)
        log.info(
            "shutdown: draining in-flight calls (grace %ss)", self.settings.shutdown_grace_seconds
        )
        await self.server.stop(self.settings.shutdown_grace_seconds)
        log.info("shutdown: stopping background tasks")
        await self.autopilot.stop()
        await self.insights.stop()
        await self.posteriors.stop()
        await self.catalog.stop()
        if self._flusher_task is not None:
            self.flusher.stop()
            await self._flusher_task
            log.info("shutdown: flushing the write-behind streams")
            await self.flusher.drain(timeout=self.settings.shutdown_grace_seconds)
        await self.hot.close()
        log.info("shutdown: done")

    async def _update_gauges(self) -> None:
        """Gauges that are read from the stores rather than counted on the way."""
        while True:
            try:
                for status, count in self.catalog.status_counts.items():
                    self.metrics.experiments.labels(status).set(count)
                for experiment_id, pending in (await self.flusher.backlog()).items():
                    self.metrics.write_behind_pending.labels(experiment_id).set(pending)
                await self._report_dead_letters()
            except Exception as exc:  # a gauge is never worth a crash
                log.debug("gauge update failed: %s", exc)
            await asyncio.sleep(GAUGE_SECONDS)

    async def _report_dead_letters(self) -> None:
        """Parked write-behind records: a gauge, the health service, one warning per change."""
        counts = await count_dead_letters(self.stores.redis)
        for experiment_id, parked in counts.items():
            self.metrics.dead_letters.labels(experiment_id).set(parked)
        total = sum(counts.values())
        if total != self._dead_letters:
            if total:
                log.warning(
                    "%d write-behind record(s) parked as dead letters (Postgres rejected"
                    " them); `sira-server deadletter list` shows why, `replay`"
                    " writes them once fixed",
                    total,
                )
            await self.health.set(WRITE_BEHIND_SERVICE, _status(total == 0))
            self._dead_letters = total


def describe_tasks() -> str:
    """Every other pending task of the loop, with where it waits (for a stuck shutdown)."""
    lines = []
    for task in asyncio.all_tasks():
        if task is asyncio.current_task():
            continue
        frames = task.get_stack(limit=4)
        where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
        lines.append(f"  {task.get_name()}: {where or '?'}")
    return "\n".join(lines) or "  (none)"


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    if serving:
        return health_pb2.HealthCheckResponse.SERVING
    return health_pb2.HealthCheckResponse.NOT_SERVING


def _status_name(serving: bool) -> str:
    return "SERVING" if serving else "NOT_SERVING"


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def open_stores(
    database_url: str,
    redis_url: str,
    limits: LimitSettings | None = None,
    timeouts: StoreTimeouts | None = None,
    postgres: PostgresSettings | None = None,
    *,
    admin_pool: bool = True,
    redis_cluster: bool = False,
) -> Stores:
    """The pools of one process (`postgres_budget` counts them); without `admin_pool`
    (the flusher role) lifecycle and reports would share the decision path's pool."""
    limits = limits or LimitSettings()
    timeouts = timeouts or StoreTimeouts()
    postgres = postgres or PostgresSettings()
    options = postgres.pool_options()
    admin: asyncpg.Pool | None = None
    try:
        pool = await create_pool(
            database_url,
            max_size=postgres.pool_size,
            command_timeout=timeouts.command_seconds,
            **options,
        )
        if admin_pool and postgres.pgbouncer:
            # PgBouncer refuses session settings: the statement timeout is enforced by
            # the client, which cancels the query (PgBouncer forwards the cancel).
            admin = await create_pool(
                database_url,
                max_size=limits.admin_pool_size,
                command_timeout=min(
                    timeouts.command_seconds, limits.admin_statement_timeout_ms / 1000
                ),
                **options,
            )
        elif admin_pool:
            admin = await create_pool(
                database_url,
                max_size=limits.admin_pool_size,
                server_settings={"statement_timeout": str(limits.admin_statement_timeout_ms)},
                command_timeout=timeouts.command_seconds,
            )
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"cannot connect to Postgres (SIRA_DATABASE_URL): {exc}") from exc
    redis = create_redis(redis_url, cluster=redis_cluster, socket_timeout=timeouts.command_seconds)
    return Stores(
        pool=pool,
        redis=redis,
        admin_pool=admin,
        probe_seconds=timeouts.health_probe_seconds,
    )


async def check_stores_fit(stores: Stores, settings: Settings) -> None:
    """Refuse to start on stores this release cannot use: a database missing some of its
    migrations, or hot state written with another shard count (`claim_layout`)."""
    async with stores.pool.acquire(timeout=settings.timeouts.command_seconds) as conn:
        await require_migrated(conn)
    await claim_layout(stores.redis, settings.hot_layout)


def resolve_jwt_secret(settings: Settings, *, embedded: bool) -> Settings:
    """HS256 needs a secret: the configured one, or (embedded default) the dev secret."""
    jwt = settings.jwt
    if jwt.algorithm != "HS256" or jwt.secret:
        return settings
    if not embedded:
        raise ConfigError("SIRA_JWT_SECRET is required with HS256 when using external stores")
    secret = ensure_dev_secret(settings.data_dir)
    return replace(settings, jwt=replace(jwt, secret=secret))


def resolve_tracking_key(settings: Settings, *, embedded: bool) -> Settings:
    """The tracking token key: configured, else (embedded default) generated once in the
    data dir. With external stores and no key, `tracking_key` derives it from the HS256
    secret that replicas share."""
    if settings.limits.tracking_key or not embedded:
        return settings
    key = ensure_key_file(settings.data_dir)
    return replace(settings, limits=replace(settings.limits, tracking_key=key))


def tracking_key(settings: Settings) -> bytes:
    if settings.limits.tracking_key:
        return settings.limits.tracking_key.encode()
    if settings.jwt.algorithm == "HS256" and settings.jwt.secret:
        return derive_key(settings.jwt.secret)
    raise ConfigError(
        "SIRA_TRACKING_TOKEN_KEY is required when the JWT algorithm has no shared secret"
    )


class Ports(NamedTuple):
    """Where one server process listens, once it serves (port 0 resolved)."""

    grpc: int
    http: int | None = None
    """The dashboard's port; None when SIRA_HTTP_PORT=off."""


def _reachable(host: str) -> str:
    """A listen address as a local client would name it (0.0.0.0 -> 127.0.0.1)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host


def banner(settings: Settings, ports: Ports, *, embedded: bool) -> Sequence[str]:
    lines = [f"SIRA listening on {_reachable(settings.grpc_host)}:{ports.grpc}"]
    if ports.http is not None:
        host = _reachable(settings.http.host)
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        scheme = "https" if settings.tls_cert_file is not None else "http"
        lines.append(f"  dashboard:      {scheme}://{host}:{ports.http}/")
    if embedded:
        lines.append(f"  data directory: {Path(settings.data_dir).resolve()}")
        lines.append(
            "  dev token:      sira-server token --role ops_admin --subject alice"
            f" --data-dir {settings.data_dir}"
        )
    if settings.metrics_port:
        metrics_host = settings.listen.metrics_host
        if metrics_host in ("0.0.0.0", "::", "[::]"):
            metrics_host = "127.0.0.1"
        lines.append(f"  metrics:        http://{metrics_host}:{settings.metrics_port}/metrics")
    return lines


async def serve(settings: Settings, on_ready: Callable[[Ports], None]) -> None:
    """Run one server process on resolved settings (store URLs and JWT key set) until
    SIGTERM or SIGINT; `on_ready(ports)` once it reports SERVING (and serves HTTP)."""
    assert settings.database_url is not None
    assert settings.redis_url is not None
    # Handlers first: a SIGTERM during start-up still shuts down cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stores = await open_stores(
        settings.database_url,
        settings.redis_url,
        settings.limits,
        settings.timeouts,
        settings.postgres,
        redis_cluster=settings.redis_cluster,
    )
    http: HttpServer | None = None
    try:
        # Before any gRPC object exists: a refusal is one line, not a half-started server.
        await check_stores_fit(stores, settings)
        metrics = Metrics()
        if settings.metrics_port:
            start_exporter(metrics, settings.metrics_port, settings.listen.metrics_host)
        sira = SiraServer(settings, stores, TokenVerifier(settings.jwt), metrics)
        # Before the gRPC server starts: it adds the loopback port browser calls go through.
        http = open_http_server(settings, sira.server, SERVICES)
        if stop.is_set():
            return
        await sira.start()
        if http is not None:
            await http.start()
        on_ready(Ports(sira.port, http.port if http is not None else None))
        await stop.wait()
        log.info("shutting down")
        try:
            async with asyncio.timeout(
                settings.shutdown_grace_seconds * 2 + SHUTDOWN_SLACK_SECONDS
            ):
                if http is not None:  # browsers' in-flight calls still reach gRPC
                    await http.stop()
                    http = None
                await sira.stop()
        except TimeoutError:  # never hang a rolling update; say what was stuck
            log.error("shutdown timed out; still pending:\n%s", describe_tasks())
    finally:
        if http is not None:
            await http.stop()
        await stores.close()
        await cancel_leftovers()


async def cancel_leftovers() -> None:
    """Cancel what is still running (shielded rebuilds, listeners) with a deadline, so
    asyncio.run's own clean-up has nothing left that could keep the process alive."""
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in leftovers:
        task.cancel()
    if leftovers:
        _, pending = await asyncio.wait(leftovers, timeout=CLOSE_SECONDS)
        if pending:
            log.error("tasks ignoring cancellation at exit:\n%s", describe_tasks())
