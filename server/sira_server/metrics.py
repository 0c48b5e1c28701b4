"""Prometheus metrics, with the seed's names where the seed names them.

Defined on a registry object (not the global default) so tests and multiple
servers in one process don't collide; `start_exporter` serves it over HTTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

if TYPE_CHECKING:
    from sira_server.store.flusher import FlushStats

# Decision latencies are sub-millisecond; buckets from 50 µs to the seed's 100 ms SLO.
DECISION_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.experiments = Gauge(
            "experiments_total", "Experiments by status.", ["status"], registry=r
        )
        self.assignments = Counter(
            "experiment_assignments",
            "New sticky assignments made (first decision of a subject).",
            ["experiment_id"],
            registry=r,
        )
        self.events = Counter(
            "experiment_metrics",
            "Tracked events accepted (duplicates excluded).",
            ["experiment_id", "event_type"],
            registry=r,
        )
        self.decision_latency = Histogram(
            "sira_decisions_latency_seconds",
            "Server-side time to answer Assign, from request to response.",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.rpcs = Counter(
            "sira_rpc", "RPCs answered, by method and status code.", ["method", "code"], registry=r
        )
        self.write_behind_pending = Gauge(
            "sira_write_behind_pending_entries",
            "Write-behind stream entries not yet committed to Postgres.",
            ["experiment_id"],
            registry=r,
        )
        self.flush_latency = Histogram(
            "sira_write_behind_flush_seconds",
            "Time to commit one write-behind batch to Postgres.",
            registry=r,
        )
        self._rpc_children: dict[tuple[str, str], Counter] = {}
        # Label children per experiment (and type): `labels()` costs more than the
        # increment itself, and these run once per event of every TrackBatch.
        self._assignment_children: dict[str, Counter] = {}
        self._event_children: dict[tuple[str, str], Counter] = {}
        self.flushed = Counter(
            "sira_write_behind_flushed_entries",
            "Write-behind entries committed to Postgres.",
            ["kind"],
            registry=r,
        )
        self.limited = Counter(
            "sira_limited",
            "Calls or events refused by a limit (rate, concurrency, server_in_flight, "
            "subject_events) or for lack of tracking proof (tracking_proof).",
            ["limit"],
            registry=r,
        )

        self.dead_lettered = Counter(
            "sira_write_behind_dead_lettered_entries",
            "Write-behind records Postgres rejected, parked in a dead-letter stream.",
            registry=r,
        )
        self.dead_letters = Gauge(
            "sira_write_behind_dead_letters",
            "Records parked in an experiment's dead-letter stream (`sira-server deadletter list`).",
            ["experiment_id"],
            registry=r,
        )
        self.autopilot_rounds = Counter(
            "sira_autopilot_rounds",
            "Fail-fast autopilot rounds of this process, by outcome: acted, idle, or locked"
            " (another replica held the round's advisory lock).",
            ["outcome"],
            registry=r,
        )

    def autopilot_round(self, outcome: str) -> None:
        """One autopilot round ended (FailFastAutopilot's on_round callback)."""
        self.autopilot_rounds.labels(outcome).inc()

    def record_flush(self, stats: FlushStats) -> None:
        """One write-behind pass (the flusher's on_flush callback)."""
        if stats.acked:
            self.flush_latency.observe(stats.latency_seconds)
        self.flushed.labels("assignment").inc(stats.assignments_inserted)
        self.flushed.labels("metric").inc(stats.metrics_inserted)
        self.dead_lettered.inc(stats.dead_lettered)

    def assignment_created(self, experiment_id: str) -> None:
        """A new sticky assignment was stored (HotState's `applied` callback)."""
        child = self._assignment_children.get(experiment_id)
        if child is None:
            child = self._assignment_children[experiment_id] = self.assignments.labels(
                experiment_id
            )
        child.inc()

    def event_accepted(self, experiment_id: str, event_type: str) -> None:
        """A tracked event was stored, not a duplicate (HotState's `applied` callback)."""
        child = self._event_children.get((experiment_id, event_type))
        if child is None:
            child = self._event_children[(experiment_id, event_type)] = self.events.labels(
                experiment_id, event_type
            )
        child.inc()

    def count_rpc(self, method: str, code: str) -> None:
        """One finished RPC; label children are cached (this runs on every call)."""
        child = self._rpc_children.get((method, code))
        if child is None:
            child = self._rpc_children[(method, code)] = self.rpcs.labels(method, code)
        child.inc()


def start_exporter(metrics: Metrics, port: int, host: str = "127.0.0.1") -> None:
    """Serve /metrics on a daemon thread (without the `_created` series: noise here)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=metrics.registry)
