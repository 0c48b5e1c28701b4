"""Admin isolation, a section of `make bench`: does admin traffic starve Assign?

Seeds experiments, then measures Assign's p99 from one client at a fixed concurrency,
first on a quiet server, then while `ADMIN_LISTS` ListExperiments(page_size=1000)
calls are in flight at all times, each from its own ops_admin principal (so the
per-principal concurrency limit does not simply refuse them: this measures the
separate Postgres pool, the statement timeout and the off-loop conversion). The
result is the ratio loaded p99 / quiet p99, never an absolute time (the machine is
shared and noisy). Issue 7 measured 3.2 s for one Assign under 40 such calls before
the admin pool existed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import jwt
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]

from sira.experiments.v1 import (
    assignment_service_pb2,
    assignment_service_pb2_grpc,
    experiment_pb2,
    lifecycle_service_pb2,
    lifecycle_service_pb2_grpc,
)

SECTION_START = "<!-- bench:admin start -->"
SECTION_END = "<!-- bench:admin end -->"
ADMIN_LISTS = 100
ASSIGN_CONCURRENCY = 8
SEED_EXPERIMENTS = 200


@dataclass(frozen=True)
class AdminIsolation:
    quiet_p99_ms: float
    loaded_p99_ms: float
    quiet_assigns: int
    loaded_assigns: int
    assign_errors: dict[str, int]
    list_statuses: dict[str, int]
    seconds: float

    @property
    def ratio(self) -> float:
        return self.loaded_p99_ms / self.quiet_p99_ms if self.quiet_p99_ms else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def _token(secret: str, role: str, subject: str) -> tuple[tuple[str, str], ...]:
    now = int(time.time())
    claims = {"sub": subject, "roles": [role], "iat": now, "exp": now + 3600}
    return (("authorization", f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"),)


def _retry_delay(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay of a refusal, as a well-behaved client honours it."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for packed in status_pb2.Status.FromString(value).details:
                if packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    packed.Unpack(info)
                    return float(info.retry_delay.ToNanoseconds() / 1e9)
    return 0.1


def _p99_ms(latencies: Sequence[float]) -> float:
    if not latencies:
        return float("nan")
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


async def _seed(address: str, secret: str, prefix: str) -> None:
    metadata = _token(secret, "ops_admin", "bench-admin-seed")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
        for i in range(SEED_EXPERIMENTS):
            experiment = experiment_pb2.Experiment(
                key=f"{prefix}-{i}",
                name=f"Admin bench {i}",
                description="Created by sira_loadtest.bench_admin " + "x" * 500,
                variants=[
                    experiment_pb2.Variant(key="a", name="A", is_control=True),
                    experiment_pb2.Variant(key="b", name="B"),
                ],
            )
            request = lifecycle_service_pb2.CreateExperimentRequest(experiment=experiment)
            while True:
                try:
                    await stub.CreateExperiment(request, metadata=metadata, timeout=30)
                    break
                except grpc.aio.AioRpcError as exc:  # one principal: its rate limit
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    await asyncio.sleep(_retry_delay(exc))


async def _assigns(
    address: str, experiment: str, metadata: tuple[tuple[str, str], ...], seconds: float
) -> tuple[list[float], Counter[str]]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = assignment_service_pb2_grpc.AssignmentServiceStub(channel)

        async def worker(n: int) -> None:
            i = 0
            while time.monotonic() < deadline:
                i += 1
                request = assignment_service_pb2.AssignRequest(
                    experiment=experiment, subject_id=f"admin-bench-{n}-{i % 500}"
                )
                started = time.perf_counter()
                try:
                    await stub.Assign(request, metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker(n) for n in range(ASSIGN_CONCURRENCY)))
    return latencies, errors


async def _lists(address: str, secret: str, stop: asyncio.Event) -> Counter[str]:
    statuses: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)

        async def worker(n: int) -> None:
            metadata = _token(secret, "ops_admin", f"bench-admin-{n}")
            request = lifecycle_service_pb2.ListExperimentsRequest(page_size=1000)
            while not stop.is_set():
                try:
                    await stub.ListExperiments(request, metadata=metadata, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    statuses[exc.code().name] += 1
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(_retry_delay(exc))
                else:
                    statuses["OK"] += 1

        await asyncio.gather(*(worker(n) for n in range(ADMIN_LISTS)))
    return statuses


async def measure_admin_isolation(
    address: str, secret: str, experiment: str, seconds: float
) -> AdminIsolation:
    """Quiet run, then the same run under ADMIN_LISTS concurrent ListExperiments."""
    await _seed(address, secret, f"admin-bench-{uuid.uuid4().hex[:6]}")
    metadata = _token(secret, "pay_module", "bench-admin-pay")
    await _assigns(address, experiment, metadata, min(seconds, 2.0))  # warm-up
    quiet, quiet_errors = await _assigns(address, experiment, metadata, seconds)
    stop = asyncio.Event()
    lists = asyncio.create_task(_lists(address, secret, stop))
    await asyncio.sleep(1.0)  # every List in flight before measuring
    loaded, loaded_errors = await _assigns(address, experiment, metadata, seconds)
    stop.set()
    list_statuses = await lists
    return AdminIsolation(
        quiet_p99_ms=_p99_ms(quiet),
        loaded_p99_ms=_p99_ms(loaded),
        quiet_assigns=len(quiet),
        loaded_assigns=len(loaded),
        assign_errors=dict(quiet_errors + loaded_errors),
        list_statuses=dict(list_statuses),
        seconds=seconds,
    )


def render_markdown(measured: Mapping[str, Any] | None) -> str:
    """The section for docs/benchmarks.md from `AdminIsolation.to_json()` (or None)."""
    lines = [
        "## Admin isolation",
        "",
        f"Assign p99 at {ASSIGN_CONCURRENCY} in flight, quiet and then while "
        f"{ADMIN_LISTS} ListExperiments(page_size=1000) run at once from {ADMIN_LISTS} "
        f"ops_admin principals over {SEED_EXPERIMENTS}+ experiments "
        "(`sira_loadtest.bench_admin`).",
        "",
    ]
    if measured is None:
        return "\n".join([*lines, "Not measured in the last run (see its notes)."])
    result = AdminIsolation(**{k: v for k, v in measured.items() if k != "ratio"})
    lists = ", ".join(f"{k} {v}" for k, v in sorted(result.list_statuses.items())) or "none"
    errors = ", ".join(f"{k} {v}" for k, v in sorted(result.assign_errors.items())) or "none"
    return "\n".join(
        [
            *lines,
            "| Run | Assign calls | p99 |",
            "|---|---|---|",
            f"| quiet | {result.quiet_assigns} | {result.quiet_p99_ms:.1f} ms |",
            f"| with the Lists | {result.loaded_assigns} | {result.loaded_p99_ms:.1f} ms |",
            "",
            f"**Ratio loaded / quiet p99: {result.ratio:.2f}** ({result.seconds:g} s each). "
            f"ListExperiments answers: {lists}. Assign errors: {errors}.",
        ]
    )
