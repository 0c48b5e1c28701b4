"""`sira-server migrate|rebuild|deadletter|token`: operator tasks on the server's side.

They need the server's internals (the migrations, the stores, the data directory), so
they live in the server distribution; everything that goes over gRPC is the client's
`sira` command. `sira-server` with no command runs the server (`__main__`).

    migrate              apply pending migrations, as the schema owner
    rebuild EXPERIMENT   recompute an experiment's hot Redis state from Postgres
    deadletter list      write-behind records Postgres rejected, and why
    deadletter replay    write them again once the cause is fixed
    token --role ROLE    mint a development JWT (HS256) from the dev secret

Every failure is one line on stderr, never a traceback: exit 2 for usage and local
problems (missing URL or secret), 1 for errors reported by the stores, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "build_parser", "main"]

from sira.command_line import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    one_line,
    run_command_line,
)

COMMANDS = ("migrate", "rebuild", "deadletter", "token")


class UsageError(Exception):
    """A problem on the caller's side, reported as one line with exit code 2."""


# -- arguments ----------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _store_urls(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    from sira_server.config import ConfigError, parse_flag

    try:
        cluster = parse_flag("SIRA_REDIS_CLUSTER", env.get("SIRA_REDIS_CLUSTER"))
    except ConfigError as exc:
        parser.error(str(exc))  # exits with the usage code
    parser.add_argument(
        "--database-url",
        default=env.get("SIRA_DATABASE_URL") or None,
        help="Postgres DSN (env SIRA_DATABASE_URL)",
    )
    parser.add_argument(
        "--redis-url",
        default=env.get("SIRA_REDIS_URL") or None,
        help="Redis URL (env SIRA_REDIS_URL)",
    )
    parser.add_argument(
        "--redis-cluster",
        action=argparse.BooleanOptionalAction,
        default=cluster,
        help="the Redis URL names a node of a Redis Cluster (env SIRA_REDIS_CLUSTER)",
    )


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sira-server",
        description="Operator tasks that talk to the stores directly (no running server "
        "needed). `sira-server` alone runs the server.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, parent: Any = commands) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name, help=help_text, description=help_text
        )
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        return sub

    migrate = command("migrate", "apply pending database migrations (as the schema owner)")
    migrate.add_argument(
        "--database-url",
        default=env.get("SIRA_MIGRATE_DATABASE_URL") or env.get("SIRA_DATABASE_URL") or None,
        help="Postgres DSN of the schema owner (env SIRA_MIGRATE_DATABASE_URL, else "
        "SIRA_DATABASE_URL)",
    )

    rebuild = command("rebuild", "recompute an experiment's hot Redis state from Postgres")
    rebuild.add_argument("experiment", help="experiment id or key")
    _store_urls(rebuild, env)

    dead = commands.add_parser(
        "deadletter",
        help="write-behind records Postgres rejected: list them, replay them",
        description="write-behind records Postgres rejected: list them, replay them",
    )
    actions = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = command("list", "show the parked records and why Postgres rejected them", actions)
    listing.add_argument("--limit", type=_positive_int, default=100, help="at most this many")
    replay = command("replay", "write the parked records again, once the cause is fixed", actions)
    replay.add_argument(
        "--id", action="append", default=[], dest="ids", help="only this entry (repeatable)"
    )
    for action in (listing, replay):
        action.add_argument("experiment", nargs="?", default="", help="only this experiment")
        _store_urls(action, env)

    token = command("token", "mint a development JWT (HS256)")
    token.add_argument(
        "--role", action="append", required=True, dest="roles", help="role claim (repeatable)"
    )
    token.add_argument("--subject", default="alice", help="sub claim (default alice)")
    token.add_argument("--ttl", type=_positive_int, default=3600, help="lifetime in seconds")
    token.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env.get("SIRA_DATA_DIR") or ".sira"),
        help="where the server keeps dev-jwt-secret (env SIRA_DATA_DIR, default .sira)",
    )
    return parser


# -- output -------------------------------------------------------------------


def _print_json(value: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")


# -- commands -----------------------------------------------------------------


def _cmd_migrate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if not args.database_url:
        raise UsageError(
            "no database: pass --database-url or set SIRA_MIGRATE_DATABASE_URL "
            "(the embedded server migrates its own database on start)"
        )
    from sira_server.store.migrate import apply_migrations

    try:
        applied = asyncio.run(apply_migrations(args.database_url))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a DB or file problem, reported as one line
        sys.stderr.write(f"error: migration failed: {one_line(str(exc)) or type(exc).__name__}\n")
        return EXIT_FAILED
    if args.json:
        _print_json({"applied": list(applied)})
    elif applied:
        for version in applied:
            _print(f"applied {version}")
    else:
        _print("up to date")
    return EXIT_OK


def _need_stores(args: argparse.Namespace, name: str) -> None:
    if not args.database_url or not args.redis_url:
        raise UsageError(
            f"{name} talks to the stores directly: pass --database-url and --redis-url "
            "(or set SIRA_DATABASE_URL and SIRA_REDIS_URL)"
        )


def _shards(env: Mapping[str, str], *, cluster: bool) -> int:
    """SIRA_REDIS_SHARDS as the server reads it (used only when Redis records none)."""
    from sira_server.config import CLUSTER_DEFAULT_SHARDS
    from sira_server.store.hot_keys import MAX_SHARDS

    raw = env.get("SIRA_REDIS_SHARDS", "").strip()
    if not raw:
        return CLUSTER_DEFAULT_SHARDS if cluster else 1
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_SHARDS:
        raise UsageError(f"SIRA_REDIS_SHARDS must be in 1..{MAX_SHARDS}, got {raw[:20]!r}")
    return int(raw)


def _cmd_rebuild(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    _need_stores(args, "rebuild")
    from sira_server.store.admin import rebuild_hot_state

    report = asyncio.run(
        rebuild_hot_state(
            args.database_url,
            args.redis_url,
            args.experiment,
            redis_cluster=args.redis_cluster,
            shards=_shards(env, cluster=args.redis_cluster),
        )
    )
    if args.json:
        _print_json(
            {
                "experiment_id": report.experiment_id,
                "experiment_key": report.experiment_key,
                "assigned_subjects": report.assigned_subjects,
                "successes": report.successes,
            }
        )
    else:
        _print(
            f"rebuilt {report.experiment_key}: {report.assigned_subjects} assigned subjects, "
            f"{report.successes} successes"
        )
    return EXIT_OK


def _cmd_deadletter(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    _need_stores(args, "deadletter")
    from sira_server.store import admin

    if args.action == "list":
        views = asyncio.run(
            admin.list_dead(
                args.database_url,
                args.redis_url,
                args.experiment,
                limit=args.limit,
                redis_cluster=args.redis_cluster,
            )
        )
        return _show_dead(views, args.json)
    report = asyncio.run(
        admin.replay_dead(
            args.database_url,
            args.redis_url,
            args.experiment,
            entry_ids=args.ids,
            redis_cluster=args.redis_cluster,
        )
    )
    if args.json:
        _print_json(
            {
                "written": report.written,
                "discarded": report.discarded,
                "still_rejected": report.still_dead,
            }
        )
    else:
        _print(
            f"replayed: {len(report.written)} written, {len(report.discarded)} discarded"
            f" (experiment deleted), {len(report.still_dead)} still rejected"
        )
        for entry_id, reason in report.still_dead.items():
            _print(f"  {entry_id}: {one_line(reason)[:200]}")
    return EXIT_FAILED if report.still_dead else EXIT_OK


def _show_dead(views: Sequence[Any], as_json: bool) -> int:
    if as_json:
        _print_json(
            {
                "dead_letters": [
                    {
                        "experiment_key": v.experiment_key,
                        "experiment_id": v.letter.experiment_id,
                        "id": v.letter.entry_id,
                        "kind": v.letter.kind,
                        "subject_id": v.letter.subject_id,
                        "reason": v.letter.reason,
                    }
                    for v in views
                ]
            }
        )
        return EXIT_OK
    if not views:
        _print("no dead letters")
        return EXIT_OK
    _print(f"{len(views)} dead letter(s):")
    for v in views:
        letter = v.letter
        _print(
            f"  {v.experiment_key}  {letter.entry_id}  {letter.kind}  "
            f"{letter.subject_id[:40]}  {one_line(letter.reason)[:120]}"
        )
    return EXIT_OK


def _cmd_token(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from sira_server.auth import mint_token, read_dev_secret
    from sira_server.config import ConfigError

    secret = env.get("SIRA_JWT_SECRET", "").strip() or None
    if secret is None:
        try:
            secret = read_dev_secret(args.data_dir)
        except (ConfigError, OSError) as exc:
            raise UsageError(str(exc)) from None
    if secret is None:
        raise UsageError(
            f"no JWT secret: set SIRA_JWT_SECRET, or start the server once (`sira-server`) "
            f"so it creates {args.data_dir / 'dev-jwt-secret'} (or pass --data-dir)"
        )
    token = mint_token(
        secret,
        subject=args.subject,
        roles=list(args.roles),
        ttl_seconds=args.ttl,
        audience=env.get("SIRA_JWT_AUDIENCE") or None,
        issuer=env.get("SIRA_JWT_ISSUER") or None,
    )
    if args.json:
        _print_json({"token": token})
    else:
        _print(token)
    return EXIT_OK


_HANDLERS: dict[str, Callable[[argparse.Namespace, Mapping[str, str]], int]] = {
    "migrate": _cmd_migrate,
    "rebuild": _cmd_rebuild,
    "deadletter": _cmd_deadletter,
    "token": _cmd_token,
}


# -- entry point --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one operator command; return the process exit code."""
    return run_command_line(_run, argv)


def _run(argv: list[str], env: Mapping[str, str]) -> int:
    try:
        args = build_parser(env).parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    from sira_server.errors import SiraError

    try:
        return _HANDLERS[args.command](args, env)
    except UsageError as exc:
        sys.stderr.write(f"error: {one_line(str(exc))}\n")
        return EXIT_USAGE
    except SiraError as exc:
        sys.stderr.write(f"error: {exc.status_name}: {one_line(exc.message)}\n")
        return EXIT_FAILED
    except OSError as exc:
        sys.stderr.write(f"error: cannot reach the stores: {one_line(str(exc))}\n")
        return EXIT_FAILED
