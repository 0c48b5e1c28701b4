"""`make capacity`: what one decision costs in CPU, Redis and Postgres, for docs/scaling.md.

It starts its own redis-server (AOF, `appendfsync always`, as in production), a fresh
database on a Postgres server (`--postgres`, default the local one), and one
`sira-server` (`--role all`: serving and write-behind in one process). It creates a
running two-variant Thompson-sampling experiment, then drives with `sira-loadtest`, one
workload after the other:

- Assign, new subject: every call a subject never seen (`cap-{{.RequestNumber}}`);
- Assign, returning subject not cached in this process: the same subjects again, after a
  restart of the server (its in-process sticky cache is empty): what a replica behind
  round_robin mostly sees, since a subject's previous call went to another replica;
- Assign, returning subject cached in this process: the same subjects a third time;
- Track of a unique conversion of an assigned subject (`--scenario track-heavy`).

Around each workload (the write-behind drained before the closing snapshot) it reads:
CPU ticks of the server, redis-server and the Postgres backends of its database from
/proc; Redis `INFO commandstats` and `INFO stats` (network bytes in and out) and
`used_memory`; rows in Postgres and committed transactions (pg_stat_database). Also an
idle window, for what the server costs with no traffic (posterior refresh, health,
flusher polls). Everything is per call, so a shared machine skews throughput but hardly
the per-call costs. Prints a markdown table; `--json` keeps the raw numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import jwt
import redis

from sira.experiments.v1 import experiment_pb2, lifecycle_service_pb2, lifecycle_service_pb2_grpc
from sira_loadtest.machine import describe_machine
from sira_server.store.migrate import apply_migrations
from sira_server.store.roles import as_role

READY = re.compile(r"SIRA listening on (\S+:\d+)")
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
ASSIGN = "sira.experiments.v1.AssignmentService/Assign"
CONTEXT = '"context": {"country": "SN", "language": "fr", "device": "mobile"}'


@dataclass
class Snapshot:
    at: float
    server_ticks: int
    redis_ticks: int
    postgres_ticks: int
    commands: dict[str, int]
    net_in: int
    net_out: int
    used_memory: int
    assignments: int
    metrics: int
    commits: int
    table_bytes: int
    """Assignments and events tables with their indexes and TOAST, on disk."""


@dataclass
class Workload:
    name: str
    calls: int
    """Calls answered OK."""
    seconds: float
    """Wall time of the load (the drain after it excluded)."""
    server_cpu_us: float
    redis_cpu_us: float
    postgres_cpu_us: float
    redis_commands: float
    redis_bytes_in: float
    redis_bytes_out: float
    redis_memory_bytes: float
    postgres_rows: float
    postgres_commits: float
    postgres_bytes: float
    commands: dict[str, float] = field(default_factory=dict)
    """Redis commands per call, by name (the top ones)."""


def _ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(x) for x in fields[11:15])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _token(secret: str, role: str) -> str:
    now = int(time.time())
    return jwt.encode(
        {"sub": "sira-capacity", "roles": [role], "iat": now, "exp": now + 6 * 3600},
        secret,
        algorithm="HS256",
    )


class Stores:
    """The measured stores: a redis-server of our own and a database of our own."""

    def __init__(self, redis_port: int, redis_pid: int, database: str) -> None:
        self.redis = redis.Redis(port=redis_port, decode_responses=True)
        self.redis_pid = redis_pid
        self.database = database

    async def snapshot(self, server_pid: int) -> Snapshot:
        conn = await asyncpg.connect(self.database)
        try:
            await conn.execute("SELECT pg_stat_force_next_flush()")
            backends = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            )
            assignments = await conn.fetchval("SELECT count(*) FROM experiment_assignments")
            metrics = await conn.fetchval("SELECT count(*) FROM experiment_metrics")
            commits = await conn.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            )
            table_bytes = await conn.fetchval(
                "SELECT pg_total_relation_size('experiment_assignments')"
                " + pg_total_relation_size('experiment_metrics')"
            )
        finally:
            await conn.close()
        stats = self.redis.info("stats")
        commandstats = self.redis.info("commandstats")
        return Snapshot(
            at=time.monotonic(),
            server_ticks=_ticks(server_pid),
            redis_ticks=_ticks(self.redis_pid),
            postgres_ticks=sum(_ticks(row["pid"]) for row in backends),
            commands={k.removeprefix("cmdstat_"): v["calls"] for k, v in commandstats.items()},
            net_in=stats["total_net_input_bytes"],
            net_out=stats["total_net_output_bytes"],
            used_memory=self.redis.info("memory")["used_memory"],
            assignments=assignments,
            metrics=metrics,
            commits=commits,
            table_bytes=table_bytes,
        )


def _per_call(name: str, calls: int, seconds: float, a: Snapshot, b: Snapshot) -> Workload:
    n = max(calls, 1)
    us = 1e6 / TICKS_PER_SECOND / n
    commands = {k: (b.commands.get(k, 0) - a.commands.get(k, 0)) / n for k in b.commands}
    commands = {k: v for k, v in sorted(commands.items(), key=lambda kv: -kv[1]) if v > 0}
    return Workload(
        name=name,
        calls=calls,
        seconds=seconds,
        server_cpu_us=(b.server_ticks - a.server_ticks) * us,
        redis_cpu_us=(b.redis_ticks - a.redis_ticks) * us,
        postgres_cpu_us=max(b.postgres_ticks - a.postgres_ticks, 0) * us,
        redis_commands=sum(commands.values()),
        redis_bytes_in=(b.net_in - a.net_in) / n,
        redis_bytes_out=(b.net_out - a.net_out) / n,
        redis_memory_bytes=(b.used_memory - a.used_memory) / n,
        postgres_rows=((b.assignments - a.assignments) + (b.metrics - a.metrics)) / n,
        postgres_commits=(b.commits - a.commits) / n,
        postgres_bytes=(b.table_bytes - a.table_bytes) / n,
        commands=dict(list(commands.items())[:6]),
    )


@contextmanager
def _redis_server(workdir: Path) -> Iterator[tuple[int, int]]:
    port = _free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--dir", str(workdir), "--appendonly", "yes",
         "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def _sira_server(env: Mapping[str, str], log_path: Path) -> Iterator[tuple[str, int]]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sira_server"], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 120
        while not (match := READY.search(log_path.read_text(errors="replace"))):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sira-server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield match.group(1), process.pid
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:  # stuck: its log says where
            sys.stderr.write(f"sira-server did not stop:\n{log_path.read_text()[-3000:]}\n")
            process.kill()
            process.wait(10)


def _loadtest(address: str, token: str, args: list[str]) -> int:
    """Run sira-loadtest; the number of calls answered OK."""
    command = [sys.executable, "-m", "sira_loadtest", "--token", token, "-O", "json", *args]
    out = subprocess.run(
        [*command, address], capture_output=True, text=True, check=True, timeout=600
    )
    report = json.loads(out.stdout)
    return int(report.get("statusCodeDistribution", {}).get("OK", 0))


def _assign_body(key: str) -> str:
    subject = "cap-{{.RequestNumber}}"
    return f'{{"experiment": "{key}", "subject_id": "{subject}", {CONTEXT}}}'


def _create_experiment(address: str, secret: str, key: str) -> None:
    metadata = (("authorization", f"Bearer {_token(secret, 'ops_admin')}"),)
    experiment = experiment_pb2.Experiment(
        key=key,
        name="Capacity",
        allocation=experiment_pb2.ALLOCATION_STRATEGY_THOMPSON_SAMPLING,
        variants=[
            experiment_pb2.Variant(key="blue", name="Blue", is_control=True),
            experiment_pb2.Variant(key="green", name="Green"),
        ],
    )
    with grpc.insecure_channel(address) as channel:
        stub = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
        stub.CreateExperiment(
            lifecycle_service_pb2.CreateExperimentRequest(experiment=experiment),
            metadata=metadata,
            timeout=30,
        )
        stub.StartExperiment(
            lifecycle_service_pb2.StartExperimentRequest(experiment=key),
            metadata=metadata,
            timeout=30,
        )


async def _drained(stores: Stores, assignments: int, metrics: int, within: float = 120) -> None:
    """Wait until the write-behind has written what was acknowledged."""
    deadline = time.monotonic() + within
    while True:
        conn = await asyncpg.connect(stores.database)
        try:
            a = await conn.fetchval("SELECT count(*) FROM experiment_assignments")
            m = await conn.fetchval("SELECT count(*) FROM experiment_metrics")
        finally:
            await conn.close()
        if a >= assignments and m >= metrics:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"write-behind not drained: {a}/{assignments}, {m}/{metrics}")
        await asyncio.sleep(0.2)


async def measure(postgres: str, calls: int, concurrency: int, subjects: int) -> dict[str, object]:
    name = f"sira_capacity_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres)
    await admin.execute(f'CREATE DATABASE "{name}"')
    database = urlunsplit(urlsplit(postgres)._replace(path=f"/{name}"))
    workloads: list[Workload] = []
    idle: Workload | None = None
    try:
        await apply_migrations(database)
        with ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sira-cap-")))
            redis_port, redis_pid = stack.enter_context(_redis_server(workdir))
            secret = secrets.token_urlsafe(32)
            env = {
                **os.environ,
                "SIRA_DATABASE_URL": as_role(database),
                "SIRA_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "SIRA_GRPC_HOST": "127.0.0.1",
                "SIRA_GRPC_PORT": "0",
                "SIRA_METRICS_PORT": "0",
                "SIRA_JWT_SECRET": secret,
                "SIRA_DATA_DIR": str(workdir / "data"),
                "SIRA_ROLE": "all",
                "SIRA_SHUTDOWN_GRACE_SECONDS": "2",
                "SIRA_WORKERS": "1",
            }
            server = ExitStack()
            stack.callback(server.close)
            address, pid = server.enter_context(_sira_server(env, workdir / "sira.log"))
            stores = Stores(redis_port, redis_pid, database)
            key = "capacity"
            _create_experiment(address, secret, key)
            pay = _token(secret, "pay_module")
            load = ["-c", str(concurrency), "-n", str(calls), "--connections", "1"]

            await asyncio.sleep(1.0)  # the catalog and posteriors settle
            before = await stores.snapshot(pid)
            await asyncio.sleep(5.0)
            idle = _per_call("idle (per second)", 5, 5.0, before, await stores.snapshot(pid))

            # The same ids in every run: new in the first, returning afterwards.
            assign = ["--call", ASSIGN, "-d", _assign_body(key), *load]
            track = ["--scenario", "track-heavy", "--experiment", key,
                     "--subjects", str(subjects), *load]  # fmt: skip
            runs = [
                ("Assign, new subject", assign, True),
                ("Assign, returning, not cached in this process", assign, False),
                ("Assign, returning, cached in this process", assign, False),
                ("Track, new conversion", track, False),
            ]
            for title, args, new_subjects in runs:
                if title.startswith("Assign, returning, not cached"):
                    server.close()  # a fresh process: its sticky cache is empty
                    server = ExitStack()
                    stack.callback(server.close)
                    address, pid = server.enter_context(_sira_server(env, workdir / "sira2.log"))
                    await asyncio.sleep(1.0)
                start = await stores.snapshot(pid)
                began = time.monotonic()
                ok = _loadtest(address, pay, args)
                seconds = time.monotonic() - began
                new_rows = ok if new_subjects else 0
                new_events = ok if title.startswith("Track") else 0
                await _drained(stores, start.assignments + new_rows, start.metrics + new_events)
                end = await stores.snapshot(pid)
                workloads.append(_per_call(title, ok, seconds, start, end))
                print(f"{title}: {ok} calls in {seconds:.1f} s", file=sys.stderr)
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.close()
    return {
        "machine": describe_machine(),
        "settings": {"calls": calls, "concurrency": concurrency, "subjects": subjects},
        "idle": asdict(idle) if idle else None,
        "workloads": [asdict(w) for w in workloads],
    }


def render(result: Mapping[str, object]) -> str:
    rows = [
        "| workload | calls/s | server CPU µs/call | Redis CPU µs/call | Postgres CPU µs/call"
        " | Redis commands/call | Redis bytes in / out per call | Redis memory bytes/call"
        " | Postgres rows/call | Postgres commits/call | Postgres bytes/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    workloads = result["workloads"]
    assert isinstance(workloads, list)
    for w in workloads:
        rows.append(
            f"| {w['name']} | {w['calls'] / w['seconds']:,.0f} | {w['server_cpu_us']:.0f}"
            f" | {w['redis_cpu_us']:.0f} | {w['postgres_cpu_us']:.0f}"
            f" | {w['redis_commands']:.2f} | {w['redis_bytes_in']:.0f} / {w['redis_bytes_out']:.0f}"
            f" | {w['redis_memory_bytes']:.0f} | {w['postgres_rows']:.2f}"
            f" | {w['postgres_commits']:.3f} | {w['postgres_bytes']:.0f} |"
        )
    lines = ["\n".join(rows), ""]
    for w in workloads:
        top = ", ".join(f"{k} {v:.2f}" for k, v in w["commands"].items())
        lines.append(f"- {w['name']}: Redis commands per call: {top}")
    idle = result["idle"]
    if isinstance(idle, dict):
        lines.append(
            f"- idle, per second: server CPU {idle['server_cpu_us'] / 1e6:.3f} s,"
            f" Redis commands {idle['redis_commands']:.0f}"
        )
    lines.append(f"- machine: {result['machine']}, load average {result['loadavg']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sira_loadtest.capacity", description=__doc__)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "SIRA_CAPACITY_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a Postgres server DSN where a database may be created (and dropped)",
    )
    parser.add_argument("-n", "--calls", type=int, default=20_000, help="calls per workload")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("--subjects", type=int, default=1000, help="returning subjects")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    options = parser.parse_args(argv)
    result = asyncio.run(
        measure(options.postgres, options.calls, options.concurrency, options.subjects)
    )
    result["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    if options.json:
        options.json.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
