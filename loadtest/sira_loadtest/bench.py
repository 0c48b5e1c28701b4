"""`make bench`: the whole benchmark report in one command.

First the statistics kernels (`sira_loadtest.bench_kernels`, their own section). Then
it starts the echo server and a SIRA server (embedded Postgres/Redis in a temporary
data directory, or SIRA_DATABASE_URL/SIRA_REDIS_URL when set), seeds a running
Thompson-sampling experiment over gRPC, pre-assigns the returning subjects,
then measures, one after the other: echo, Assign (80 % returning, 20 % new
subjects), Track (unique conversions) with sira-loadtest, the same three
with h2load when it is on PATH, GetInsights on a seeded 10-variant experiment,
and Assign again with SIRA restarted as several worker processes (when the
machine has the cores). Writes a markdown section into docs/benchmarks.md
(between its markers) and the full results as JSON.

Whatever SIRA answers (UNIMPLEMENTED, errors, no start at all) ends up in the
report; the bench itself does not fail on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import jwt

from sira.experiments.v1 import (
    assignment_service_pb2,
    experiment_pb2,
    lifecycle_service_pb2,
    lifecycle_service_pb2_grpc,
    tracking_service_pb2,
)
from sira_loadtest import bench_admin, bench_cpu
from sira_loadtest.bench_rate import (
    OPEN_LOOP_END,
    OPEN_LOOP_START,
    RATE_SHARES,
    RateRow,
    render_rate_markdown,
    row_from_report,
    row_from_report_json,
)
from sira_loadtest.bench_report import (
    INSIGHTS_TARGET,
    BenchResult,
    Measurement,
    measurement_table,
    ratio_lines,
    read_loadavg,
    render_markdown,
    replace_section,
    target_checks,
    workers_target,
)
from sira_loadtest.config import LoadConfig, parse_duration
from sira_loadtest.echo import ECHO_METHOD, READY_PREFIX
from sira_loadtest.h2load import h2load_path, h2load_version, run_h2load
from sira_loadtest.machine import describe_machine, usable_cores
from sira_loadtest.report import Report
from sira_loadtest.runner import error_text, preassign, run_load_detailed
from sira_loadtest.scenarios import ASSIGN_METHOD, CONVERSION_CURRENCY, TRACK_METHOD
from sira_loadtest.template import returning_subject_id

_REQUEST_ID = re.compile(r"\(request id [0-9a-f]+\)")
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Exit)\b")
SIRA_READY = re.compile(r"SIRA listening on (\S+)")
ECHO_READY = re.compile(re.escape(READY_PREFIX) + r" (\S+)")
VARIANTS = (
    ("control", "Control", True),
    ("one-click", "One click", False),
    ("wallet", "Wallet", False),
)
INSIGHTS_METHOD = "/sira.experiments.v1.InsightsService/GetInsights"
INSIGHTS_VARIANTS = (
    ("control", "Control", True),
    *((f"v{i}", f"Variant {i}", False) for i in range(1, 10)),
)
INSIGHTS_PREFIX = "gi-"
"""Subject and event id prefix of the GetInsights seed traffic."""
SEED_CONCURRENCY = 16
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class BenchOptions:
    duration: float = 10.0
    """Seconds per measured run."""
    warmup: float = 1.0
    """Seconds of unmeasured load before each run."""
    concurrency: int = 64
    connections: int = 1
    workers: int = 1
    """Client processes of sira-loadtest."""
    subjects: int = 1000
    """Returning subjects pre-assigned before the runs."""
    markdown: Path = Path("docs/benchmarks.md")
    json_path: Path = Path("docs/benchmarks-decisions.json")
    h2load: bool = True
    sira: bool = True
    startup_timeout: float = 240.0
    kernels: bool = True
    """Run `sira_loadtest.bench_kernels --write` first."""
    cpu: bool = True
    """Then `sira_loadtest.bench_cpu --write`: server CPU per call, its own section."""
    insights: bool = True
    insights_concurrency: int = 8
    insights_subjects: int = 3000
    """Subjects assigned (and some converted) before GetInsights is measured."""
    sira_workers: int = 2
    """Worker processes of the extra Assign run; below 2 (or on 1 core): no such run."""
    open_loop: bool = True
    """Assign and Track at fixed shares of their closed-loop maximum (`bench_rate`)."""
    marker: str = ""
    """Set by the run: the temporary directory, naming the bench's own processes."""


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextmanager
def start_process(
    args: list[str], env: Mapping[str, str], ready: re.Pattern[str], log_path: Path, timeout: float
) -> Iterator[ServerProcess]:
    """Run `python <args>`, wait for its ready line, stop it (SIGTERM) on exit."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=dict(env)
        )
    server = ServerProcess(process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while not server.address:
            match = ready.search(log_path.read_text(errors="replace"))
            if match:
                server.address = match.group(1)
            elif process.poll() is not None:
                raise RuntimeError(f"{' '.join(args)} exited early:\n{server.log_tail()}")
            elif time.monotonic() > deadline:
                raise RuntimeError(
                    f"{' '.join(args)} not ready in {timeout}s:\n{server.log_tail()}"
                )
            else:
                time.sleep(0.1)
        yield server
    finally:
        server.stop()


def _busy_ticks() -> int:
    """CPU ticks spent busy by the whole machine since boot (all cores, steal included)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(values) - values[3] - values[4]  # minus idle and iowait


def tree_ticks(table: Mapping[int, tuple[int, int]], roots: set[int]) -> int:
    """CPU ticks of `roots` and all their descendants in a `bench_cpu.process_table()`."""
    seen = set().union(*(bench_cpu.descendants(table, root) for root in roots))
    return sum(table[pid][1] for pid in seen if pid in table)


def _cmdline_has(pid: int, marker: str) -> bool:
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class OtherLoad:
    """CPU that processes outside the bench use while a run is measured, in cores.

    The machine is shared: a neighbour's test run during a measurement shows here. Ours
    are this process and its descendants, plus the trees of processes whose command line
    names the bench's temporary directory (the embedded Postgres daemonises).
    """

    def __init__(self, marker: str = "") -> None:
        self._marker = marker
        self._start: tuple[float, int, int] | None = None

    def _ours(self) -> int:
        table = bench_cpu.process_table()
        roots = {os.getpid()}
        if self._marker:
            roots |= {pid for pid in table if _cmdline_has(pid, self._marker)}
        return tree_ticks(table, roots)

    def start(self) -> None:
        try:
            self._start = (time.monotonic(), _busy_ticks(), self._ours())
        except OSError:  # no /proc: not Linux
            self._start = None

    def stop(self) -> float | None:
        """Cores used by other processes since `start`; None where /proc is missing."""
        if self._start is None:
            return None
        try:
            now, busy, ours = time.monotonic(), _busy_ticks(), self._ours()
        except OSError:
            return None
        began, busy0, ours0 = self._start
        ticks = (busy - busy0) - (ours - ours0)
        return max(ticks, 0) / CLOCK_TICKS / max(now - began, 1e-9)


def summarize_failure(text: str) -> str:
    """First line of a failure plus the last exception line of its log, if any."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no output"
    errors = [line for line in lines[1:] if _EXCEPTION_LINE.match(line)]
    return lines[0] + (f" ... {errors[-1]}" if errors else "")


def mint_token(secret: str, role: str) -> str:
    now = int(time.time())
    claims = {"sub": "sira-bench", "roles": [role], "iat": now, "exp": now + 6 * 3600}
    return jwt.encode(claims, secret, algorithm="HS256")


async def seed_experiment(
    address: str,
    token: str,
    key: str,
    variants: Sequence[tuple[str, str, bool]] = VARIANTS,
    name: str = "Bench checkout",
) -> None:
    """Create and start a Thompson-sampling experiment with these (key, name, control)."""
    experiment = experiment_pb2.Experiment(
        key=key,
        name=name,
        description="Created by sira_loadtest.bench",
        allocation=experiment_pb2.ALLOCATION_STRATEGY_THOMPSON_SAMPLING,
        variants=[
            experiment_pb2.Variant(key=k, name=n, is_control=control) for k, n, control in variants
        ],
    )
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
        await stub.CreateExperiment(
            lifecycle_service_pb2.CreateExperimentRequest(experiment=experiment),
            metadata=metadata,
            timeout=30,
        )
        await stub.StartExperiment(
            lifecycle_service_pb2.StartExperimentRequest(experiment=key),
            metadata=metadata,
            timeout=30,
        )


async def probe_status(
    address: str, method: str, body: bytes, metadata: tuple[tuple[str, str], ...]
) -> str:
    """gRPC status (Go name) of one call with exactly this body."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            await call(body, metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return error_text(exc)[0]
    return "OK"


def _from_report(target: str, workload: str, report: Report, note: str = "") -> Measurement:
    return Measurement(
        target=target,
        client="sira-loadtest",
        workload=workload,
        calls=report.count,
        rps=report.rps,
        p50_ns=report.latency_ns(50) or 0,
        p95_ns=report.latency_ns(95) or 0,
        p99_ns=report.latency_ns(99) or 0,
        statuses=report.status_code_distribution,
        note=note,
        detail=report.to_json(details=False),
    )


def _status_note(statuses: Mapping[str, int], errors: Mapping[str, int]) -> str:
    if statuses.get("OK", 0) == sum(statuses.values()):
        return ""
    kinds: dict[str, int] = {}
    for error, n in errors.items():  # SIRA's INTERNAL errors each carry a request id
        key = _REQUEST_ID.sub("(request id ...)", error)
        kinds[key] = kinds.get(key, 0) + n
    top = max(kinds.items(), key=lambda kv: kv[1])[0] if kinds else ""
    return f"not all calls succeeded; most common error: {top}"


async def measure_loadtest(
    target: str, workload: str, config: LoadConfig, options: BenchOptions
) -> Measurement:
    if options.warmup > 0:
        await run_load_detailed(replace(config, duration=options.warmup), setup_scenario=False)
    watch = OtherLoad(options.marker)
    watch.start()
    run = await run_load_detailed(config, setup_scenario=False)
    other = watch.stop()
    report = run.report
    note = _status_note(report.status_code_distribution, report.error_distribution)
    return replace(_from_report(target, workload, report, note), other_cores=other)


async def measure_h2load(
    target: str,
    workload: str,
    address: str,
    method: str,
    body: bytes,
    metadata: tuple[tuple[str, str], ...],
    options: BenchOptions,
) -> Measurement:
    status = await probe_status(address, method, body, metadata)
    headers = dict(metadata)
    url = f"http://{address}{method}"
    if options.warmup > 0:
        await asyncio.to_thread(
            run_h2load,
            url,
            body,
            duration=options.warmup,
            concurrency=options.concurrency,
            connections=options.connections,
            headers=headers,
        )
    watch = OtherLoad(options.marker)
    watch.start()
    result = await asyncio.to_thread(
        run_h2load,
        url,
        body,
        duration=options.duration,
        concurrency=options.concurrency,
        connections=options.connections,
        headers=headers,
    )
    other = watch.stop()
    note = ""
    if status != "OK":
        note = (
            f"the body answers {status}; h2load counts the HTTP 200 of each error as a "
            "success, so this measures the error path"
        )
    if result.failed or result.errored:
        note = (
            note + "; " if note else ""
        ) + f"h2load: {result.failed} failed, {result.errored} errored"
    return Measurement(
        target=target,
        client="h2load",
        workload=workload,
        calls=result.requests,
        rps=result.rps,
        p50_ns=result.p50_ns,
        p95_ns=result.p95_ns,
        p99_ns=result.p99_ns,
        statuses={status: result.succeeded} if result.succeeded else {},
        note=note,
        detail={"summary": result.output},
        other_cores=other,
    )


@dataclass
class _Sira:
    address: str
    experiment: str
    metadata: tuple[tuple[str, str], ...]
    preassigned: tuple[tuple[str, str], ...]
    secret: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    """The server's environment: a restart with more workers reuses its data and key."""


def conversion_rate(variant_index: int) -> float:
    """Seed traffic's conversion rate: 8 % for the control, +1.5 points per variant."""
    return 0.08 + 0.015 * variant_index


async def seed_traffic(
    address: str,
    experiment: str,
    metadata: tuple[tuple[str, str], ...],
    subjects: int,
    *,
    prefix: str = INSIGHTS_PREFIX,
    seed: int = 7,
) -> tuple[tuple[tuple[str, str], ...], dict[str, int], dict[str, int]]:
    """Assign `subjects` subjects, then Track a conversion for some of each variant.

    -> ((subject, variant id), ...), Assign statuses, Track statuses. Variants are
    numbered in order of first assignment; variant i converts at `conversion_rate(i)`,
    so the insights have a spread of rates to compare.
    """
    config = LoadConfig(
        target=address,
        experiment=experiment,
        metadata=metadata,
        returning_subjects=subjects,
        subject_prefix=prefix,
        scenario="assign-heavy",
        timeout=10.0,
    )
    assigned, assign_statuses = await preassign(config)
    order: dict[str, int] = {}
    for _, variant in assigned:
        order.setdefault(variant, len(order))
    rng = random.Random(seed)
    converted = [(s, v) for s, v in assigned if rng.random() < conversion_rate(order[v])]
    track_statuses: dict[str, int] = {}
    pending = iter(converted)
    async with grpc.aio.insecure_channel(address) as channel:
        track = channel.unary_unary(
            TRACK_METHOD,
            request_serializer=tracking_service_pb2.TrackRequest.SerializeToString,
            response_deserializer=None,
        )

        async def slot() -> None:
            for subject, variant in pending:
                event = tracking_service_pb2.TrackedEvent(
                    experiment=experiment,
                    subject_id=subject,
                    variant_id=variant,
                    event_type=tracking_service_pb2.EVENT_TYPE_CONVERSION,
                    value=float(rng.randrange(500, 50_000)),
                    currency=CONVERSION_CURRENCY,
                    client_event_id=f"{prefix}{secrets.token_hex(8)}",
                )
                try:
                    await track(
                        tracking_service_pb2.TrackRequest(event=event),
                        metadata=metadata,
                        timeout=10,
                    )
                except grpc.aio.AioRpcError as exc:
                    status = error_text(exc)[0]
                else:
                    status = "OK"
                track_statuses[status] = track_statuses.get(status, 0) + 1

        await asyncio.gather(*(slot() for _ in range(SEED_CONCURRENCY)))
    return assigned, assign_statuses, track_statuses


async def run_bench(options: BenchOptions) -> BenchResult:
    """Start the servers, measure, return the results (nothing written yet)."""
    h2load = h2load_path() if options.h2load else None
    external = bool(os.environ.get("SIRA_DATABASE_URL") and os.environ.get("SIRA_REDIS_URL"))
    experiment = f"bench-{secrets.token_hex(4)}"
    result = BenchResult(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=describe_machine(),
        settings={
            "duration": options.duration,
            "warmup": options.warmup,
            "concurrency": options.concurrency,
            "connections": options.connections,
            "workers": options.workers,
            "subjects": options.subjects,
            "experiment": experiment,
            "variants": len(VARIANTS),
            "stores": "external Postgres and Redis" if external else "embedded Postgres and Redis",
            "h2load": h2load_version() if h2load else None,
            "sira": options.sira,
            "loadavg_start": read_loadavg(),
        },
    )
    base = LoadConfig(
        target="",
        concurrency=options.concurrency,
        connections=options.connections,
        workers=options.workers,
        duration=options.duration,
        returning_subjects=options.subjects,
        timeout=10.0,
        duration_stop="wait",  # every call sent is measured to its answer
    )
    # The directory outlives the servers: their embedded stores live in it.
    with tempfile.TemporaryDirectory(prefix="sira-bench-") as tmp, ExitStack() as stack:
        tmp_dir = Path(tmp)
        options = replace(options, marker=tmp)
        echo = stack.enter_context(
            start_process(
                ["-m", "sira_loadtest.echo", "--port", "0"],
                os.environ,
                ECHO_READY,
                tmp_dir / "echo.log",
                60,
            )
        )
        with ExitStack() as single:  # the one-process SIRA, stopped before the workers run
            sira = (
                await _start_sira(single, tmp_dir, experiment, options, result)
                if options.sira
                else None
            )
            await _loadtest_runs(result, base, echo.address, sira, options)
            if sira is not None and options.open_loop:
                await _open_loop_runs(result, base, sira, options)
            if h2load is None:
                if options.h2load:
                    result.problems.append("h2load not on PATH: no h2load runs")
            else:
                await _h2load_runs(result, echo.address, sira, options)
            # Last on this server: its insights cache keeps recomputing for a minute.
            if sira is not None and options.insights:
                await _insights_run(result, sira, options)
            if sira is not None:
                await _admin_isolation_run(result, sira, options)
        if sira is not None and options.sira_workers > 1:
            if usable_cores() < 2:
                result.problems.append(
                    f"{usable_cores()} usable core: no run with {options.sira_workers} workers"
                )
            else:
                await _workers_runs(tmp_dir, result, base, sira, options, h2load)
    result.settings["loadavg_end"] = read_loadavg()
    return result


async def _loadtest_runs(
    result: BenchResult,
    base: LoadConfig,
    echo_address: str,
    sira: _Sira | None,
    options: BenchOptions,
) -> None:
    runs = [
        (
            "echo",
            "empty request, empty response",
            replace(base, target=echo_address, call=ECHO_METHOD, name="echo"),
        )
    ]
    if sira is not None:
        scenario = replace(
            base,
            target=sira.address,
            experiment=sira.experiment,
            metadata=sira.metadata,
            preassigned=sira.preassigned,
        )
        runs += [
            (
                "Assign",
                "80 % returning / 20 % new subjects",
                replace(scenario, scenario="assign-heavy", name="assign-heavy"),
            ),
            (
                "Track",
                "conversions of pre-assigned subjects, unique event ids",
                replace(scenario, scenario="track-heavy", name="track-heavy"),
            ),
        ]
    for target, workload, config in runs:
        await _measure_into(result, target, workload, config, options)


async def _measure_into(
    result: BenchResult, target: str, workload: str, config: LoadConfig, options: BenchOptions
) -> None:
    print(f"measuring {target} (sira-loadtest)", file=sys.stderr)
    try:
        measured = await measure_loadtest(target, workload, config, options)
    except (RuntimeError, OSError) as exc:  # e.g. a worker process died
        result.problems.append(f"sira-loadtest run of {target} failed: {exc}")
    else:
        result.measurements.append(measured)


OPEN_LOOP_TARGETS = (("Assign", "assign-heavy"), ("Track", "track-heavy"))


async def _open_loop_runs(
    result: BenchResult, base: LoadConfig, sira: _Sira, options: BenchOptions
) -> None:
    """Assign and Track at 25/50/75 % of their closed-loop maximum, open loop.

    Rows (closed-loop first) go to `result.settings["open_loop"]` as JSON.
    """
    rows: list[RateRow] = []
    for target, scenario in OPEN_LOOP_TARGETS:
        closed = result.find(target, "sira-loadtest")
        if closed is None or closed.rps <= 0 or closed.ok_share < 0.5:
            result.problems.append(f"open loop: no usable closed-loop maximum for {target}")
            continue
        rows.append(
            row_from_report_json(target, "closed", closed.detail, other_cores=closed.other_cores)
        )
        config = replace(
            base,
            target=sira.address,
            experiment=sira.experiment,
            metadata=sira.metadata,
            preassigned=sira.preassigned,
            scenario=scenario,
            duration_stop="wait",
        )
        for share in RATE_SHARES:
            rate = closed.rps * share
            print(f"measuring {target} open loop at {share:.0%} ({rate:.0f}/s)", file=sys.stderr)
            rows.append(await _open_loop_run(target, replace(config, rps=rate), share, options))
    result.settings["open_loop"] = [r.to_json() for r in rows]


async def _open_loop_run(
    target: str, config: LoadConfig, share: float, options: BenchOptions
) -> RateRow:
    if options.warmup > 0:
        await run_load_detailed(replace(config, duration=options.warmup), setup_scenario=False)
    watch = OtherLoad(options.marker)
    watch.start()
    run = await run_load_detailed(config, setup_scenario=False)
    return row_from_report(target, run.report, share, config.rps, watch.stop())


def write_open_loop_section(markdown: Path, result: BenchResult) -> None:
    """The open-loop section of the page, when those runs happened."""
    rows = result.settings.get("open_loop")
    if not isinstance(rows, list):
        return
    body = render_rate_markdown(
        [RateRow.from_json(r) for r in rows],
        result.date,
        result.settings.get("concurrency"),
        result.settings.get("duration"),
    )
    replace_section(markdown, body, start=OPEN_LOOP_START, end=OPEN_LOOP_END)


def _sira_env(tmp_dir: Path, secret: str) -> dict[str, str]:
    return {
        **os.environ,
        "SIRA_GRPC_HOST": "127.0.0.1",
        "SIRA_GRPC_PORT": "0",
        "SIRA_METRICS_PORT": "0",
        "SIRA_HTTP_PORT": "off",  # the benchmark measures gRPC only
        "SIRA_JWT_SECRET": secret,
        "SIRA_DATA_DIR": str(tmp_dir / "sira-data"),
        "SIRA_SHUTDOWN_GRACE_SECONDS": "2",
        "SIRA_WORKERS": "1",
    }


def _launch_sira(
    stack: ExitStack,
    env: Mapping[str, str],
    log_path: Path,
    options: BenchOptions,
    workers: int = 1,
) -> ServerProcess:
    """Start `sira-server` (RuntimeError with its log when it does not get ready)."""
    args = ["-m", "sira_server"] + (["--workers", str(workers)] if workers > 1 else [])
    return stack.enter_context(
        start_process(args, env, SIRA_READY, log_path, options.startup_timeout)
    )


async def _start_sira(
    stack: ExitStack, tmp_dir: Path, experiment: str, options: BenchOptions, result: BenchResult
) -> _Sira | None:
    """Start and seed SIRA; None (and a problem noted) when that fails."""
    secret = secrets.token_urlsafe(32)
    env = _sira_env(tmp_dir, secret)
    database_url = os.environ.get("SIRA_DATABASE_URL")
    if database_url and os.environ.get("SIRA_REDIS_URL"):
        from sira_server.store.migrate import apply_migrations

        try:  # the server migrates embedded stores only
            await apply_migrations(database_url)
        except Exception as exc:  # any failure is reported, not raised
            result.problems.append(f"migrating SIRA_DATABASE_URL failed: {exc}")
            return None
    print("starting SIRA (embedded stores take a while the first time)", file=sys.stderr)
    try:
        server = _launch_sira(stack, env, tmp_dir / "sira.log", options)
    except RuntimeError as exc:
        result.problems.append(
            f"SIRA did not start, Assign/Track not measured: {summarize_failure(str(exc))}"
        )
        return None
    try:
        await seed_experiment(server.address, mint_token(secret, "ops_admin"), experiment)
    except grpc.aio.AioRpcError as exc:
        text = error_text(exc)[1]
        result.problems.append(f"seeding the experiment failed ({text}); Assign/Track not measured")
        return None
    metadata = (("authorization", f"Bearer {mint_token(secret, 'pay_module')}"),)
    sira = _Sira(server.address, experiment, metadata, (), secret, env)
    setup_config = LoadConfig(
        target=server.address,
        experiment=experiment,
        metadata=metadata,
        returning_subjects=options.subjects,
        scenario="assign-heavy",
        timeout=10.0,
    )
    print(f"pre-assigning {options.subjects} subjects", file=sys.stderr)
    assigned, statuses = await preassign(setup_config)
    sira.preassigned = assigned
    result.settings["preassigned"] = len(assigned)
    if len(assigned) < options.subjects:
        result.problems.append(
            f"pre-assignment of {options.subjects} subjects: {len(assigned)} got a variant "
            f"(statuses {statuses}); Track calls for the others name no variant"
        )
    return sira


async def _insights_run(result: BenchResult, sira: _Sira, options: BenchOptions) -> None:
    """Seed a 10-variant experiment with traffic, then measure GetInsights on it."""
    key = f"{sira.experiment}-insights"
    print(f"seeding {key}: {options.insights_subjects} subjects", file=sys.stderr)
    try:
        await seed_experiment(
            sira.address,
            mint_token(sira.secret, "ops_admin"),
            key,
            INSIGHTS_VARIANTS,
            name="Bench insights",
        )
        assigned, assign_statuses, track_statuses = await seed_traffic(
            sira.address, key, sira.metadata, options.insights_subjects
        )
    except grpc.aio.AioRpcError as exc:
        result.problems.append(
            f"seeding the GetInsights experiment failed ({error_text(exc)[1]}); not measured"
        )
        return
    result.settings["insights"] = {
        "experiment": key,
        "variants": len(INSIGHTS_VARIANTS),
        "assigned": len(assigned),
        "converted": track_statuses.get("OK", 0),
        "assign_statuses": assign_statuses,
        "track_statuses": track_statuses,
        "concurrency": options.insights_concurrency,
    }
    if track_statuses.get("OK", 0) < sum(track_statuses.values()):
        result.problems.append(f"GetInsights seed: Track statuses {track_statuses}")
    token = mint_token(sira.secret, "data_science")
    config = LoadConfig(
        target=sira.address,
        call=INSIGHTS_METHOD,
        data=json.dumps({"experiment": key}),
        metadata=(("authorization", f"Bearer {token}"),),
        concurrency=options.insights_concurrency,
        duration=options.duration,
        duration_stop="wait",
        timeout=10.0,
        name="get-insights",
    )
    workload = (
        f"{len(INSIGHTS_VARIANTS)} variants, {len(assigned)} subjects seeded; "
        f"{options.insights_concurrency} in flight"
    )
    await _measure_into(result, INSIGHTS_TARGET, workload, config, options)


async def _workers_runs(
    tmp_dir: Path,
    result: BenchResult,
    base: LoadConfig,
    sira: _Sira,
    options: BenchOptions,
    h2load: str | None,
) -> None:
    """Restart SIRA on the same data as `--workers N` and measure Assign again.

    SO_REUSEPORT spreads connections, not calls, across the workers: these runs use
    several connections (4 per worker) so that both workers get some.
    """
    workers = options.sira_workers
    print(f"restarting SIRA with {workers} workers", file=sys.stderr)
    with ExitStack() as stack:
        try:
            server = _launch_sira(stack, sira.env, tmp_dir / "sira-workers.log", options, workers)
        except RuntimeError as exc:
            result.problems.append(
                f"SIRA with {workers} workers did not start: {summarize_failure(str(exc))}"
            )
            return
        await _measure_workers(server.address, result, base, sira, options, h2load)


async def _measure_workers(
    address: str,
    result: BenchResult,
    base: LoadConfig,
    sira: _Sira,
    options: BenchOptions,
    h2load: str | None,
) -> None:
    workers = options.sira_workers
    target = workers_target(workers)
    result.settings["sira_workers"] = workers
    connections = max(options.connections, 4 * workers)
    config = replace(
        base,
        target=address,
        experiment=sira.experiment,
        metadata=sira.metadata,
        preassigned=sira.preassigned,
        scenario="assign-heavy",
        name="assign-heavy-workers",
        connections=connections,
    )
    workload = f"as Assign, over {connections} connections"
    await _measure_into(result, target, workload, config, options)
    if h2load is not None:
        subject = sira.preassigned[0][0] if sira.preassigned else returning_subject_id("lt-", 0)
        body = assignment_service_pb2.AssignRequest(
            experiment=sira.experiment, subject_id=subject
        ).SerializeToString()
        print(f"measuring {target} (h2load)", file=sys.stderr)
        try:
            measured = await measure_h2load(
                target,
                f"as Assign (fixed body), over {connections} connections",
                address,
                ASSIGN_METHOD,
                body,
                sira.metadata,
                replace(options, connections=connections),
            )
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            result.problems.append(f"h2load run of {target} failed: {exc}")
        else:
            result.measurements.append(measured)


async def _h2load_runs(
    result: BenchResult, echo_address: str, sira: _Sira | None, options: BenchOptions
) -> None:
    runs: list[tuple[str, str, str, str, bytes, tuple[tuple[str, str], ...]]] = [
        ("echo", "empty request (fixed body)", echo_address, ECHO_METHOD, b"", ())
    ]
    if sira is not None:
        subject, variant = (
            sira.preassigned[0] if sira.preassigned else (returning_subject_id("lt-", 0), "")
        )
        assign = assignment_service_pb2.AssignRequest(
            experiment=sira.experiment, subject_id=subject
        )
        event = tracking_service_pb2.TrackedEvent(
            experiment=sira.experiment,
            subject_id=subject,
            variant_id=variant,
            event_type=tracking_service_pb2.EVENT_TYPE_CONVERSION,
            client_event_id=f"lt-h2load-{secrets.token_hex(4)}",
        )
        runs += [
            (
                "Assign",
                "fixed body: one returning subject (sticky hit every call)",
                sira.address,
                ASSIGN_METHOD,
                assign.SerializeToString(),
                sira.metadata,
            ),
            (
                "Track",
                "fixed body: one event id (first accepted, then duplicates)",
                sira.address,
                TRACK_METHOD,
                tracking_service_pb2.TrackRequest(event=event).SerializeToString(),
                sira.metadata,
            ),
        ]
    for target, workload, address, method, body, metadata in runs:
        print(f"measuring {target} (h2load)", file=sys.stderr)
        try:
            measured = await measure_h2load(
                target, workload, address, method, body, metadata, options
            )
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            result.problems.append(f"h2load run of {target} failed: {exc}")
        else:
            result.measurements.append(measured)


async def _admin_isolation_run(result: BenchResult, sira: _Sira, options: BenchOptions) -> None:
    """Assign p99 quiet vs. under 100 concurrent ListExperiments (`bench_admin`)."""
    print("measuring Assign p99 under admin load", file=sys.stderr)
    try:
        measured = await bench_admin.measure_admin_isolation(
            sira.address, sira.secret, sira.experiment, options.duration
        )
    except grpc.aio.AioRpcError as exc:
        result.problems.append(f"admin isolation not measured: {error_text(exc)[1]}")
        return
    result.settings["admin_isolation"] = measured.to_json()


def parse_args(argv: list[str] | None) -> BenchOptions:
    p = argparse.ArgumentParser(prog="python -m sira_loadtest.bench", description=__doc__)
    p.add_argument("-z", "--duration", default="10s", help="per measured run (10s)")
    p.add_argument("--warmup", default="1s", help="unmeasured load before each run (1s)")
    p.add_argument("-c", "--concurrency", type=int, default=64, help="calls in flight (64)")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="sira-loadtest processes (1)")
    p.add_argument("--subjects", type=int, default=1000, help="returning subjects (1000)")
    p.add_argument("--markdown", type=Path, default=BenchOptions.markdown)
    p.add_argument("--json", type=Path, default=BenchOptions.json_path, dest="json_path")
    p.add_argument("--no-h2load", action="store_true", help="skip the h2load runs")
    p.add_argument("--echo-only", action="store_true", help="do not start SIRA")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel microbenchmarks")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU-per-call section")
    p.add_argument("--no-insights", action="store_true", help="skip the GetInsights run")
    p.add_argument(
        "--no-open-loop", action="store_true", help="skip the fixed-rate (open-loop) runs"
    )
    p.add_argument(
        "--insights-concurrency", type=int, default=8, help="GetInsights calls in flight (8)"
    )
    p.add_argument(
        "--insights-subjects", type=int, default=3000, help="GetInsights seed subjects (3000)"
    )
    p.add_argument(
        "--sira-workers",
        type=int,
        default=2,
        help="worker processes of the extra Assign run (2); 1 skips it",
    )
    a = p.parse_args(argv)
    if a.insights_concurrency < 1 or a.insights_subjects < 1 or a.sira_workers < 1:
        p.error("--insights-concurrency, --insights-subjects and --sira-workers must be >= 1")
    return BenchOptions(
        duration=parse_duration(a.duration),
        warmup=parse_duration(a.warmup),
        concurrency=a.concurrency,
        connections=a.connections,
        workers=a.workers,
        subjects=a.subjects,
        markdown=a.markdown,
        json_path=a.json_path,
        h2load=not a.no_h2load,
        sira=not a.echo_only,
        kernels=not a.no_kernels,
        cpu=not (a.no_cpu or a.echo_only),  # it starts SIRA servers
        insights=not a.no_insights,
        insights_concurrency=a.insights_concurrency,
        insights_subjects=a.insights_subjects,
        sira_workers=a.sira_workers,
        open_loop=not a.no_open_loop,
    )


def run_kernels(markdown: Path, extra: Sequence[str] = (), timeout: float = 300.0) -> str | None:
    """`python -m sira_loadtest.bench_kernels --write markdown [extra]`; a problem, or None.

    A separate process, before any server starts: the kernels get a quiet core and
    the bench's own process never loads numba.
    """
    print("measuring the statistics kernels", file=sys.stderr)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sira_loadtest.bench_kernels", "--write", str(markdown), *extra],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"kernel microbenchmarks failed: {exc}"
    print(done.stdout, end="", file=sys.stderr)
    if done.returncode != 0:
        return f"kernel microbenchmarks failed: {summarize_failure(done.stderr or done.stdout)}"
    return None


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    kernels_problem = run_kernels(options.markdown) if options.kernels else None
    cpu_problem = bench_cpu.run_as_step(options.markdown) if options.cpu else None
    result = asyncio.run(run_bench(options))
    for problem in (kernels_problem, cpu_problem):
        if problem:
            result.problems.append(problem)
    replace_section(options.markdown, render_markdown(result))
    write_open_loop_section(options.markdown, result)
    replace_section(
        options.markdown,
        bench_admin.render_markdown(result.settings.get("admin_isolation")),
        start=bench_admin.SECTION_START,
        end=bench_admin.SECTION_END,
    )
    options.json_path.parent.mkdir(parents=True, exist_ok=True)
    options.json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print(measurement_table(result.measurements))
    for line in ratio_lines(result):
        print(line)
    for check in target_checks(result):
        print(f"target: {check.what}: {check.measured} ({check.target}) {check.verdict}")
    for problem in result.problems:
        print(f"note: {problem}")
    print(f"wrote {options.markdown} and {options.json_path}")


if __name__ == "__main__":
    main()
