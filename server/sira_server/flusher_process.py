"""`sira-server --role flusher`: a process that only drains the write-behind streams.

Serving processes started with `--role serve` append to the experiments' streams and
never write Postgres themselves, so their CPU goes to decisions; one or more flusher
processes join the same consumer group (`store/flusher.py`) and copy the records into
Postgres. Several flushers share the work: each stream entry is delivered to one
consumer, a crashed consumer's entries are reclaimed, and the tables are idempotent.

It runs until SIGTERM/SIGINT, then drains what is left (within the shutdown grace)
and exits. Metrics (`sira_write_behind_*`) are exported like the server's. It needs
external stores: the embedded default runs everything in one process (`--role all`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable

from sira_server.app import check_stores_fit, open_stores
from sira_server.config import Settings
from sira_server.metrics import Metrics, start_exporter
from sira_server.store.flusher import WriteBehindFlusher, run_restarting

log = logging.getLogger("sira_server")

READY_LINE = "SIRA write-behind flusher running"
"""Printed once the flusher has joined the consumer group (scripts and tests wait on it)."""


async def run_flusher(settings: Settings, on_ready: Callable[[], None] | None = None) -> None:
    """Drain the write-behind streams into Postgres until SIGTERM or SIGINT."""
    # `launcher.run` refuses the flusher role without external stores.
    assert settings.database_url is not None
    assert settings.redis_url is not None
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
        admin_pool=False,  # no lifecycle calls here
        redis_cluster=settings.redis_cluster,
    )
    try:
        await check_stores_fit(stores, settings)
        metrics = Metrics()
        if settings.metrics_port:
            start_exporter(metrics, settings.metrics_port, settings.listen.metrics_host)
        flusher = WriteBehindFlusher(
            stores.redis,
            stores.pool,
            f"{socket.gethostname()}-{os.getpid()}-flusher",
            on_flush=metrics.record_flush,
            layout=settings.hot_layout,
        )
        task = asyncio.create_task(run_restarting(flusher), name="write-behind")
        log.info("write-behind flusher running (no gRPC)")
        if on_ready is not None:
            on_ready()
        await stop.wait()
        log.info("shutdown: stopping the flusher")
        flusher.stop()
        await task
        log.info("shutdown: flushing the write-behind streams")
        await flusher.drain(timeout=settings.shutdown_grace_seconds)
        log.info("shutdown: done")
    finally:
        await stores.close()
