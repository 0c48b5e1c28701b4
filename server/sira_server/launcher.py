"""Process management of `sira-server`: embedded stores, migrations, worker processes.

One process per core is how a Python gRPC server uses a machine: N workers share the
port with SO_REUSEPORT and the kernel spreads connections across them. Workers are
forked before any gRPC object exists (grpc is not fork-safe once started). The parent
owns the embedded Postgres and Redis (started once, migrated once) and forwards
SIGTERM/SIGINT to the workers.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

import uvloop

from sira_server.app import Ports, banner, resolve_jwt_secret, resolve_tracking_key, serve
from sira_server.auth import read_dev_secret
from sira_server.config import ConfigError, Settings
from sira_server.embedded import EmbeddedServers
from sira_server.flusher_process import READY_LINE as FLUSHER_READY_LINE
from sira_server.flusher_process import run_flusher
from sira_server.postgres_budget import connection_budget
from sira_server.store.migrate import apply_migrations
from sira_server.store.roles import as_role
from sira_server.supervisor import Supervisor

log = logging.getLogger("sira_server")

WORKER_READY_TIMEOUT_SECONDS = 300.0


def run_loop(settings: Settings, main: Coroutine[Any, Any, None]) -> None:
    """`asyncio.run(main)` on the event loop `settings.event_loop` names. uvloop (libuv)
    costs less CPU per gRPC call than the standard loop (docs/benchmarks.md); grpc.aio,
    asyncpg and redis.asyncio run on both."""
    factory = uvloop.new_event_loop if settings.event_loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def run(settings: Settings) -> None:
    """Run the server (single process or workers), or the flusher alone
    (`settings.role`), until SIGTERM/SIGINT."""
    log.info(
        connection_budget(
            settings.role,
            settings.workers,
            settings.postgres.pool_size,
            settings.limits.admin_pool_size,
        ).describe()
    )
    if settings.role == "flusher":
        if settings.embedded:
            raise ConfigError(
                "--role flusher needs SIRA_DATABASE_URL and SIRA_REDIS_URL (the embedded "
                "default runs the flusher inside the server: --role all)"
            )
        run_loop(settings, run_flusher(settings, lambda: print(FLUSHER_READY_LINE, flush=True)))
        return
    embedded: EmbeddedServers | None = None
    supervisor: Supervisor | None = None
    try:
        if settings.embedded:
            embedded = EmbeddedServers(settings.data_dir)
            database_url, redis_url = embedded.start()
            settings = replace(settings, database_url=database_url, redis_url=redis_url)
            applied = asyncio.run(apply_migrations(database_url))
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            # Migrated as the owner; served as the least-privileged application role.
            settings = replace(settings, database_url=as_role(database_url))
        settings = resolve_jwt_secret(settings, embedded=embedded is not None)
        settings = resolve_tracking_key(settings, embedded=embedded is not None)
        if embedded is not None:
            settings = offer_dev_sign_in(settings)
        if embedded is not None:
            # Started after the workers are forked: a thread does not survive a fork.
            supervisor = Supervisor((embedded.postgres, embedded.redis))
        if settings.workers == 1:
            if supervisor is not None:
                supervisor.start()
            run_loop(settings, serve(settings, lambda ports: announce(settings, ports, embedded)))
        else:
            run_workers(settings, embedded, supervisor)
    finally:
        if supervisor is not None:
            supervisor.stop()  # first: a store stopped on purpose is not restarted
        if embedded is not None:
            embedded.stop()


def offer_dev_sign_in(settings: Settings) -> Settings:
    """The dashboard's dev sign-in, when the server signs with its data dir's development
    secret (not with a SIRA_JWT_SECRET of the operator's)."""
    jwt = settings.jwt
    if jwt.algorithm != "HS256" or jwt.secret != read_dev_secret(settings.data_dir):
        return settings
    return replace(settings, http=replace(settings.http, dev_sign_in=True))


def announce(settings: Settings, ports: Ports, embedded: EmbeddedServers | None) -> None:
    # One write: a reader of the log sees the whole banner or none of it.
    print("\n".join(banner(settings, ports, embedded=embedded is not None)), flush=True)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _worker(settings: Settings, ready: Connection) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    run_loop(settings, serve(settings, ready.send))


def run_workers(
    settings: Settings, embedded: EmbeddedServers | None, supervisor: Supervisor | None = None
) -> None:
    port = settings.grpc_port or free_port(settings.grpc_host)
    http = settings.http
    if http.port == 0:  # every worker binds the same HTTP port too (SO_REUSEPORT)
        settings = replace(settings, http=replace(http, port=free_port(http.host)))
    context = multiprocessing.get_context("fork")
    workers = []
    pipes = []
    for index in range(settings.workers):
        receive, send = context.Pipe(duplex=False)
        worker_settings = replace(
            settings,
            grpc_port=port,
            # Each worker exports its own metrics: base port + worker index.
            metrics_port=settings.metrics_port + index if settings.metrics_port else None,
        )
        process = context.Process(
            target=_worker, args=(worker_settings, send), name=f"sira-worker-{index}"
        )
        process.start()
        workers.append(process)
        pipes.append(receive)
    if supervisor is not None:
        supervisor.start()

    def forward(signum: int, _frame: object) -> None:
        for process in workers:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        ports = [
            wait_ready(receive, process) for receive, process in zip(pipes, workers, strict=True)
        ]
        announce(settings, ports[0], embedded)
        print(f"  workers:        {settings.workers} processes sharing the port", flush=True)
        for process in workers:
            process.join()
    finally:
        for process in workers:
            if process.is_alive():
                process.terminate()
                process.join(10)


def wait_ready(receive: Connection, process: multiprocessing.process.BaseProcess) -> Ports:
    """Until the worker reports its ports; a worker that dies first ends the launch."""
    deadline = time.monotonic() + WORKER_READY_TIMEOUT_SECONDS
    while not receive.poll(0.2):
        if not process.is_alive():
            raise WorkerFailed(f"{process.name} exited during start-up (code {process.exitcode})")
        if time.monotonic() > deadline:
            raise WorkerFailed(f"{process.name} not ready in {WORKER_READY_TIMEOUT_SECONDS}s")
    ports: Ports = receive.recv()
    return ports


class WorkerFailed(RuntimeError):
    """A worker process could not start; its own log says why."""
