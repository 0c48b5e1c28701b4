"""Supervision of the embedded Postgres and Redis: one that dies is started again.

In the embedded default the server process owns its stores (`embedded.py`). A store
that crashes (OOM killer, a stray kill) would otherwise leave the server answering
UNAVAILABLE until someone restarts everything. A thread checks them every
`interval` seconds; a dead one is logged and started again on the same data
(Redis replays its append-only file), and clients reconnect by themselves.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0


class Supervised(Protocol):
    @property
    def name(self) -> str: ...

    def running(self) -> bool: ...

    def revive(self) -> None: ...


class Supervisor:
    def __init__(self, servers: Sequence[Supervised], *, interval: float = CHECK_SECONDS) -> None:
        self._servers = tuple(servers)
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="store-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Before stopping the servers: nothing is restarted after this returns."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for server in self._servers:
                if self._stop.is_set() or server.running():
                    continue
                log.error("embedded %s died; restarting it", server.name)
                try:
                    server.revive()
                except Exception:  # keep watching; the next check tries again
                    log.exception("embedded %s could not be restarted", server.name)
                else:
                    self.restarts += 1
                    log.warning("embedded %s restarted", server.name)
