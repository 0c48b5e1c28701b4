"""`sira-server`: run the SIRA gRPC decision server, or one operator task
(`sira-server migrate|rebuild|deadletter|token`, see `sira_server.cli`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from sira_server import cli
from sira_server.config import ROLES, ConfigError, Settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sira-server",
        description="SIRA gRPC decision server. Settings come from SIRA_* environment "
        "variables (see README); with no SIRA_DATABASE_URL/SIRA_REDIS_URL it starts "
        "embedded Postgres and Redis in SIRA_DATA_DIR (default ./.sira).",
        epilog="operator tasks (each has --help): sira-server migrate | rebuild EXPERIMENT | "
        "deadletter list|replay | token --role ROLE",
    )
    parser.add_argument("--port", type=int, help="override SIRA_GRPC_PORT")
    parser.add_argument(
        "--role",
        choices=ROLES,
        help="override SIRA_ROLE: all (serve + write-behind flusher, the default), serve, "
        "or flusher (drain the write-behind streams only; external stores)",
    )
    parser.add_argument("--data-dir", help="override SIRA_DATA_DIR")
    parser.add_argument(
        "--workers", type=int, help="override SIRA_WORKERS (processes sharing the port)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in cli.COMMANDS:
        sys.exit(cli.main(argv))
    args = parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        sys.exit(f"sira-server: configuration error: {exc}")
    if args.port is not None:
        settings = replace(settings, grpc_port=args.port)
    if args.role is not None:
        settings = replace(settings, role=args.role)
    if args.data_dir is not None:
        settings = replace(settings, data_dir=Path(args.data_dir))
    if args.workers is not None:
        if args.workers < 1:
            sys.exit("sira-server: --workers must be at least 1")
        settings = replace(settings, workers=args.workers)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # every pg_ctl call at INFO
    # We fork only before any gRPC object exists (workers) or to exec a program
    # (embedded stores): grpc's fork handlers have nothing to do but log noise.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from sira_server.embedded import EmbeddedServerError
    from sira_server.errors import SiraError
    from sira_server.launcher import WorkerFailed, run
    from sira_server.store.migrate import MigrationError

    try:
        run(settings)
    except (ConfigError, EmbeddedServerError, MigrationError, WorkerFailed) as exc:
        sys.exit(f"sira-server: {exc}")
    except SiraError as exc:  # e.g. a store unreachable at start-up
        sys.exit(f"sira-server: {exc.message}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
