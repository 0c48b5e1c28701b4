"""Server-side CPU per call, read from /proc: `python -m sira_loadtest.bench_cpu`.

`make bench` runs it (its own section of docs/benchmarks.md). For each server under
test (a *stack*) the bench starts its own Redis and Postgres (the embedded ones,
`sira_server.embedded`, so their process ids are known), applies the migrations,
and starts `sira-server` on them: by default once with the write-behind flusher
in-process (`--role all`) and once as `--role serve` plus a `--role flusher`
process. `--before PYTHON` adds a stack run by another interpreter (another
checkout's venv) on the same kind of stores, for before/after comparisons.

Then, in rounds, one scenario after the other on every stack in turn (so a
disturbance on the shared machine hits all stacks alike): echo (a do-nothing
grpc.aio server), Assign of a new subject, Assign of a returning subject (sticky
hit), Track, TrackBatch of 100 events. Each run: warm-up, wait until the
write-behind streams are empty, read the CPU ticks (utime+stime, plus reaped
children) of every process of the stack, run the load with sira-loadtest, wait
again until the flusher has written every record into Postgres, read the ticks
again. The difference, per group (server, flusher, Redis, Postgres: the
postmaster and all its children), divided by the calls answered OK, is the CPU
per call; the load client's own CPU is never counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from sira_loadtest.bench_cpu_report import (
    CURRENT,
    ECHO,
    ECHO_TOKEN,
    ECHO_UVLOOP,
    GROUPS,
    SCENARIOS,
    CpuResult,
    CpuRun,
    Scenario,
    render_markdown,
)
from sira_loadtest.bench_profile import breakdown_table, start_py_spy, summarize
from sira_loadtest.bench_profile import table as profile_table
from sira_loadtest.bench_report import read_loadavg, replace_section
from sira_loadtest.config import LoadConfig, parse_duration
from sira_loadtest.echo import ECHO_METHOD
from sira_loadtest.machine import describe_machine
from sira_loadtest.runner import preassign, run_load_detailed

SECTION_START = "<!-- bench:cpu start -->"
SECTION_END = "<!-- bench:cpu end -->"
DRAIN_TIMEOUT = 300.0
"""Seconds to wait for the write-behind streams to empty after a run."""
SIRA_READY = "SIRA listening on "
FLUSHER_READY = "SIRA write-behind flusher running"
ECHO_READY = "echo listening on "


# --- /proc ---------------------------------------------------------------------------


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks: utime+stime of the process and its reaped children)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return table


def echo_ticks(pid: int) -> dict[str, int]:
    """CPU ticks of one echo server process, as a stack's `ticks`."""
    return group_ticks(process_table(), {"server": [pid]})


def descendants(table: Mapping[int, tuple[int, int]], root: int) -> set[int]:
    """`root` and every process below it in a `process_table()`."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    seen: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return seen


def group_ticks(
    table: Mapping[int, tuple[int, int]], groups: Mapping[str, Sequence[int]]
) -> dict[str, int]:
    """CPU ticks per group; a group is the trees of its root pids (0: no such process)."""
    return {
        name: sum(
            table[pid][1]
            for root in roots
            if root
            for pid in descendants(table, root)
            if pid in table
        )
        for name, roots in groups.items()
    }


# --- processes -------------------------------------------------------------------------


@dataclass
class Launched:
    process: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextmanager
def launch(
    command: Sequence[str], env: Mapping[str, str], ready: str, log_path: Path, timeout: float
) -> Iterator[Launched]:
    """Run `command`, wait for a log line starting with `ready`, SIGTERM it on exit."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, env=dict(env)
        )
    launched = Launched(process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            text = log_path.read_text(errors="replace")
            lines = [line for line in text.splitlines() if line.startswith(ready)]
            if lines:
                launched.address = lines[0][len(ready) :].strip()
                break
            if process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(text.splitlines()[-20:])
                raise RuntimeError(f"{' '.join(command)} did not get ready:\n{tail}")
            time.sleep(0.1)
        yield launched
    finally:
        launched.stop()


# --- one server under test ---------------------------------------------------------------


@dataclass(frozen=True)
class StackSpec:
    label: str
    python: str
    split_flusher: bool = False
    """`--role serve` plus a `--role flusher` process instead of `--role all`."""


@dataclass
class Stack:
    spec: StackSpec
    address: str
    redis_url: str
    pids: dict[str, list[int]]
    experiment: str
    metadata: tuple[tuple[str, str], ...]
    preassigned: tuple[tuple[str, str], ...] = ()

    def ticks(self) -> dict[str, int]:
        return group_ticks(process_table(), self.pids)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])


async def start_stack(
    stack: ExitStack, spec: StackSpec, tmp_dir: Path, options: CpuOptions
) -> Stack:
    """Own Redis and Postgres, migrated; sira-server (and its flusher) on them; seeded."""
    from sira_loadtest.bench import mint_token, seed_experiment
    from sira_server.embedded import EmbeddedServers
    from sira_server.store.migrate import apply_migrations
    from sira_server.store.roles import as_role

    data_dir = tmp_dir / _slug(spec.label)
    stores = EmbeddedServers(data_dir / "stores")
    database_url, redis_url = await asyncio.to_thread(stores.start)
    stack.callback(stores.stop)
    await apply_migrations(database_url)
    redis_pid = stores.redis.pid or 0
    postgres_pid = _postmaster_pid(stores.postgres.pgdata)
    secret = secrets.token_urlsafe(32)
    env = {
        **os.environ,
        "SIRA_DATABASE_URL": as_role(database_url),
        "SIRA_REDIS_URL": redis_url,
        "SIRA_GRPC_HOST": "127.0.0.1",
        "SIRA_GRPC_PORT": "0",
        "SIRA_METRICS_PORT": "0",
        "SIRA_HTTP_PORT": "0",  # any free port: several stacks run at once
        "SIRA_JWT_SECRET": secret,
        "SIRA_DATA_DIR": str(data_dir / "sira"),
        "SIRA_SHUTDOWN_GRACE_SECONDS": "5",
        "SIRA_WORKERS": "1",
    }
    server_args = [spec.python, "-m", "sira_server"]
    role = ["--role", "serve"] if spec.split_flusher else []
    print(f"cpu bench: starting {spec.label}", file=sys.stderr)
    server = stack.enter_context(
        launch(server_args + role, env, SIRA_READY, data_dir / "server.log", options.timeout)
    )
    pids: dict[str, list[int]] = {
        "server": [server.process.pid],
        "flusher": [],
        "redis": [redis_pid],
        "postgres": [postgres_pid],
    }
    if spec.split_flusher:
        flusher = stack.enter_context(
            launch(
                [*server_args, "--role", "flusher"],
                env,
                FLUSHER_READY,
                data_dir / "flusher.log",
                options.timeout,
            )
        )
        pids["flusher"] = [flusher.process.pid]
    experiment = f"cpu-{secrets.token_hex(4)}"
    await seed_experiment(server.address, mint_token(secret, "ops_admin"), experiment)
    metadata = (("authorization", f"Bearer {mint_token(secret, 'pay_module')}"),)
    result = Stack(spec, server.address, redis_url, pids, experiment, metadata)
    assigned, statuses = await preassign(
        LoadConfig(
            target=server.address,
            experiment=experiment,
            metadata=metadata,
            returning_subjects=options.subjects,
            scenario="assign-returning",
            timeout=10.0,
        )
    )
    if len(assigned) < options.subjects:
        raise RuntimeError(f"{spec.label}: pre-assignment answered {statuses}")
    result.preassigned = assigned
    return result


async def write_behind_backlog(redis_url: str) -> int:
    """Records in the write-behind streams not yet in Postgres (acked ones are deleted)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        streams = await client.smembers("sira:streams")
        total = 0
        for stream in streams:
            total += int(await client.xlen(stream))
        return total
    finally:
        await client.aclose()


async def wait_drained(stack: Stack) -> float:
    """Seconds until the flusher has written every record; RuntimeError past the deadline."""
    began = time.monotonic()
    while (left := await write_behind_backlog(stack.redis_url)) > 0:
        if time.monotonic() - began > DRAIN_TIMEOUT:
            raise RuntimeError(f"{stack.spec.label}: {left} records still not flushed")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


# --- measuring -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuOptions:
    duration: float = 8.0
    warmup: float = 1.0
    concurrency: int = 16
    rounds: int = 3
    subjects: int = 2000
    timeout: float = 240.0
    others: tuple[tuple[str, str], ...] = ()
    """(label, python): other checkouts' servers measured alongside (before/after)."""
    split: bool = True
    """Also measure `--role serve` + a `--role flusher` process."""
    markdown: Path | None = Path("docs/benchmarks.md")
    json_path: Path = Path("docs/benchmarks-cpu.json")
    only: tuple[str, ...] = ()
    render: Path | None = None
    """Report this earlier run's JSON instead of measuring."""
    rps: float = 0.0
    """Fixed offered rate (open loop) for every run but TrackBatch's; 0: closed loop."""
    pairs: tuple[tuple[str, str], ...] = ()
    """(after, before) labels compared in the before/after table; default: the current
    server against each `others`."""
    profile: Path | None = None
    """py-spy the server during each run into this directory (numbers then disturbed)."""
    native: bool = False
    """Profile with C frames too (py-spy --native)."""
    """Scenario names to run (all when empty)."""


def _load_config(
    stack: Stack | None, scenario: Scenario, address: str, options: CpuOptions
) -> LoadConfig:
    base = LoadConfig(
        target=address,
        concurrency=options.concurrency,
        duration=options.duration,
        timeout=30.0,
        duration_stop="wait",
        name=scenario.name,
    )
    if options.rps > 0 and scenario.events_per_call == 1:
        base = replace(base, rps=options.rps)
    if stack is None:
        return replace(base, call=ECHO_METHOD)
    return replace(
        base,
        scenario=scenario.scenario,
        experiment=stack.experiment,
        metadata=stack.metadata,
        preassigned=stack.preassigned,
        returning_subjects=len(stack.preassigned),
    )


async def measure(
    label: str,
    scenario: Scenario,
    config: LoadConfig,
    pids: Callable[[], dict[str, int]],
    stack: Stack | None,
    options: CpuOptions,
    profile_pid: int,
) -> CpuRun:
    if options.warmup > 0:
        await run_load_detailed(replace(config, duration=options.warmup), setup_scenario=False)
    if stack is not None:
        await wait_drained(stack)
    spy = None
    if options.profile is not None:
        options.profile.mkdir(parents=True, exist_ok=True)
        raw = options.profile / f"{_slug(label)}-{_slug(scenario.name)}.txt"
        spy = start_py_spy(profile_pid, raw, options.duration, native=options.native)
    before = pids()
    began = time.monotonic()
    run = await run_load_detailed(config, setup_scenario=False)
    seconds = time.monotonic() - began
    if spy is not None and options.profile is not None:
        await asyncio.to_thread(spy.wait, 60)
        collapsed = raw.read_text() if raw.exists() else ""
        if collapsed:
            title = f"### {scenario.name} ({label}): py-spy of the server process"
            parts = breakdown_table(collapsed)
            text = "\n".join([title, "", *parts, *profile_table(summarize(collapsed))])
            raw.with_suffix(".md").write_text(text + "\n")
    drain = await wait_drained(stack) if stack is not None else 0.0
    after = pids()
    ok = run.report.status_code_distribution.get("OK", 0)
    return CpuRun(
        stack=label,
        scenario=scenario.name,
        calls=run.report.count,
        ok=ok,
        events=ok * scenario.events_per_call,
        seconds=seconds,
        drain_seconds=drain,
        ticks={g: after.get(g, 0) - before.get(g, 0) for g in GROUPS},
    )


async def check_track_batch(stack: Stack) -> str:
    """Problem text when one TrackBatch of the scenario's kind is not wholly accepted."""
    import random

    import grpc

    from sira.experiments.v1 import tracking_service_pb2
    from sira_loadtest.scenarios import TrackBatches, TrackConversions
    from sira_loadtest.template import IdFactory, RenderContext

    source = TrackBatches(TrackConversions(stack.experiment, stack.preassigned))
    ctx = RenderContext("probe", random.Random(1), IdFactory("probe-", secrets.token_hex(4), 0))
    method, body = source.next_call(ctx)
    async with grpc.aio.insecure_channel(stack.address) as channel:
        call = channel.unary_unary(
            method,
            request_serializer=None,
            response_deserializer=tracking_service_pb2.TrackBatchResponse.FromString,
        )
        response = await call(body, metadata=stack.metadata, timeout=30)
    rejected = [r.error.message for r in response.results if r.WhichOneof("result") != "accepted"]
    if rejected:
        return f"{stack.spec.label}: TrackBatch rejected {len(rejected)} events: {rejected[0]}"
    return ""


def stack_specs(options: CpuOptions) -> list[StackSpec]:
    specs = [StackSpec(CURRENT, sys.executable)]
    if options.split:
        specs.append(StackSpec(f"{CURRENT}, flusher apart", sys.executable, split_flusher=True))
    specs += [StackSpec(label, python) for label, python in options.others]
    return specs


async def run_cpu_bench(options: CpuOptions) -> CpuResult:
    specs = stack_specs(options)
    result = CpuResult(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=describe_machine(),
        settings={
            "duration": options.duration,
            "warmup": options.warmup,
            "concurrency": options.concurrency,
            "rounds": options.rounds,
            "subjects": options.subjects,
            "stacks": [asdict(s) for s in specs],
            "pairs": [list(p) for p in options.pairs],
            "loadavg_start": read_loadavg(),
        },
    )
    scenarios = [
        s for s in SCENARIOS if not options.only or s.name in options.only or s is SCENARIOS[0]
    ]
    with tempfile.TemporaryDirectory(prefix="sira-cpu-") as tmp, ExitStack() as stack:
        tmp_dir = Path(tmp)
        echoes = {
            loop: stack.enter_context(
                launch(
                    [sys.executable, "-m", "sira_loadtest.echo", "--port", "0", "--loop", loop],
                    os.environ,
                    ECHO_READY,
                    tmp_dir / f"echo-{loop}.log",
                    60,
                )
            )
            for loop in ("asyncio", "uvloop")
        }
        stacks = [await start_stack(stack, spec, tmp_dir, options) for spec in specs]
        for s in stacks:
            if problem := await check_track_batch(s):
                result.problems.append(problem)
        for round_index in range(options.rounds):
            # Alternate the order of the stacks from one round to the next.
            order = stacks if round_index % 2 == 0 else stacks[::-1]
            for scenario in scenarios:
                clock = datetime.now(UTC).strftime("%H:%M:%S")
                print(
                    f"{clock} cpu bench round {round_index + 1}: {scenario.name}", file=sys.stderr
                )
                if scenario.name == ECHO:
                    token = stacks[0].metadata
                    for label, loop, metadata in (
                        ("echo", "asyncio", ()),
                        (ECHO_TOKEN, "asyncio", token),
                        (ECHO_UVLOOP, "uvloop", token),
                    ):
                        echo = echoes[loop]
                        config = _load_config(None, scenario, echo.address, options)
                        run = await measure(
                            label,
                            scenario,
                            replace(config, metadata=metadata),
                            partial(echo_ticks, echo.process.pid),
                            None,
                            options,
                            echo.process.pid,
                        )
                        result.runs.append(replace(run, round=round_index))
                    continue
                for s in order:
                    config = _load_config(s, scenario, s.address, options)
                    run = await measure(
                        s.spec.label, scenario, config, s.ticks, s, options, s.pids["server"][0]
                    )
                    result.runs.append(replace(run, round=round_index))
    result.settings["loadavg_end"] = read_loadavg()
    return result


def parse_args(argv: list[str] | None) -> CpuOptions:
    p = argparse.ArgumentParser(prog="python -m sira_loadtest.bench_cpu", description=__doc__)
    p.add_argument("-z", "--duration", default="8s", help="per measured run (8s)")
    p.add_argument("--warmup", default="1s", help="unmeasured load before each run (1s)")
    p.add_argument("-c", "--concurrency", type=int, default=16, help="calls in flight (16)")
    p.add_argument("--rounds", type=int, default=3, help="runs of every scenario (3)")
    p.add_argument("--subjects", type=int, default=2000, help="returning subjects (2000)")
    p.add_argument(
        "--other",
        action="append",
        default=[],
        metavar="LABEL=PYTHON",
        help="also measure the sira-server of this interpreter (another checkout's venv); "
        "repeatable. Each is compared with this checkout in a before/after table",
    )
    p.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="AFTER/BEFORE",
        help="labels to compare in the before/after table (repeatable; default: current "
        "against each --other)",
    )
    p.add_argument("--no-split", action="store_true", help="skip the --role serve + flusher server")
    p.add_argument("--only", action="append", default=[], help="scenario name (repeatable)")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="py-spy the server of each run into DIR (needs py-spy; skews the numbers)",
    )
    p.add_argument(
        "--rps",
        type=float,
        default=0.0,
        help="offer this many calls/s (open loop) in every run but TrackBatch's",
    )
    p.add_argument("--native", action="store_true", help="--profile with C frames")
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: print (and --write) the report of an earlier run's JSON",
    )
    p.add_argument("--write", type=Path, default=None, help="markdown file to update")
    p.add_argument("--json", type=Path, default=CpuOptions.json_path, dest="json_path")
    a = p.parse_args(argv)
    return CpuOptions(
        duration=parse_duration(a.duration),
        warmup=parse_duration(a.warmup),
        concurrency=a.concurrency,
        rounds=max(1, a.rounds),
        subjects=a.subjects,
        others=tuple(_other(p, text) for text in a.other),
        pairs=tuple(_pair(p, text) for text in a.pair),
        split=not a.no_split,
        markdown=a.write,
        json_path=a.json_path,
        only=tuple(a.only),
        profile=a.profile,
        native=a.native,
        rps=a.rps,
        render=a.render,
    )


def _other(parser: argparse.ArgumentParser, text: str) -> tuple[str, str]:
    label, sep, python = text.partition("=")
    if not sep or not label or not python or label.startswith(CURRENT) or label == "echo":
        parser.error(f"--other {text!r}: expected LABEL=PYTHON, LABEL not '{CURRENT}...'")
    return label, python


def _pair(parser: argparse.ArgumentParser, text: str) -> tuple[str, str]:
    after, sep, before = text.partition("/")
    if not sep or not after or not before:
        parser.error(f"--pair {text!r}: expected AFTER/BEFORE labels")
    return after, before


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds the ExitStack: every server and store is stopped


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if options.render is not None:
        result = CpuResult.from_json(json.loads(options.render.read_text()))
    else:
        result = asyncio.run(run_cpu_bench(options))
    text = render_markdown(result)
    print(text)
    if options.render is None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if options.markdown is not None:
        replace_section(options.markdown, text, start=SECTION_START, end=SECTION_END)


if __name__ == "__main__":
    main()


def run_as_step(markdown: Path, extra: Sequence[str] = (), timeout: float = 1800.0) -> str | None:
    """`make bench`'s step: this module in its own process, writing its section of
    `markdown`; a problem, or None."""
    print("measuring server CPU per call (bench_cpu)", file=sys.stderr)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sira_loadtest.bench_cpu", "--write", str(markdown), *extra],
            stdout=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"CPU per call not measured: {exc}"
    if done.returncode != 0:
        return f"CPU per call not measured: bench_cpu exited with {done.returncode}"
    return None
