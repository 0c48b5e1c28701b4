"""Run a load: `run_load(config)` -> ghz report.

Each worker process runs one asyncio loop with `concurrency` slots; a slot
sends one call at a time, as a generic unary call on pre-serialised bytes (no
serializer, no response parsing), so the client spends little CPU per call.
Workers share the load evenly (calls, slots, rate, connections) and start
together behind a barrier; their raw results are merged before the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import grpc

from sira.experiments.v1 import assignment_service_pb2
from sira_loadtest.config import LoadConfig
from sira_loadtest.report import Report, WorkerResult, build_report, merge_results
from sira_loadtest.scenarios import ASSIGN_METHOD, build_source
from sira_loadtest.template import IdFactory, RenderContext, returning_subject_id

CONNECT_TIMEOUT = 10.0
SETUP_CONCURRENCY = 32
BARRIER_TIMEOUT = 120.0

# Go's names for status codes, as ghz prints them.
_GO_STATUS = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}


def status_name(code: grpc.StatusCode) -> str:
    return _GO_STATUS.get(code, str(code.name).title().replace("_", ""))


def error_text(error: grpc.aio.AioRpcError) -> tuple[str, str]:
    """(status name, ghz's error string) of a failed call."""
    status = status_name(error.code())
    return status, f"rpc error: code = {status} desc = {error.details()}"


def share(total: int, parts: int, index: int) -> int:
    """Part `index` of `total` split as evenly as possible into `parts`."""
    return total // parts + (1 if index < total % parts else 0)


def open_channel(config: LoadConfig, index: int = 0) -> grpc.aio.Channel:
    # A local subchannel pool gives each channel its own TCP connection;
    # otherwise identical channels share one.
    options = [("grpc.use_local_subchannel_pool", 1), ("sira_loadtest.channel", index)]
    if config.insecure:
        return grpc.aio.insecure_channel(config.target, options=options)
    return grpc.aio.secure_channel(config.target, grpc.ssl_channel_credentials(), options=options)


class Pacer:
    """Spaces sends `1/rate` apart; never bursts to catch up after a stall."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next_at = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        self.next_at = max(self.next_at, now)
        at, self.next_at = self.next_at, self.next_at + self.interval
        if at > now:
            await asyncio.sleep(at - now)


@dataclass
class _Budget:
    """Calls left to send in one worker (count mode) or its deadline (duration mode)."""

    remaining: int
    deadline: float | None

    def take(self) -> bool:
        if self.deadline is not None:
            return time.monotonic() < self.deadline
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


async def run_worker(
    config: LoadConfig,
    process: int = 0,
    processes: int = 1,
    ready: Callable[[], None] | None = None,
) -> WorkerResult:
    """One worker's share of the load, in the running event loop."""
    concurrency = max(1, share(config.concurrency, processes, process))
    total = share(config.total, processes, process)
    n_channels = max(1, share(config.connections, processes, process))
    channels = [open_channel(config, i) for i in range(n_channels)]
    result = WorkerResult()
    try:
        source = build_source(config)
        calls = [
            {
                m: ch.unary_unary(m, request_serializer=None, response_deserializer=None)
                for m in source.methods
            }
            for ch in channels
        ]
        for ch in channels:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ch.channel_ready(), CONNECT_TIMEOUT)
        if ready is not None:
            await asyncio.to_thread(ready)
        pacer = Pacer(config.rps / processes) if config.rps > 0 else None
        ids = IdFactory(config.subject_prefix, secrets.token_hex(4), process)
        result.start_ns = time.monotonic_ns()
        deadline = None if config.duration is None else time.monotonic() + config.duration
        budget = _Budget(total, deadline)
        numbers = iter(range(process, 2**62, processes))
        metadata = tuple(config.metadata)
        timeout = config.timeout

        async def slot(index: int) -> None:
            ctx = RenderContext(f"w{process}c{index}", random.Random(), ids)
            methods = calls[index % len(calls)]
            while budget.take():
                if pacer is not None:
                    await pacer.wait()
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                ctx.request_number = next(numbers)
                method, body = source.next_call(ctx)
                started = time.perf_counter_ns()
                try:
                    await methods[method](body, timeout=timeout, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    status, error = error_text(exc)
                    result.record(method, time.perf_counter_ns() - started, status, error)
                else:
                    result.record(method, time.perf_counter_ns() - started, "OK", None)

        await asyncio.gather(*(slot(i) for i in range(concurrency)))
        result.end_ns = time.monotonic_ns()
        result.end_reason = "normal" if deadline is None else "timeout"
    finally:
        for ch in channels:
            await ch.close()
    return result


def _worker_main(config: LoadConfig, process: int, barrier: Any, conn: Connection) -> None:
    """Entry point of a spawned worker process: run, send the result, exit."""

    def ready() -> None:
        with contextlib.suppress(Exception):  # a broken barrier just starts late
            barrier.wait(BARRIER_TIMEOUT)

    try:
        conn.send(asyncio.run(run_worker(config, process, config.workers, ready)))
    finally:
        conn.close()


def run_processes(config: LoadConfig) -> WorkerResult:
    """Run `config.workers` spawned processes (blocking) and merge their results."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(config.workers)
    jobs: list[tuple[Any, Connection]] = []
    for process in range(config.workers):
        receiver, sender = ctx.Pipe(duplex=False)
        job = ctx.Process(
            target=_worker_main,
            args=(config, process, barrier, sender),
            name=f"sira-loadtest-{process}",
            daemon=True,
        )
        job.start()
        sender.close()
        jobs.append((job, receiver))
    results: list[WorkerResult] = []
    failures: list[str] = []
    for job, receiver in jobs:
        try:
            results.append(receiver.recv())
        except EOFError:
            failures.append(job.name)
        job.join()
        if job.exitcode:
            failures.append(f"{job.name} (exit code {job.exitcode})")
    if failures:
        raise RuntimeError(f"load worker(s) failed: {', '.join(failures)}")
    return merge_results(results)


async def preassign(config: LoadConfig) -> tuple[tuple[tuple[str, str], ...], dict[str, int]]:
    """Assign every returning subject once; -> ((subject, variant id), ...), status counts.

    Assign is sticky, so repeating this (another run, another worker) changes
    nothing; it makes the "returning" subjects really returning and tells Track
    traffic which variant each subject has.
    """
    channel = open_channel(config)
    assign = channel.unary_unary(
        ASSIGN_METHOD,
        request_serializer=assignment_service_pb2.AssignRequest.SerializeToString,
        response_deserializer=assignment_service_pb2.AssignResponse.FromString,
    )
    subjects = [
        returning_subject_id(config.subject_prefix, i) for i in range(config.returning_subjects)
    ]
    assigned: list[tuple[str, str]] = []
    statuses: dict[str, int] = {}
    pending = iter(subjects)

    async def slot() -> None:
        for subject in pending:
            request = assignment_service_pb2.AssignRequest(
                experiment=config.experiment, subject_id=subject
            )
            try:
                response = await assign(
                    request, timeout=config.timeout, metadata=tuple(config.metadata)
                )
            except grpc.aio.AioRpcError as exc:
                status = status_name(exc.code())
            else:
                status = "OK"
                variant = response.decision.variant
                if variant.id or variant.key:
                    assigned.append((subject, variant.id or variant.key))
            statuses[status] = statuses.get(status, 0) + 1

    try:
        await asyncio.gather(*(slot() for _ in range(SETUP_CONCURRENCY)))
    finally:
        await channel.close()
    return tuple(assigned), statuses


def report_options(config: LoadConfig) -> dict[str, Any]:
    """ghz's `options` block of the JSON report (secrets left out)."""
    options = asdict(config)
    options.pop("preassigned", None)
    options["metadata"] = {k: ("***" if k == "authorization" else v) for k, v in config.metadata}
    options["call"] = config.call.lstrip("/").replace("/", ".")
    return options


@dataclass(frozen=True)
class LoadRun:
    report: Report
    setup_statuses: Mapping[str, int]
    """Status counts of the scenario's pre-assignment (empty without a scenario)."""
    preassigned: int


async def run_load_detailed(config: LoadConfig, *, setup_scenario: bool = True) -> LoadRun:
    """Validate, set up the scenario (pre-assign), run the workers, build the report.

    With `setup_scenario=False` the caller has pre-assigned already and passes
    the pairs in `config.preassigned`.
    """
    config.validate()
    setup: dict[str, int] = {}
    if config.scenario and setup_scenario:
        assigned, setup = await preassign(config)
        config = replace(config, preassigned=assigned)
    if config.workers == 1:
        result = await run_worker(config)
    else:
        result = await asyncio.to_thread(run_processes, config)
    report = build_report(result, name=config.name, options=report_options(config))
    return LoadRun(report, setup, len(config.preassigned))


async def run_load(config: LoadConfig) -> Report:
    """Run a load and return ghz's report."""
    return (await run_load_detailed(config)).report
