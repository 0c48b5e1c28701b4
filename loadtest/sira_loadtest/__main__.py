"""`sira-loadtest`: a ghz-compatible gRPC load generator (flags and report).

    sira-loadtest --insecure --call sira.experiments.v1.AssignmentService.Assign \\
        -d '{"experiment": "checkout", "subject_id": "{{subject:mix 80 1000}}"}' \\
        --token "$TOKEN" -c 64 -z 10s 127.0.0.1:50051

See docs/loadtest.md for the template syntax, the scenarios and the report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sira_loadtest.config import (
    SCENARIOS,
    ConfigError,
    LoadConfig,
    is_loopback,
    normalize_call,
    parse_duration,
)
from sira_loadtest.runner import run_load_detailed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sira-loadtest",
        description="ghz-compatible gRPC load generator for SIRA (generic unary calls on "
        "pre-serialised bytes, grpc.aio, optional worker processes).",
    )
    p.add_argument("host", help="target host:port (loopback expected)")
    p.add_argument("--call", default="", help="method: package.Service.Method or .../Method")
    p.add_argument("-c", "--concurrency", type=int, default=50, help="calls in flight (50)")
    p.add_argument("-n", "--total", type=int, default=200, help="number of calls (200)")
    p.add_argument("-z", "--duration", help="send for this long (10s, 1m); overrides -n")
    p.add_argument("-r", "--rps", type=float, default=0.0, help="rate limit, all workers (0: none)")
    p.add_argument("-d", "--data", default="", help="request as proto JSON template")
    p.add_argument("-D", "--data-file", help="read the -d template from a file ('-': stdin)")
    p.add_argument("--connections", type=int, default=1, help="gRPC channels (1)")
    p.add_argument("--workers", type=int, default=1, help="OS processes, merged report (1)")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plaintext (default for loopback targets)",
    )
    p.add_argument("--tls", action="store_true", help="use TLS even on loopback")
    p.add_argument("--token", help="bearer token (adds the authorization metadata)")
    p.add_argument("-m", "--metadata", help='JSON object, e.g. \'{"authorization": "Bearer x"}\'')
    p.add_argument("-t", "--timeout", default="20s", help="per-call deadline (20s)")
    p.add_argument(
        "-O", "--format", default="summary", choices=("summary", "json", "pretty"), dest="fmt"
    )
    p.add_argument("-o", "--output", help="write the report to this file instead of stdout")
    p.add_argument("--scenario", choices=SCENARIOS, help="predefined call mix")
    p.add_argument("--experiment", default="", help="experiment id or key for scenarios")
    p.add_argument("--subjects", type=int, default=1000, help="returning-subject pool (1000)")
    p.add_argument("--subject-prefix", default="lt-", help="prefix of made-up ids (lt-)")
    p.add_argument("--name", default="", help="label copied into the report")
    return p


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    pairs: dict[str, str] = {}
    if args.metadata:
        try:
            raw = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"-m/--metadata is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError("-m/--metadata must be a JSON object")
        pairs.update({str(k).lower(): str(v) for k, v in raw.items()})
    if args.token:
        pairs["authorization"] = f"Bearer {args.token}"
    return tuple(pairs.items())


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    data = args.data
    if args.data_file:
        data = sys.stdin.read() if args.data_file == "-" else Path(args.data_file).read_text()
    loopback = is_loopback(args.host)
    insecure = (loopback and not args.tls) if args.insecure is None else True
    config = LoadConfig(
        target=args.host,
        call=normalize_call(args.call) if args.call else "",
        concurrency=args.concurrency,
        total=args.total,
        duration=parse_duration(args.duration) if args.duration else None,
        rps=args.rps,
        connections=args.connections,
        workers=args.workers,
        insecure=insecure,
        metadata=_metadata(args),
        timeout=parse_duration(args.timeout),
        data=data,
        scenario=args.scenario or "",
        experiment=args.experiment,
        returning_subjects=args.subjects,
        subject_prefix=args.subject_prefix,
        name=args.name,
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
    except ConfigError as exc:
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
