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
import json
import multiprocessing
import random
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import grpc

from sira.experiments.v1 import assignment_service_pb2
from sira_loadtest.config import ConfigError, LoadConfig
from sira_loadtest.descriptors import from_proto, from_protoset, from_reflection
from sira_loadtest.payloads import request_class
from sira_loadtest.report import Report, WorkerResult, build_report, merge_results
from sira_loadtest.scenarios import ASSIGN_METHOD, build_source
from sira_loadtest.schedules import SendClock
from sira_loadtest.template import (
    IdFactory,
    RenderContext,
    TemplateError,
    compile_metadata,
    returning_subject_id,
)
from sira_loadtest.tls import channel_plan, pin_certificate

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


CLOSING_ERROR = "rpc error: code = Canceled desc = grpc: the client connection is closing"
"""What --duration-stop=close reports for a call still in flight at the end (as ghz)."""


class ConnectError(RuntimeError):
    """No connection within --connect-timeout."""


def open_channel(config: LoadConfig, index: int = 0) -> grpc.aio.Channel:
    return channel_plan(config).open(index)


async def wait_connected(channel: grpc.aio.Channel, config: LoadConfig) -> None:
    try:
        await asyncio.wait_for(channel.channel_ready(), config.connect_timeout)
    except TimeoutError:
        raise ConnectError(
            f"cannot connect to {config.target} within {config.connect_timeout:g}s "
            "(--connect-timeout)"
        ) from None


@dataclass
class _Budget:
    """Calls left to send in one worker (-n); unlimited with -z."""

    remaining: int | None

    def take(self) -> bool:
        if self.remaining is None:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


@dataclass
class _Stop:
    deadline: float | None
    """time.monotonic() at which -z/-x runs out, or None."""
    timed_out: bool = False

    def passed(self, now: float) -> bool:
        if self.deadline is not None and now >= self.deadline:
            self.timed_out = True
            return True
        return False


class _Slots:
    """Which in-flight slots may send now, under a concurrency schedule."""

    def __init__(self, config: LoadConfig, process: int, processes: int) -> None:
        self.schedule = config.concurrency_schedule
        self.process, self.processes = process, processes
        if self.schedule.kind == "const":
            self.size = max(1, share(config.concurrency, processes, process))
        else:
            self.size = max(1, self._level(self.schedule.peak()))

    def _level(self, value: float) -> int:
        return share(int(value), self.processes, self.process)

    def active(self, index: int, elapsed: float) -> bool:
        if self.schedule.kind == "const":
            return True
        return index < self._level(self.schedule.value_at(elapsed))

    def next_change(self, elapsed: float) -> float:
        return self.schedule.next_change(elapsed)


async def run_worker(
    config: LoadConfig,
    process: int = 0,
    processes: int = 1,
    ready: Callable[[], None] | None = None,
) -> WorkerResult:
    """One worker's share of the load, in the running event loop.

    Closed loop (no rate): each slot sends its next call when the previous one
    answers, latency measured from the send. Open loop (--rps, --load-schedule):
    every call has an intended send time on the schedule; a free slot waits for
    it, and latency is measured from it, so a stalled server is charged for the
    calls that could not be sent on time (no coordinated omission, as wrk2).
    """
    slots = _Slots(config, process, processes)
    total = share(config.total, processes, process)
    n_channels = max(1, share(config.connections, processes, process))
    channels = [open_channel(config, i) for i in range(n_channels)]
    result = WorkerResult(skip=share(config.skip_first, processes, process))
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
            await wait_connected(ch, config)
        if ready is not None:
            await asyncio.to_thread(ready)
        ids = IdFactory(config.subject_prefix, secrets.token_hex(4), process)
        result.start_ns = time.monotonic_ns()
        begin = result.start_ns / 1e9
        wall_offset = time.time_ns() - time.monotonic_ns()
        span = config.duration if config.duration is not None else config.max_duration
        stop = _Stop(None if span is None else begin + span)
        budget = _Budget(None if config.duration is not None else total)
        schedule = config.load_schedule
        clock = None if schedule is None else SendClock(schedule, begin, 1.0 / processes)
        numbers = iter(range(process, 2**62, processes))
        metadata = compile_metadata(config.metadata)
        timeout = config.timeout or None
        closing = config.duration_stop == "close"

        async def await_turn(index: int) -> bool:
            """Sleep while the concurrency schedule keeps this slot idle; False: never again."""
            while not slots.active(index, time.monotonic() - begin):
                change = slots.next_change(time.monotonic() - begin)
                if change == float("inf"):
                    return False
                await asyncio.sleep(max(0.0, begin + change - time.monotonic()))
                if stop.passed(time.monotonic()):
                    return False
            return True

        async def slot(index: int) -> None:
            ctx = RenderContext(f"w{process}c{index}", random.Random(), ids)
            methods = calls[index % len(calls)]
            while True:
                if not await await_turn(index):
                    return
                if stop.passed(time.monotonic()) or not budget.take():
                    return
                if clock is None:
                    started = time.monotonic_ns()
                else:
                    due = clock.next()
                    if due is None or stop.passed(due):
                        return
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    started = int(due * 1e9)
                ctx.request_number = next(numbers)
                method, body = source.next_call(ctx)
                call = methods[method](body, timeout=timeout, metadata=metadata.render(ctx))
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    status, error = error_text(exc)
                    result.record(
                        method, time.monotonic_ns() - started, status, error, started + wall_offset
                    )
                except asyncio.CancelledError:  # -z/-x ran out (see below)
                    call.cancel()
                    if not stop.timed_out:
                        raise
                    if closing:
                        result.record(
                            method,
                            time.monotonic_ns() - started,
                            "Canceled",
                            CLOSING_ERROR,
                            started + wall_offset,
                        )
                    return
                else:
                    result.record(
                        method, time.monotonic_ns() - started, "OK", None, started + wall_offset
                    )

        tasks = [asyncio.create_task(slot(i)) for i in range(slots.size)]
        if stop.deadline is None or config.duration_stop == "wait":
            await asyncio.gather(*tasks)
        else:
            _, pending = await asyncio.wait(tasks, timeout=stop.deadline - time.monotonic())
            if pending:
                stop.timed_out = True
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        result.end_ns = time.monotonic_ns()
        timed_out = stop.timed_out or config.duration is not None
        result.end_reason = "timeout" if timed_out else "normal"
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


def _ns(seconds: float | None) -> int:
    """A duration as Go's time.Duration in JSON: integer nanoseconds."""
    return round((seconds or 0.0) * 1e9)


def _masked(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return {k: ("***" if k == "authorization" else v) for k, v in pairs}


def _data_option(config: LoadConfig) -> Any:
    """ghz puts the parsed call data in the options; templates stay as text."""
    try:
        return json.loads(config.data) if config.data.strip() else None
    except json.JSONDecodeError:
        return config.data


def report_options(config: LoadConfig) -> dict[str, Any]:
    """ghz's `options` block of the JSON report (its keys), then SIRA's extras; no secrets."""
    load, conc = config.load, config.concurrency_schedule
    return {
        "host": config.target,
        "proto": config.proto,
        "protoset": ",".join(config.protoset),
        "import-paths": list(config.import_paths),
        "call": config.call.lstrip("/").replace("/", "."),
        "cacert": config.tls.cacert,
        "cert": config.tls.cert,
        "key": config.tls.key,
        "skipTLS": config.tls.skip_verify,
        "skipFirst": config.skip_first,
        "cname": config.tls.cname,
        "authority": config.tls.authority,
        "insecure": config.insecure,
        "total": config.total,
        "concurrency": config.concurrency,
        "concurrency-schedule": conc.kind,
        "concurrency-start": conc.start,
        "concurrency-end": conc.end,
        "concurrency-step": conc.step,
        "concurrency-step-duration": _ns(conc.step_duration),
        "concurrency-max-duration": _ns(conc.max_duration),
        "rps": config.rps,
        "load-schedule": load.kind,
        "load-start": load.start,
        "load-end": load.end,
        "load-step": load.step,
        "load-step-duration": _ns(load.step_duration),
        "load-max-duration": _ns(load.max_duration),
        "connections": config.connections,
        "duration": _ns(config.duration),
        "max-duration": _ns(config.max_duration),
        "duration-stop": config.duration_stop,
        "timeout": _ns(config.timeout),
        "dial-timeout": _ns(config.connect_timeout),
        "keepalive": _ns(config.keepalive),
        "data": _data_option(config),
        "binary": bool(config.binary),
        "metadata": _masked(config.metadata),
        "reflect-metadata": _masked(config.reflect_metadata),
        "count-errors": config.count_errors,
        "CPUs": config.workers,
        "name": config.name,
        "tags": dict(config.tags),
        # SIRA's own
        "workers": config.workers,
        "scenario": config.scenario,
        "experiment": config.experiment,
        "returning_subjects": config.returning_subjects,
        "subject_prefix": config.subject_prefix,
    }


async def resolve_descriptors(config: LoadConfig) -> bytes:
    """The call's FileDescriptorSet: --protoset, else --proto, else server reflection.

    Without reflection on the server, SIRA's own methods (built in) and methods
    called with empty data still work; anything else needs --proto/--protoset.
    """
    if config.protoset:
        return await asyncio.to_thread(from_protoset, config.protoset)
    if config.proto:
        return await asyncio.to_thread(from_proto, config.proto, config.import_paths)
    channel = open_channel(config)
    try:
        await wait_connected(channel, config)
        return await from_reflection(
            channel, config.call, config.reflect_metadata or config.metadata, config.connect_timeout
        )
    except ConfigError:
        if request_class(config.call) is not None or not config.data.strip():
            return b""
        raise
    finally:
        await channel.close()


async def prepare(config: LoadConfig) -> LoadConfig:
    """Validate, pin the --skipTLS certificate, resolve the call's types (once, here)."""
    config.validate()
    try:
        compile_metadata(config.metadata)
    except TemplateError as exc:
        raise ConfigError(f"-m/--metadata: {exc}") from None
    pinned = await asyncio.to_thread(pin_certificate, config)
    config = replace(config, pinned_certificate=pinned)
    if config.call and not config.scenario and not config.binary and not config.descriptor_set:
        config = replace(config, descriptor_set=await resolve_descriptors(config))
    return config


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
    config = await prepare(config)
    setup: dict[str, int] = {}
    if config.scenario and setup_scenario:
        assigned, setup = await preassign(config)
        config = replace(config, preassigned=assigned)
    if config.workers == 1:
        result = await run_worker(config)
    else:
        result = await asyncio.to_thread(run_processes, config)
    report = build_report(
        result,
        name=config.name,
        options=report_options(config),
        count_errors=config.count_errors,
    )
    return LoadRun(report, setup, len(config.preassigned))


async def run_load(config: LoadConfig) -> Report:
    """Run a load and return ghz's report."""
    return (await run_load_detailed(config)).report
