"""Settings that keep the server up under abuse: tracking tokens, caps, rate limits,
connection limits. One field of `config.Settings`; read by `LimitSettings.from_env`.

Every variable is documented on its field and in docs/security.md (the table of
limits). Role limits are written `role=rate/burst/concurrency` separated by commas,
e.g. ``SIRA_RATE_LIMITS="pay_module=5000/10000/512,anonymous=100/200/32"``; roles not
named keep their defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from sira_server.domain.limits import DEFAULT_MAX_EVENT_VALUE

TRACKING_KEY_FILE = "tracking-token-key"
ANONYMOUS_ROLE = "anonymous"
"""Pseudo-role of callers without a bearer token (limited per peer address)."""


@dataclass(frozen=True, slots=True)
class RoleLimit:
    """A token bucket and a concurrency limit for one principal of a role."""

    rate: float
    """Calls per second refilled into the bucket."""
    burst: int
    """Bucket size: calls allowed at once after a quiet period."""
    concurrency: int
    """Calls of one principal in flight at once."""


def _default_roles() -> dict[str, RoleLimit]:
    modules = RoleLimit(rate=20_000.0, burst=40_000, concurrency=1024)
    people = RoleLimit(rate=50.0, burst=100, concurrency=8)
    return {
        "pay_module": modules,
        "connect_module": modules,
        "ops_admin": people,
        "marketing": people,
        "data_science": people,
        ANONYMOUS_ROLE: RoleLimit(rate=100.0, burst=200, concurrency=32),
    }


@dataclass(frozen=True)
class LimitSettings:
    tracking_key: str | None = None
    """SIRA_TRACKING_TOKEN_KEY: HMAC key of tracking tokens (>= 32 characters). Embedded
    default: generated once in `<data dir>/tracking-token-key`. External stores: derived
    from the HS256 SIRA_JWT_SECRET when unset; required with RS256/ES256."""
    tracking_token_max_age_seconds: int = 7 * 24 * 3600
    """SIRA_TRACKING_TOKEN_MAX_AGE_SECONDS: how long a Decision's tracking token is
    accepted (default 7 days)."""
    subject_events_per_hour: int = 60
    """SIRA_SUBJECT_EVENTS_PER_HOUR: events one subject may report per event type and
    experiment per clock hour without a bearer token; 0 disables the cap."""
    roles: Mapping[str, RoleLimit] = field(default_factory=_default_roles)
    """SIRA_RATE_LIMITS: per-principal rate/burst/concurrency by role (see module doc).
    A principal with several roles gets the most generous of each; a role not listed
    gets the `anonymous` limits."""
    max_in_flight: int = 2048
    """SIRA_MAX_IN_FLIGHT: RPCs in flight in one process; over it, calls are shed with
    RESOURCE_EXHAUSTED instead of queueing. 0 disables."""
    admin_max_in_flight: int = 2
    """SIRA_ADMIN_MAX_IN_FLIGHT: LifecycleService calls in flight in one process, all
    callers together; over it they are shed (RESOURCE_EXHAUSTED), so admin traffic
    cannot take the event loop from Assign/Track. 0 disables."""
    max_receive_message_bytes: int = 4 * 1024 * 1024
    """SIRA_MAX_RECEIVE_MESSAGE_BYTES: largest request accepted (gRPC's default, explicit)."""
    max_send_message_bytes: int = 16 * 1024 * 1024
    """SIRA_MAX_SEND_MESSAGE_BYTES: largest response sent."""
    keepalive_time_seconds: int = 60
    """SIRA_KEEPALIVE_TIME_SECONDS: the server pings an idle connection this often."""
    keepalive_timeout_seconds: int = 20
    """SIRA_KEEPALIVE_TIMEOUT_SECONDS: a ping unanswered this long closes the connection."""
    min_client_ping_interval_seconds: int = 10
    """SIRA_MIN_CLIENT_PING_INTERVAL_SECONDS: clients pinging more often get GOAWAY
    (after 2 strikes)."""
    max_connection_idle_seconds: int = 300
    """SIRA_MAX_CONNECTION_IDLE_SECONDS: a connection without calls this long is closed."""
    max_connection_age_seconds: int = 1800
    """SIRA_MAX_CONNECTION_AGE_SECONDS: every connection is closed (GOAWAY) after this
    long, so clients rebalance across replicas; jittered ±10 % by gRPC."""
    max_connection_age_grace_seconds: int = 30
    """SIRA_MAX_CONNECTION_AGE_GRACE_SECONDS: time in-flight calls get after that GOAWAY."""
    max_concurrent_streams: int = 0
    """SIRA_MAX_CONCURRENT_STREAMS: calls in flight on one HTTP/2 connection; 0 leaves
    gRPC's default (no limit): a client racing past the limit gets its streams refused
    as UNAVAILABLE, so the per-principal and process limits are what bound calls."""
    admin_pool_size: int = 4
    """SIRA_ADMIN_POOL_SIZE: Postgres connections for lifecycle and reports, apart from
    the decision path's pool, so admin traffic cannot starve Assign/Track."""
    max_event_value: float = DEFAULT_MAX_EVENT_VALUE
    """SIRA_MAX_EVENT_VALUE: the largest Track value accepted (finite, > 0; default
    1e12), so revenue sums stay finite. Parsed in `config` (a float)."""
    admin_statement_timeout_ms: int = 5000
    """SIRA_ADMIN_STATEMENT_TIMEOUT_MS: Postgres statement_timeout of that pool."""

    def role_limit(self, roles: frozenset[str]) -> RoleLimit:
        """The most generous limit of `roles`; anonymous limits when none is listed."""
        known = [self.roles[r] for r in roles if r in self.roles]
        if not known:
            return self.roles.get(ANONYMOUS_ROLE, RoleLimit(100.0, 200, 32))
        return RoleLimit(
            rate=max(k.rate for k in known),
            burst=max(k.burst for k in known),
            concurrency=max(k.concurrency for k in known),
        )

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC server channel arguments these settings stand for."""
        ms = 1000
        return [
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            ("grpc.max_send_message_length", self.max_send_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_seconds * ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_seconds * ms),
            ("grpc.keepalive_permit_without_calls", 1),
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                self.min_client_ping_interval_seconds * ms,
            ),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_idle_ms", self.max_connection_idle_seconds * ms),
            ("grpc.max_connection_age_ms", self.max_connection_age_seconds * ms),
            ("grpc.max_connection_age_grace_ms", self.max_connection_age_grace_seconds * ms),
        ] + (
            [("grpc.max_concurrent_streams", self.max_concurrent_streams)]
            if self.max_concurrent_streams
            else []
        )

    @classmethod
    def from_env(
        cls,
        text: Callable[[str], str | None],
        integer: Callable[[str, int, int], int],
        error: Callable[[str], Exception],
    ) -> LimitSettings:
        """Read the SIRA_* limit variables with `config`'s own parsers."""
        d = cls()
        key = text("SIRA_TRACKING_TOKEN_KEY")
        if key is not None and len(key) < 32:
            raise error("SIRA_TRACKING_TOKEN_KEY must be at least 32 characters")
        return replace(
            d,
            tracking_key=key,
            tracking_token_max_age_seconds=integer(
                "SIRA_TRACKING_TOKEN_MAX_AGE_SECONDS", d.tracking_token_max_age_seconds, 1
            ),
            subject_events_per_hour=integer(
                "SIRA_SUBJECT_EVENTS_PER_HOUR", d.subject_events_per_hour, 0
            ),
            roles=parse_role_limits(text("SIRA_RATE_LIMITS"), d.roles, error),
            max_in_flight=integer("SIRA_MAX_IN_FLIGHT", d.max_in_flight, 0),
            admin_max_in_flight=integer("SIRA_ADMIN_MAX_IN_FLIGHT", d.admin_max_in_flight, 0),
            max_receive_message_bytes=integer(
                "SIRA_MAX_RECEIVE_MESSAGE_BYTES", d.max_receive_message_bytes, 1024
            ),
            max_send_message_bytes=integer(
                "SIRA_MAX_SEND_MESSAGE_BYTES", d.max_send_message_bytes, 1024
            ),
            keepalive_time_seconds=integer(
                "SIRA_KEEPALIVE_TIME_SECONDS", d.keepalive_time_seconds, 1
            ),
            keepalive_timeout_seconds=integer(
                "SIRA_KEEPALIVE_TIMEOUT_SECONDS", d.keepalive_timeout_seconds, 1
            ),
            min_client_ping_interval_seconds=integer(
                "SIRA_MIN_CLIENT_PING_INTERVAL_SECONDS", d.min_client_ping_interval_seconds, 1
            ),
            max_connection_idle_seconds=integer(
                "SIRA_MAX_CONNECTION_IDLE_SECONDS", d.max_connection_idle_seconds, 1
            ),
            max_connection_age_seconds=integer(
                "SIRA_MAX_CONNECTION_AGE_SECONDS", d.max_connection_age_seconds, 1
            ),
            max_connection_age_grace_seconds=integer(
                "SIRA_MAX_CONNECTION_AGE_GRACE_SECONDS", d.max_connection_age_grace_seconds, 0
            ),
            max_concurrent_streams=integer(
                "SIRA_MAX_CONCURRENT_STREAMS", d.max_concurrent_streams, 0
            ),
            admin_pool_size=integer("SIRA_ADMIN_POOL_SIZE", d.admin_pool_size, 1),
            admin_statement_timeout_ms=integer(
                "SIRA_ADMIN_STATEMENT_TIMEOUT_MS", d.admin_statement_timeout_ms, 1
            ),
        )


def parse_role_limits(
    raw: str | None,
    defaults: Mapping[str, RoleLimit],
    error: Callable[[str], Exception],
) -> dict[str, RoleLimit]:
    """`role=rate/burst/concurrency,...` over `defaults`."""
    roles = dict(defaults)
    if raw is None:
        return roles
    for item in raw.split(","):
        role, _, spec = item.strip().partition("=")
        parts = spec.split("/")
        try:
            if not role or len(parts) != 3:
                raise ValueError
            limit = RoleLimit(float(parts[0]), int(parts[1]), int(parts[2]))
        except ValueError:
            raise error(
                f"SIRA_RATE_LIMITS: expected role=rate/burst/concurrency, got {item[:100]!r}"
            ) from None
        if not (limit.rate > 0 and limit.burst >= 1 and limit.concurrency >= 1):
            raise error(f"SIRA_RATE_LIMITS: {role}: rate > 0, burst >= 1, concurrency >= 1")
        roles[role.strip()] = limit
    return roles
