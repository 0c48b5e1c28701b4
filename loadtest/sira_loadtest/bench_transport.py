"""Benchmark: how the Lua scripts reach Redis, redis-py pipelines vs the script channel.

Both transports (`SIRA_SCRIPT_TRANSPORT=pipeline|channel`, coalescing on in both) serve
the same data: one `sira-server` is restarted on one data directory for each side, the
sides alternate round by round (ABBA...), and each round measures Assign and Track at
concurrency 16 and 64 through the real server. Reported: medians over the rounds of
calls/s, p50, p99 and the server process's own CPU per call (the embedded stores are
its children and not counted), and the channel's ratio to the pipeline from the same run.

    python -m sira_loadtest.bench_transport [--rounds 3] [--duration 5] [--write]

Then the transport alone: `HotState` in this process on a Redis (`--redis-url`, default
SIRA_REDIS_URL, else an embedded one), process CPU time per call. `make bench` runs both
parts; `--write` replaces the section between the markers in docs/design.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from sira_loadtest.bench import (
    BenchOptions,
    _launch_sira,
    _sira_env,
    mint_token,
    seed_experiment,
)
from sira_loadtest.bench_report import replace_section
from sira_loadtest.config import LoadConfig
from sira_loadtest.machine import describe_machine
from sira_loadtest.runner import preassign, run_load_detailed
from sira_server.embedded import EmbeddedRedis
from sira_server.store.hot_state import (
    STREAM_REGISTRY,
    HotState,
    TrackEvent,
    ensure_stream,
    experiment_keys,
)
from sira_server.store.redis_conn import RedisClient, create_redis
from sira_server.store.script_transport import default_transport

TRANSPORTS = ("pipeline", "channel")
BASELINE = "pipeline"
WORKLOADS = (("Assign", "assign-heavy"), ("Track", "track-heavy"))
CONCURRENCIES = (16, 64)
START = "<!-- bench-transport:start -->"
END = "<!-- bench-transport:end -->"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    transport: str
    workload: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_call: float
    ok_share: float
    errors: str = ""


def _own_ticks(pid: int) -> int:
    """utime + stime of one process (not its children)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


async def _measure(
    pid: int, config: LoadConfig, transport: str, workload: str, warmup: float
) -> Sample:
    await run_load_detailed(replace(config, duration=warmup), setup_scenario=False)
    ticks = _own_ticks(pid)
    report = (await run_load_detailed(config, setup_scenario=False)).report
    cpu_seconds = (_own_ticks(pid) - ticks) / CLOCK_TICKS
    statuses = report.status_code_distribution
    calls = max(report.count, 1)
    return Sample(
        transport=transport,
        workload=workload,
        concurrency=config.concurrency,
        rps=report.rps,
        p50_ms=(report.latency_ns(50) or 0) / 1e6,
        p99_ms=(report.latency_ns(99) or 0) / 1e6,
        cpu_us_per_call=cpu_seconds * 1e6 / calls,
        ok_share=statuses.get("OK", 0) / calls,
        errors=str(dict(list(report.error_distribution.items())[:2])),
    )


async def run(rounds: int, duration: float, warmup: float, subjects: int) -> list[Sample]:
    options = BenchOptions(duration=duration, warmup=warmup, startup_timeout=240.0)
    secret = secrets.token_urlsafe(32)
    experiment = f"bench-transport-{secrets.token_hex(4)}"
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="sira-bench-transport-") as tmp:
        tmp_dir = Path(tmp)
        base_env = _sira_env(tmp_dir, secret)
        preassigned: tuple[tuple[str, str], ...] = ()
        metadata = (("authorization", f"Bearer {mint_token(secret, 'pay_module')}"),)
        for round_index in range(rounds):
            order = TRANSPORTS if round_index % 2 == 0 else TRANSPORTS[::-1]
            for transport in order:
                env = {**base_env, "SIRA_SCRIPT_TRANSPORT": transport}
                print(f"round {round_index + 1}/{rounds}: {transport}", file=sys.stderr)
                with ExitStack() as stack:
                    log = tmp_dir / f"sira-{round_index}-{transport}.log"
                    server = _launch_sira(stack, env, log, options)
                    config = LoadConfig(
                        target=server.address,
                        experiment=experiment,
                        metadata=metadata,
                        returning_subjects=subjects,
                        timeout=10.0,
                        duration=duration,
                        duration_stop="wait",  # calls in flight at the end complete
                    )
                    if not preassigned:
                        await seed_experiment(
                            server.address, mint_token(secret, "ops_admin"), experiment
                        )
                        preassigned, _ = await preassign(replace(config, scenario="assign-heavy"))
                    config = replace(config, preassigned=preassigned)
                    for workload, scenario in WORKLOADS:
                        for concurrency in CONCURRENCIES:
                            sample = await _measure(
                                server.process.pid,
                                replace(config, scenario=scenario, concurrency=concurrency),
                                transport,
                                workload,
                                warmup,
                            )
                            print(f"  {sample}", file=sys.stderr)
                            samples.append(sample)
    return samples


# --- the transport alone: HotState in this process ---------------------------------------


@dataclass(frozen=True)
class CpuSample:
    transport: str
    call: str
    concurrency: int
    rps: float
    cpu_us_per_call: float


async def _ready_experiment(redis: RedisClient, variants: Sequence[str]) -> str:
    """An experiment's hot state as `init_experiment` leaves it, without Postgres."""
    experiment_id = f"bench-{secrets.token_hex(6)}"
    keys = experiment_keys(experiment_id)
    await redis.hset(keys.trials, mapping=dict.fromkeys(variants, 0))
    await redis.hset(keys.succ, mapping=dict.fromkeys(variants, 0))
    await ensure_stream(redis, keys)
    await redis.hset(keys.meta, mapping={"reward": "conversion", "ready": 1})
    return experiment_id


async def _hot_state_run(
    redis: RedisClient, transport: str, concurrency: int, calls: int
) -> list[CpuSample]:
    """`concurrency` callers, each making Assign then Track calls one after another through
    `HotState` (coalescing on): process CPU per call, the transport's cost on the server."""
    hot = HotState(redis, None, transport=default_transport(redis, transport))
    variants = ("a", "b")
    experiment_id = await _ready_experiment(redis, variants)
    per_caller = calls // concurrency
    samples = []
    try:
        await hot.assign(experiment_id, "warm", "a", 0.5)  # connect, load the scripts
        await hot.track(
            experiment_id, TrackEvent("warm", "a", "conversion", "warm", int(time.time() * 1000))
        )

        async def assign(caller: int) -> None:
            for i in range(per_caller):
                await hot.assign(experiment_id, f"s{caller}-{i}", variants[i % 2], 0.5)

        async def track(caller: int) -> None:
            now = int(time.time() * 1000)
            for i in range(per_caller):
                event = TrackEvent(
                    f"s{caller}-{i}", variants[i % 2], "conversion", f"e{caller}-{i}", now
                )
                await hot.track(experiment_id, event)

        for name, work in (("Assign", assign), ("Track", track)):
            wall, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(work(c) for c in range(concurrency)))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            total = per_caller * concurrency
            samples.append(CpuSample(transport, name, concurrency, total / wall, cpu * 1e6 / total))
    finally:
        await hot.close()
        await redis.delete(*experiment_keys(experiment_id).all)
        await redis.srem(STREAM_REGISTRY, experiment_keys(experiment_id).wb)
    return samples


async def run_hot_state(redis_url: str, rounds: int, calls: int) -> list[CpuSample]:
    redis = create_redis(redis_url)
    samples: list[CpuSample] = []
    try:
        for round_index in range(rounds):
            order = TRANSPORTS if round_index % 2 == 0 else TRANSPORTS[::-1]
            for transport in order:
                for concurrency in CONCURRENCIES:
                    got = await _hot_state_run(redis, transport, concurrency, calls)
                    print(f"  {got}", file=sys.stderr)
                    samples += got
    finally:
        await redis.aclose()
    return samples


def render_hot_state(samples: Sequence[CpuSample], rounds: int, calls: int) -> str:
    lines = [
        "",
        f"The transport alone: `HotState` in one process, {calls} calls per cell, "
        f"{rounds} rounds, medians. CPU: this process's CPU time per call (what the "
        "transport costs a server); ratio: channel / pipeline CPU (below 1 the channel is "
        "cheaper).",
        "",
        "| call | c | transport | calls/s | CPU µs/call | CPU ratio |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for call in ("Assign", "Track"):
        for concurrency in CONCURRENCIES:
            base = 0.0
            for transport in TRANSPORTS:
                cell = [
                    s
                    for s in samples
                    if (s.transport, s.call, s.concurrency) == (transport, call, concurrency)
                ]
                if not cell:
                    continue
                cpu = statistics.median(s.cpu_us_per_call for s in cell)
                base = cpu if transport == BASELINE else base
                lines.append(
                    f"| {call} | {concurrency} | {transport} | "
                    f"{statistics.median(s.rps for s in cell):,.0f} | {cpu:.0f} | "
                    f"{cpu / base if base else 0:.2f} |"
                )
    return "\n".join(lines) + "\n"


def _median(samples: Sequence[Sample], attribute: str) -> float:
    return float(statistics.median(float(getattr(s, attribute)) for s in samples))


def render(samples: Sequence[Sample], rounds: int, duration: float) -> str:
    machine = describe_machine()
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine['cpu']}, "
        f"{machine['cores']} cores (shared with other work); "
        f"{rounds} rounds of {duration:g} s per cell, sides alternating; medians. "
        "CPU: the sira-server process only, per call. Ratio: channel / pipeline "
        "(calls/s; above 1 the channel is faster).",
        "",
        "| call | c | transport | calls/s | p50 ms | p99 ms | server CPU µs/call | ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for workload, _ in WORKLOADS:
        for concurrency in CONCURRENCIES:
            base_rps = 0.0
            for transport in TRANSPORTS:
                cell = [
                    s
                    for s in samples
                    if (s.transport, s.workload, s.concurrency)
                    == (transport, workload, concurrency)
                ]
                if not cell:
                    continue
                rps = _median(cell, "rps")
                if transport == BASELINE:
                    base_rps = rps
                ratio = f"{rps / base_rps:.2f}" if base_rps else ""
                failed = min(s.ok_share for s in cell) < 1.0
                lines.append(
                    f"| {workload} | {concurrency} | {transport} | {rps:,.0f}"
                    f"{' (errors)' if failed else ''} | {_median(cell, 'p50_ms'):.2f} | "
                    f"{_median(cell, 'p99_ms'):.2f} | {_median(cell, 'cpu_us_per_call'):.0f} | "
                    f"{ratio} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sira_loadtest.bench_transport")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--write", type=Path, nargs="?", const=Path("docs/design.md"))
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SIRA_REDIS_URL"),
        help="Redis of the in-process part (default SIRA_REDIS_URL; none: an embedded one)",
    )
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--server", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    started = time.monotonic()
    body = ""
    if args.server:
        samples = asyncio.run(run(args.rounds, args.duration, args.warmup, args.subjects))
        body += render(samples, args.rounds, args.duration)
    with tempfile.TemporaryDirectory(prefix="sira-bench-redis-") as tmp:
        embedded = None if args.redis_url else EmbeddedRedis(Path(tmp))
        url = args.redis_url if embedded is None else embedded.start()
        try:
            cpu = asyncio.run(run_hot_state(url, args.rounds, args.calls))
        finally:
            if embedded is not None:
                embedded.stop()
    body += render_hot_state(cpu, args.rounds, args.calls)
    print(body)
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.write is not None:
        replace_section(args.write, body, start=START, end=END)


if __name__ == "__main__":
    main()
