"""`sira`: the admin command line (create, start, stop, results, insights, audit, ...).

Everything here goes over gRPC; the tasks that need the server's internals (migrate,
rebuild, dead letters, dev tokens) are `sira-server` commands (`sira_server.cli`).

Human tables by default; `--json` prints the API messages as JSON (proto field
names) for scripts. Every failure is one line on stderr, never a traceback:
exit 2 for usage and local problems (bad file, missing secret), 1 for errors
reported by the server or the database, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, RenderableType

from sira import render
from sira.client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, Client
from sira.command_line import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    one_line,
    run_command_line,
)
from sira.errors import SiraError
from sira.experiments.v1 import experiment_pb2, lifecycle_service_pb2
from sira.spec_file import SpecFileError, load_experiment

__all__ = ["main"]

EXIT_SERVER = EXIT_FAILED
"""The server answered an error (or could not be reached)."""

STATUSES = ("draft", "running", "stopped", "archived")

# Commands that need the server's internals: `sira-server` has them (`sira_server.cli`).
SERVER_COMMANDS = ("migrate", "rebuild", "deadletter", "token")

EXAMPLES = """examples:
  export SIRA_TOKEN=$(sira-server token --role ops_admin)   # development, on the server
  sira create docs/examples/checkout-button-color.json
  sira start checkout-button-color
  sira insights checkout-button-color
  sira stop checkout-button-color --winner green-button --reason "green converts better"
  sira list --status running --json | jq '.experiments[].key'
"""


class UsageError(Exception):
    """A problem on the caller's side, reported as one line with exit code 2."""


# -- arguments ----------------------------------------------------------------


def _add_global_options(parser: argparse.ArgumentParser, env: Mapping[str, str], sub: bool) -> None:
    """The same options on the main parser and on every subcommand.

    On subcommands their default is SUPPRESS so that `sira --json list` and
    `sira list --json` both work without the subcommand resetting the value.
    """

    def default(value: object) -> object:
        return argparse.SUPPRESS if sub else value

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--address",
        default=default(env.get("SIRA_ADDRESS") or DEFAULT_ADDRESS),
        help=f"server host:port (env SIRA_ADDRESS, default {DEFAULT_ADDRESS})",
    )
    group.add_argument(
        "--token",
        default=default(env.get("SIRA_TOKEN") or None),
        help="bearer token (env SIRA_TOKEN; `sira-server token` makes one for development)",
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=default(DEFAULT_TIMEOUT),
        help=f"deadline of each call in seconds (default {DEFAULT_TIMEOUT:g})",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON (API field names) instead of tables",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default(env.get("SIRA_TLS", "") not in ("", "0", "false")),
        help="connect with TLS (env SIRA_TLS=1)",
    )
    group.add_argument(
        "--ca-file",
        default=default(env.get("SIRA_CA_FILE") or None),
        help="PEM file of the CA that signed the server certificate (env SIRA_CA_FILE)",
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sira",
        description="Manage SIRA experiments: create, start, stop, results, insights, audit.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, env, sub=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_global_options(sub, env, sub=True)
        return sub

    create = command("create", "create a draft experiment from a JSON or YAML file")
    create.add_argument("file", type=Path, help="experiment file (see docs/examples/)")

    listing = command("list", "list experiments, newest first")
    listing.add_argument("--status", choices=STATUSES, help="only experiments in this status")
    listing.add_argument("--page-size", type=_positive_int, default=0, help="experiments per page")
    listing.add_argument("--page-token", default="", help="continue from a previous page")
    listing.add_argument("--all", action="store_true", help="follow every page")

    def on_experiment(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = command(name, help_text)
        sub.add_argument("experiment", help="experiment id or key")
        return sub

    on_experiment("show", "show one experiment and its variants")
    on_experiment("start", "start a draft experiment (draft -> running)")
    stop = on_experiment("stop", "stop a running experiment (running -> stopped)")
    stop.add_argument("--winner", default="", help="variant id or key served to everyone after")
    stop.add_argument("--reason", default="", help="why it stops (kept in the audit log)")
    on_experiment("archive", "archive a stopped experiment (stopped -> archived)")

    stale = command("archive-stale", "archive experiments stopped long ago")
    stale.add_argument("--older-than-days", type=_positive_int, default=90)
    stale.add_argument("--dry-run", action="store_true", help="only list what would be archived")

    delete = on_experiment("delete", "delete a draft or stopped experiment (ops_admin)")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    audit = command("audit", "audit events, newest first")
    audit.add_argument("experiment", nargs="?", default="", help="only this experiment")
    audit.add_argument("--limit", type=_positive_int, default=50, help="at most this many")

    on_experiment("results", "observed counts, conversion rates and revenue per variant")
    on_experiment("insights", "Bayesian statistics, fail-fast verdict and recommendation")

    return parser


# -- output -------------------------------------------------------------------


class Output:
    """Where a command's result goes: rich tables or JSON, on stdout."""

    def __init__(self, as_json: bool, stream: TextIO) -> None:
        self.as_json = as_json
        self.stream = stream
        # Piped output has no terminal width; 80 columns would truncate the tables.
        width = None if stream.isatty() or "COLUMNS" in os.environ else 140
        self.console = Console(file=stream, highlight=False, soft_wrap=False, width=width)

    def json(self, value: Message | Mapping[str, Any]) -> None:
        data = (
            json_format.MessageToDict(value, preserving_proto_field_name=True)
            if isinstance(value, Message)
            else value
        )
        self.stream.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def show(self, message: Message, view: Callable[[], RenderableType | str]) -> None:
        if self.as_json:
            self.json(message)
        else:
            self.console.print(view())


# -- commands -----------------------------------------------------------------


def _connect(args: argparse.Namespace) -> Client:
    credentials = None
    if args.tls or args.ca_file:
        root = None
        if args.ca_file:
            try:
                root = Path(args.ca_file).read_bytes()
            except OSError as exc:
                raise UsageError(f"cannot read --ca-file {args.ca_file}: {exc.strerror}") from None
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
    return Client(args.address, token=args.token, timeout=args.timeout, credentials=credentials)


def _cmd_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    experiment = client.create_experiment(load_experiment(args.file))
    out.show(
        experiment,
        lambda: render.experiment_view(experiment),
    )
    if not out.as_json:
        out.console.print(f"created {experiment.key} ({experiment.id}) as a draft")
    return EXIT_OK


def _cmd_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.all:
        response = lifecycle_service_pb2.ListExperimentsResponse(
            experiments=list(client.iter_experiments(args.status, page_size=args.page_size))
        )
    else:
        response = client.list_experiments(
            args.status, page_size=args.page_size, page_token=args.page_token
        )
    out.show(response, lambda: render.experiments_table(response.experiments))
    if not out.as_json and response.next_page_token:
        out.console.print(f"more: --all, or --page-token {response.next_page_token}")
    return EXIT_OK


def _cmd_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    experiment = client.get_experiment(args.experiment)
    out.show(experiment, lambda: render.experiment_view(experiment))
    return EXIT_OK


def _transition(verb: str) -> Callable[[Client, argparse.Namespace, Output], int]:
    def run(client: Client, args: argparse.Namespace, out: Output) -> int:
        if verb == "start":
            experiment = client.start_experiment(args.experiment)
        elif verb == "stop":
            experiment = client.stop_experiment(
                args.experiment, winner_variant=args.winner, reason=args.reason
            )
        else:
            experiment = client.archive_experiment(args.experiment)
        out.show(experiment, lambda: _transition_line(experiment))
        return EXIT_OK

    return run


def _transition_line(experiment: experiment_pb2.Experiment) -> str:
    status = render.enum_word(experiment_pb2.ExperimentStatus.Name(experiment.status))
    line = f"{experiment.key}: {status}"
    winner = next((v for v in experiment.variants if v.id == experiment.winner_variant_id), None)
    if experiment.winner_variant_id and winner is not None:
        line += f", winner {winner.key} ({winner.name})"
    if experiment.stop_reason:
        line += f", reason: {experiment.stop_reason}"
    return line


def _cmd_archive_stale(client: Client, args: argparse.Namespace, out: Output) -> int:
    archived = client.archive_stale_experiments(args.older_than_days, dry_run=args.dry_run)
    response = lifecycle_service_pb2.ArchiveStaleExperimentsResponse(experiments=archived)
    verb = "would archive" if args.dry_run else "archived"
    title = f"{verb} {len(archived)} experiment(s) stopped over {args.older_than_days} days ago"
    out.show(response, lambda: render.experiments_table(archived, title=title))
    return EXIT_OK


def _cmd_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to delete {args.experiment!r} without --yes (no terminal)")
        sys.stderr.write(f"delete experiment {args.experiment!r} for good? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            sys.stderr.write("not deleted\n")
            return EXIT_USAGE
    client.delete_experiment(args.experiment)
    if out.as_json:
        out.json({"deleted": args.experiment})
    else:
        out.console.print(f"deleted {args.experiment}")
    return EXIT_OK


def _cmd_audit(client: Client, args: argparse.Namespace, out: Output) -> int:
    events: list[lifecycle_service_pb2.AuditEvent] = []
    for event in client.iter_audit_events(args.experiment, page_size=min(args.limit, 1000)):
        events.append(event)
        if len(events) >= args.limit:
            break
    response = lifecycle_service_pb2.ListAuditEventsResponse(events=events)
    out.show(response, lambda: render.audit_table(events))
    return EXIT_OK


def _cmd_results(client: Client, args: argparse.Namespace, out: Output) -> int:
    results = client.get_results(args.experiment)
    out.show(results, lambda: render.results_view(results))
    return EXIT_OK


def _cmd_insights(client: Client, args: argparse.Namespace, out: Output) -> int:
    insights = client.get_insights(args.experiment)
    out.show(insights, lambda: render.insights_view(insights))
    return EXIT_OK


_SERVER_COMMANDS: dict[str, Callable[[Client, argparse.Namespace, Output], int]] = {
    "create": _cmd_create,
    "list": _cmd_list,
    "show": _cmd_show,
    "start": _transition("start"),
    "stop": _transition("stop"),
    "archive": _transition("archive"),
    "archive-stale": _cmd_archive_stale,
    "delete": _cmd_delete,
    "audit": _cmd_audit,
    "results": _cmd_results,
    "insights": _cmd_insights,
}


# -- errors -------------------------------------------------------------------


def describe(error: SiraError, address: str) -> list[str]:
    """The lines printed for a failed call: the error, then one per field violation."""
    code = error.code_name
    reason = f" ({error.reason})" if error.reason else ""
    message = one_line(error.message)
    if error.code == grpc.StatusCode.UNAVAILABLE and not error.reason:
        message = f"cannot reach the SIRA server at {address}: {message}"
    elif error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"no answer from {address} in time (raise --timeout): {message}"
    elif error.code == grpc.StatusCode.UNIMPLEMENTED:
        message = f"the server at {address} does not implement this call yet: {message}"
    elif error.reason == "ERROR_REASON_TOKEN_MISSING":
        message += " (pass --token or set SIRA_TOKEN; `sira-server token --role ROLE` mints one)"
    lines = [f"error: {code}{reason}: {message}"]
    lines += [f"  {field}: {one_line(description)}" for field, description in error.violations]
    return lines


# -- entry point --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the process exit code."""
    return run_command_line(_run, argv)


def _run(argv: list[str], env: Mapping[str, str]) -> int:
    parser = build_parser(env)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        moved = next((a for a in argv if a in SERVER_COMMANDS), None)
        if exc.code == EXIT_USAGE and moved is not None:
            sys.stderr.write(f"`{moved}` is a server task: run `sira-server {moved}`\n")
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    out = Output(args.json, sys.stdout)
    try:
        with _connect(args) as client:
            return _SERVER_COMMANDS[args.command](client, args, out)
    except SiraError as exc:
        for line in describe(exc, args.address):
            sys.stderr.write(line + "\n")
        return EXIT_SERVER
    except (SpecFileError, UsageError) as exc:
        sys.stderr.write(f"error: {one_line(str(exc))}\n")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
