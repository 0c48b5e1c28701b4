"""`sira-loadtest`: a ghz-compatible gRPC load generator (flags and report).

    sira-loadtest --insecure --call sira.experiments.v1.AssignmentService.Assign \\
        -d '{"experiment": "checkout", "subject_id": "{{subject:mix 80 1000}}"}' \\
        --token "$TOKEN" -c 64 -z 10s 127.0.0.1:50051
    sira-loadtest --call grpc.health.v1.Health/Check -n 1000 127.0.0.1:50051  # reflection

See docs/loadtest.md for the template syntax, the scenarios and the report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sira_loadtest.config import (
    DURATION_STOPS,
    SCENARIOS,
    ConfigError,
    LoadConfig,
    TlsOptions,
    is_loopback,
    normalize_call,
    parse_duration,
)
from sira_loadtest.report import FORMATS
from sira_loadtest.runner import ConnectError, run_load_detailed
from sira_loadtest.schedules import KINDS, Schedule


def _add_schedule(p: argparse.ArgumentParser, name: str, step_default: float) -> None:
    what = "RPS" if name == "load" else "concurrency"
    p.add_argument(
        f"--{name}-schedule", default="const", choices=KINDS, help=f"{what} schedule (const)"
    )
    p.add_argument(f"--{name}-start", type=float, default=0, help=f"{what} at the start")
    p.add_argument(f"--{name}-end", type=float, default=0, help=f"{what} where changes stop")
    p.add_argument(
        f"--{name}-step", type=float, default=step_default, help="change per step / per second"
    )
    p.add_argument(f"--{name}-step-duration", default="0", help="duration of a step (step)")
    p.add_argument(f"--{name}-max-duration", default="0", help="changes stop after this long")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sira-loadtest",
        description="ghz-compatible gRPC load generator (generic unary calls on pre-serialised "
        "bytes, grpc.aio, optional worker processes). See docs/loadtest.md.",
    )
    p.add_argument("host", help="target host:port")
    p.add_argument("--call", default="", help="method: package.Service.Method or .../Method")
    p.add_argument("--proto", default="", help=".proto file of the call (needs grpcio-tools)")
    p.add_argument(
        "--protoset", action="append", default=[], help="compiled descriptor set (repeatable)"
    )
    p.add_argument("-i", "--import-paths", default="", help="comma-separated --proto imports")
    p.add_argument("-c", "--concurrency", type=int, default=50, help="calls in flight (50)")
    _add_schedule(p, "concurrency", 1)
    p.add_argument("-n", "--total", type=int, default=200, help="number of calls (200)")
    p.add_argument("-z", "--duration", help="send for this long (10s, 1m); overrides -n")
    p.add_argument("-x", "--max-duration", help="stop after this long even if -n is not done")
    p.add_argument(
        "--duration-stop",
        default="close",
        choices=DURATION_STOPS,
        help="calls in flight when -z/-x runs out: close (count as errors), wait, ignore",
    )
    p.add_argument("-r", "--rps", type=float, default=0.0, help="open-loop rate (0: closed loop)")
    _add_schedule(p, "load", 0)
    p.add_argument("-d", "--data", default="", help="request as proto JSON ('@': stdin)")
    p.add_argument("-D", "--data-file", help="JSON request or array of requests ('-': stdin)")
    p.add_argument("-b", "--binary", action="store_true", help="serialised request on stdin")
    p.add_argument("-B", "--binary-file", help="serialised request in a file")
    p.add_argument("-m", "--metadata", help='JSON object, e.g. \'{"authorization": "Bearer x"}\'')
    p.add_argument("-M", "--metadata-file", help="-m from a file")
    p.add_argument("--reflect-metadata", help="JSON metadata of the reflection requests only")
    p.add_argument("--token", help="bearer token (adds the authorization metadata)")
    p.add_argument("--connections", type=int, default=1, help="gRPC channels (1)")
    p.add_argument("--workers", type=int, default=1, help="OS processes, merged report (1)")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plaintext (default for loopback targets without TLS flags)",
    )
    p.add_argument("--tls", action="store_true", help="use TLS even on loopback")
    p.add_argument("--cacert", default="", help="roots that verify the server (PEM)")
    p.add_argument("--cert", default="", help="client certificate (PEM), with --key")
    p.add_argument("--key", default="", help="client private key (PEM), with --cert")
    p.add_argument("--cname", default="", help="server name expected in its certificate")
    p.add_argument("--skipTLS", action="store_true", help="trust any server certificate")
    p.add_argument("--authority", default="", help=":authority header")
    p.add_argument("--connect-timeout", default="10s", help="first connection deadline (10s)")
    p.add_argument("--keepalive", default="0", help="keepalive ping interval (0: none)")
    p.add_argument("-t", "--timeout", default="20s", help="per-call deadline (20s; 0: none)")
    p.add_argument("--skipFirst", type=int, default=0, help="leave the first N results out")
    p.add_argument("--count-errors", action="store_true", help="errors count in latency stats")
    p.add_argument("-O", "--format", default="summary", choices=FORMATS, dest="fmt")
    p.add_argument("-o", "--output", help="write the report to this file instead of stdout")
    p.add_argument("--scenario", choices=SCENARIOS, help="predefined SIRA call mix")
    p.add_argument("--experiment", default="", help="experiment id or key for scenarios")
    p.add_argument("--subjects", type=int, default=1000, help="returning-subject pool (1000)")
    p.add_argument("--subject-prefix", default="lt-", help="prefix of made-up ids (lt-)")
    p.add_argument("--name", default="", help="label copied into the report")
    p.add_argument("--tags", help="JSON object of string tags copied into the report")
    return p


def _json_object(text: str, flag: str, *, lower: bool = True) -> dict[str, str]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{flag} must be a JSON object")
    return {(str(k).lower() if lower else str(k)): str(v) for k, v in raw.items()}


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    pairs: dict[str, str] = {}
    if args.metadata_file:
        pairs.update(_json_object(Path(args.metadata_file).read_text(), "-M/--metadata-file"))
    if args.metadata:
        pairs.update(_json_object(args.metadata, "-m/--metadata"))
    if args.token:
        pairs["authorization"] = f"Bearer {args.token}"
    return tuple(pairs.items())


def _data(args: argparse.Namespace) -> str:
    if args.data_file:
        return sys.stdin.read() if args.data_file == "-" else Path(args.data_file).read_text()
    if args.data.strip() == "@":
        return sys.stdin.read()
    return str(args.data)


def _schedule(args: argparse.Namespace, name: str) -> Schedule:
    def get(field: str) -> Any:
        return getattr(args, f"{name}_{field}")

    return Schedule(
        kind=get("schedule"),
        start=get("start"),
        step=get("step"),
        end=get("end"),
        step_duration=parse_duration(get("step_duration")),
        max_duration=parse_duration(get("max_duration")),
    )


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    tls = TlsOptions(
        cacert=args.cacert,
        cert=args.cert,
        key=args.key,
        cname=args.cname,
        skip_verify=args.skipTLS,
        authority=args.authority,
    )
    wants_tls = args.tls or any((tls.cacert, tls.cert, tls.cname, tls.skip_verify))
    insecure = (is_loopback(args.host) and not wants_tls) if args.insecure is None else True
    binary = b""
    if args.binary_file:
        binary = Path(args.binary_file).read_bytes()
    elif args.binary:
        binary = sys.stdin.buffer.read()
    reflect = args.reflect_metadata
    config = LoadConfig(
        target=args.host,
        call=normalize_call(args.call) if args.call else "",
        concurrency=args.concurrency,
        concurrency_schedule=_schedule(args, "concurrency"),
        total=args.total,
        duration=parse_duration(args.duration) if args.duration else None,
        max_duration=parse_duration(args.max_duration) if args.max_duration else None,
        duration_stop=args.duration_stop,
        rps=args.rps,
        load=_schedule(args, "load"),
        connections=args.connections,
        workers=args.workers,
        insecure=insecure,
        tls=tls,
        connect_timeout=parse_duration(args.connect_timeout),
        keepalive=parse_duration(args.keepalive),
        metadata=_metadata(args),
        reflect_metadata=tuple(_json_object(reflect, "--reflect-metadata").items())
        if reflect
        else (),
        timeout=parse_duration(args.timeout),
        data="" if binary else _data(args),
        binary=binary,
        proto=args.proto,
        protoset=tuple(args.protoset),
        import_paths=tuple(p for p in args.import_paths.split(",") if p),
        skip_first=args.skipFirst,
        count_errors=args.count_errors,
        scenario=args.scenario or "",
        experiment=args.experiment,
        returning_subjects=args.subjects,
        subject_prefix=args.subject_prefix,
        name=args.name,
        tags=tuple(_json_object(args.tags, "--tags", lower=False).items()) if args.tags else (),
    )
    config.validate()
    return config


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (ConfigError, OSError) as exc:
        sys.exit(f"sira-loadtest: {exc}")
    if not is_loopback(config.target):
        print(
            f"sira-loadtest: warning: {config.target} is not a loopback address; "
            "this tool is meant for local benchmarks",
            file=sys.stderr,
        )
    try:
        run = asyncio.run(run_load_detailed(config))
    except (ConfigError, ConnectError) as exc:
        sys.exit(f"sira-loadtest: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
    if run.setup_statuses and run.preassigned == 0:
        print(
            f"sira-loadtest: warning: pre-assignment got no variant {run.setup_statuses}; "
            "Track calls name no variant",
            file=sys.stderr,
        )
    text = run.report.render(args.fmt)
    if args.output:
        Path(args.output).write_text(text if text.endswith("\n") else text + "\n")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


if __name__ == "__main__":
    main()
