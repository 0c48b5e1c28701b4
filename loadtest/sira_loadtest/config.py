"""What one load run does: the frozen `LoadConfig` and the parsers behind its flags."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from sira_loadtest.schedules import Schedule, ScheduleError

SCENARIOS: tuple[str, ...] = (
    "assign-heavy",
    "track-heavy",
    "mixed",
    "assign-new",
    "assign-returning",
    "track-batch",
)
"""Predefined call mixes; see `sira_loadtest.scenarios`."""

DURATION_STOPS: tuple[str, ...] = ("close", "wait", "ignore")
"""ghz --duration-stop: what happens to calls in flight when -z/-x runs out."""

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class ConfigError(ValueError):
    """A flag value is malformed; the message names the flag."""


def parse_duration(text: str) -> float:
    """Go-style duration ("10s", "1m30s", "250ms"; a bare number is seconds) -> seconds."""
    raw = text.strip()
    try:
        return float(raw)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(raw):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(raw) or not raw:
        raise ConfigError(f"invalid duration {text!r} (examples: 10s, 1m, 250ms)")
    return total


def normalize_call(call: str) -> str:
    """`pkg.Service.Method`, `pkg.Service/Method` or `/pkg.Service/Method` -> the path."""
    name = call.strip().lstrip("/")
    if "/" in name:
        service, _, method = name.rpartition("/")
    else:
        service, _, method = name.rpartition(".")
    if not service or not method or "/" in service:
        raise ConfigError(f"--call {call!r}: expected package.Service.Method")
    return f"/{service}/{method}"


def full_method_name(path: str) -> str:
    """`/pkg.Service/Method` -> `pkg.Service.Method` (the descriptor pool's spelling)."""
    return path.lstrip("/").replace("/", ".")


def target_host(target: str) -> str:
    """The host part of `host:port`, `[v6]:port`, `dns:///host:port` or `unix:path`."""
    rest = target
    for prefix in ("dns:///", "ipv4:", "ipv6:"):
        if rest.startswith(prefix):
            rest = rest[len(prefix) :]
    if rest.startswith("["):
        return rest[1 : rest.find("]")]
    if rest.count(":") > 1:  # a bare IPv6 address without a port
        return rest
    return rest.rpartition(":")[0] if ":" in rest else rest


def is_loopback(target: str) -> bool:
    """True for unix sockets, `localhost` and loopback addresses."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target_host(target)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TlsOptions:
    """ghz's TLS flags (see `sira_loadtest.tls`)."""

    cacert: str = ""
    """PEM file of the roots that verify the server (--cacert); else the system roots."""
    cert: str = ""
    """Client certificate PEM, for mTLS (--cert); needs `key`."""
    key: str = ""
    """Client private key PEM (--key)."""
    cname: str = ""
    """Server name to check in its certificate (--cname)."""
    skip_verify: bool = False
    """Trust the certificate the server presents, whatever it is (--skipTLS)."""
    authority: str = ""
    """:authority header (--authority)."""


@dataclass(frozen=True)
class LoadConfig:
    """One load run. Built by the CLI or by code (bench, tests); picklable for workers."""

    target: str
    """host:port of the server."""
    call: str = ""
    """Method path `/pkg.Service/Method`; empty when a scenario picks the calls."""
    concurrency: int = 50
    """Calls in flight at once, over all workers (ghz -c)."""
    total: int = 200
    """Number of calls (ghz -n); ignored when `duration` is set."""
    duration: float | None = None
    """Seconds to send for (ghz -z); wins over `total`."""
    rps: float = 0.0
    """Open-loop rate in calls per second over all workers (ghz -r); 0: closed loop."""
    load: Schedule = field(default_factory=Schedule)
    """--load-schedule step/line (const uses `rps`)."""
    concurrency_schedule: Schedule = field(default_factory=Schedule)
    """--concurrency-schedule step/line (const uses `concurrency`)."""
    max_duration: float | None = None
    """Seconds after which a count run (-n) stops anyway (ghz -x)."""
    duration_stop: str = "close"
    """close (in-flight calls count as Canceled errors), wait (they finish and count)
    or ignore (they are dropped), when -z/-x runs out (ghz --duration-stop)."""
    skip_first: int = 0
    """Results left out of the tally, the first ones to complete (ghz --skipFirst)."""
    count_errors: bool = False
    """Latency statistics include non-OK calls (ghz --count-errors)."""
    connect_timeout: float = 10.0
    """Seconds to wait for the first connection (ghz --connect-timeout)."""
    keepalive: float = 0.0
    """Seconds between keepalive pings; 0: none (ghz --keepalive)."""
    tls: TlsOptions = field(default_factory=TlsOptions)
    proto: str = ""
    """.proto file of the call (ghz --proto)."""
    protoset: tuple[str, ...] = ()
    """Compiled FileDescriptorSet files (ghz --protoset)."""
    import_paths: tuple[str, ...] = ()
    """Import paths for --proto (ghz -i)."""
    reflect_metadata: tuple[tuple[str, str], ...] = ()
    """Metadata of the reflection requests only (ghz --reflect-metadata)."""
    binary: bytes = b""
    """A serialised request sent as is (ghz -b/-B); replaces `data`."""
    descriptor_set: bytes = field(default=b"", repr=False)
    """Resolved FileDescriptorSet of `call`; filled before the run."""
    pinned_certificate: bytes = field(default=b"", repr=False)
    """--skipTLS: the certificate the server presented; filled before the run."""
    connections: int = 1
    """gRPC channels (TCP connections) over all workers, at least one per worker."""
    workers: int = 1
    """OS processes, each with its own event loop; results are merged."""
    insecure: bool = True
    """Plaintext; otherwise TLS with the system roots."""
    metadata: tuple[tuple[str, str], ...] = ()
    """Request metadata (authorization, ...), lower-case keys."""
    timeout: float = 20.0
    """Per-call deadline in seconds; 0: none (ghz -t)."""
    data: str = ""
    """Proto-JSON template of the request (see `sira_loadtest.template`)."""
    scenario: str = ""
    """One of `SCENARIOS`, or empty for a single `call`."""
    experiment: str = ""
    """Experiment id or key the scenarios address."""
    returning_subjects: int = 1000
    """Size of the returning-subject pool (scenarios and `{{subject:returning}}`)."""
    subject_prefix: str = "lt-"
    """Prefix of every subject id and event id the load tester makes up."""
    name: str = ""
    """Free label copied into the report."""
    tags: tuple[tuple[str, str], ...] = ()
    """User-defined string tags copied into the report (ghz --tags)."""
    preassigned: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """(subject id, variant key) pairs for Track traffic; filled by scenario setup."""

    @property
    def load_schedule(self) -> Schedule | None:
        """The rate schedule of an open-loop run, None for a closed loop."""
        if self.load.kind != "const":
            return self.load
        return Schedule("const", start=self.rps) if self.rps > 0 else None

    def validate(self) -> None:
        if self.concurrency < 1:
            raise ConfigError("-c/--concurrency must be >= 1")
        if self.duration is None and self.total < 1:
            raise ConfigError("-n/--total must be >= 1")
        if self.duration is not None and self.duration <= 0:
            raise ConfigError("-z/--duration must be > 0")
        if self.rps < 0:
            raise ConfigError("--rps must be >= 0")
        if self.max_duration is not None and self.max_duration <= 0:
            raise ConfigError("-x/--max-duration must be > 0")
        if self.duration_stop not in DURATION_STOPS:
            raise ConfigError(f"--duration-stop must be one of {', '.join(DURATION_STOPS)}")
        if self.skip_first < 0:
            raise ConfigError("--skipFirst must be >= 0")
        if self.connect_timeout <= 0 or self.keepalive < 0:
            raise ConfigError("--connect-timeout must be > 0 and --keepalive >= 0")
        if bool(self.tls.cert) != bool(self.tls.key):
            raise ConfigError("--cert and --key must be given together")
        try:
            self.load.validate("load")
            self.concurrency_schedule.validate("concurrency")
        except ScheduleError as exc:
            raise ConfigError(str(exc)) from None
        if self.concurrency_schedule.kind != "const":
            peak = self.concurrency_schedule.peak()
            if peak == float("inf"):
                raise ConfigError(
                    "--concurrency-schedule grows forever: "
                    "set --concurrency-end or --concurrency-max-duration"
                )
            if peak < self.workers:
                raise ConfigError("--concurrency-schedule never reaches one slot per --workers")
        if self.connections < 1 or self.workers < 1:
            raise ConfigError("--connections and --workers must be >= 1")
        if self.workers > self.concurrency and self.concurrency_schedule.kind == "const":
            raise ConfigError("--workers must not exceed -c/--concurrency")
        if self.timeout < 0:
            raise ConfigError("-t/--timeout must be >= 0 (0: no deadline)")
        if self.returning_subjects < 1:
            raise ConfigError("--subjects must be >= 1")
        if self.scenario:
            if self.scenario not in SCENARIOS:
                raise ConfigError(f"--scenario must be one of {', '.join(SCENARIOS)}")
            if not self.experiment:
                raise ConfigError("--scenario needs --experiment KEY")
        elif not self.call:
            raise ConfigError("--call is required without --scenario")
