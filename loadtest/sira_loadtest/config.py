"""What one load run does: the frozen `LoadConfig` and the parsers behind its flags."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

SCENARIOS: tuple[str, ...] = ("assign-heavy", "track-heavy", "mixed")
"""Predefined call mixes; see `sira_loadtest.scenarios`."""

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
    """Rate limit in calls per second over all workers; 0 is unlimited."""
    connections: int = 1
    """gRPC channels (TCP connections) over all workers, at least one per worker."""
    workers: int = 1
    """OS processes, each with its own event loop; results are merged."""
    insecure: bool = True
    """Plaintext; otherwise TLS with the system roots."""
    metadata: tuple[tuple[str, str], ...] = ()
    """Request metadata (authorization, ...), lower-case keys."""
    timeout: float = 20.0
    """Per-call deadline in seconds."""
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
    preassigned: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """(subject id, variant key) pairs for Track traffic; filled by scenario setup."""

    def validate(self) -> None:
        if self.concurrency < 1:
            raise ConfigError("-c/--concurrency must be >= 1")
        if self.duration is None and self.total < 1:
            raise ConfigError("-n/--total must be >= 1")
        if self.duration is not None and self.duration <= 0:
            raise ConfigError("-z/--duration must be > 0")
        if self.rps < 0:
            raise ConfigError("--rps must be >= 0")
        if self.connections < 1 or self.workers < 1:
            raise ConfigError("--connections and --workers must be >= 1")
        if self.workers > self.concurrency:
            raise ConfigError("--workers must not exceed -c/--concurrency")
        if self.timeout <= 0:
            raise ConfigError("--timeout must be > 0")
        if self.returning_subjects < 1:
            raise ConfigError("--subjects must be >= 1")
        if self.scenario:
            if self.scenario not in SCENARIOS:
                raise ConfigError(f"--scenario must be one of {', '.join(SCENARIOS)}")
            if not self.experiment:
                raise ConfigError("--scenario needs --experiment KEY")
        elif not self.call:
            raise ConfigError("--call is required without --scenario")
