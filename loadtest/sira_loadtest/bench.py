"""`make bench`: Assign and Track against an echo server, same client, same load.

Starts the echo server and a SIRA server (embedded Postgres/Redis in a temporary
data directory, or SIRA_DATABASE_URL/SIRA_REDIS_URL when set), seeds a running
Thompson-sampling experiment over gRPC, pre-assigns the returning subjects,
then measures, one after the other: echo, Assign (80 % returning, 20 % new
subjects), Track (unique conversions) with sira-loadtest, and the same three
with h2load when it is on PATH. Writes a markdown section into
docs/benchmarks.md (between its markers) and the full results as JSON.

Whatever SIRA answers (UNIMPLEMENTED, errors, no start at all) ends up in the
report; the bench itself does not fail on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
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
from sira_loadtest.bench_report import (
    BenchResult,
    Measurement,
    measurement_table,
    ratio_lines,
    render_markdown,
    replace_section,
)
from sira_loadtest.config import LoadConfig, parse_duration
from sira_loadtest.echo import ECHO_METHOD, READY_PREFIX
from sira_loadtest.h2load import h2load_path, h2load_version, run_h2load
from sira_loadtest.machine import describe_machine
from sira_loadtest.report import Report
from sira_loadtest.runner import error_text, preassign, run_load_detailed
from sira_loadtest.scenarios import ASSIGN_METHOD, TRACK_METHOD
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


async def seed_experiment(address: str, token: str, key: str) -> None:
    """Create and start a Thompson-sampling experiment with three variants."""
    experiment = experiment_pb2.Experiment(
        key=key,
        name="Bench checkout",
        description="Created by sira_loadtest.bench",
        allocation=experiment_pb2.ALLOCATION_STRATEGY_THOMPSON_SAMPLING,
        variants=[
            experiment_pb2.Variant(key=k, name=n, is_control=control) for k, n, control in VARIANTS
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
        detail=report.to_json(),
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
    run = await run_load_detailed(config, setup_scenario=False)
    report = run.report
    note = _status_note(report.status_code_distribution, report.error_distribution)
    return _from_report(target, workload, report, note)


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
    result = await asyncio.to_thread(
        run_h2load,
        url,
        body,
        duration=options.duration,
        concurrency=options.concurrency,
        connections=options.connections,
        headers=headers,
    )
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
    )


@dataclass
class _Sira:
    address: str
    experiment: str
    metadata: tuple[tuple[str, str], ...]
    preassigned: tuple[tuple[str, str], ...]


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
    )
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="sira-bench-") as tmp:
        tmp_dir = Path(tmp)
        echo = stack.enter_context(
            start_process(
                ["-m", "sira_loadtest.echo", "--port", "0"],
                os.environ,
                ECHO_READY,
                tmp_dir / "echo.log",
                60,
            )
        )
        sira = (
            await _start_sira(stack, tmp_dir, experiment, options, result) if options.sira else None
        )

        runs = [
            (
                "echo",
                "empty request, empty response",
                replace(base, target=echo.address, call=ECHO_METHOD, name="echo"),
            )
        ]
        if sira is not None:
            scenario = replace(
                base,
                target=sira.address,
                experiment=experiment,
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
            print(f"measuring {target} (sira-loadtest)", file=sys.stderr)
            try:
                measured = await measure_loadtest(target, workload, config, options)
            except (RuntimeError, OSError) as exc:  # e.g. a worker process died
                result.problems.append(f"sira-loadtest run of {target} failed: {exc}")
            else:
                result.measurements.append(measured)
        if h2load is None:
            if options.h2load:
                result.problems.append("h2load not on PATH: no h2load runs")
        else:
            await _h2load_runs(result, echo.address, sira, options)
    return result


async def _start_sira(
    stack: ExitStack, tmp_dir: Path, experiment: str, options: BenchOptions, result: BenchResult
) -> _Sira | None:
    """Start and seed SIRA; None (and a problem noted) when that fails."""
    secret = secrets.token_urlsafe(32)
    env = {
        **os.environ,
        "SIRA_GRPC_HOST": "127.0.0.1",
        "SIRA_GRPC_PORT": "0",
        "SIRA_METRICS_PORT": "0",
        "SIRA_JWT_SECRET": secret,
        "SIRA_DATA_DIR": str(tmp_dir / "sira-data"),
        "SIRA_SHUTDOWN_GRACE_SECONDS": "2",
    }
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
        server = stack.enter_context(
            start_process(
                ["-m", "sira_server"],
                env,
                SIRA_READY,
                tmp_dir / "sira.log",
                options.startup_timeout,
            )
        )
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
    sira = _Sira(server.address, experiment, metadata, ())
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
    a = p.parse_args(argv)
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
    )


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    result = asyncio.run(run_bench(options))
    replace_section(options.markdown, render_markdown(result))
    options.json_path.parent.mkdir(parents=True, exist_ok=True)
    options.json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print(measurement_table(result.measurements))
    for line in ratio_lines(result):
        print(line)
    for problem in result.problems:
        print(f"note: {problem}")
    print(f"wrote {options.markdown} and {options.json_path}")


if __name__ == "__main__":
    main()
