"""Admission: the pure token bucket, the call wrapper's principals and server-wide cap,
and the limit settings."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sira_server.api.call_limits import CallLimits, peer_host
from sira_server.api.context import acting_as
from sira_server.auth import ANONYMOUS, Principal
from sira_server.config import ConfigError, Settings
from sira_server.errors import ResourceExhausted
from sira_server.limit_settings import LimitSettings, RoleLimit
from sira_server.rate_limiter import RateLimiter

LIMIT = RoleLimit(rate=2.0, burst=3, concurrency=2)


def test_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    limiter = RateLimiter()
    for _ in range(2):
        assert limiter.acquire("a", LIMIT, 0.0) is None
        limiter.release("a")
    assert limiter.acquire("a", LIMIT, 0.0) is None
    limiter.release("a")
    refusal = limiter.acquire("a", LIMIT, 0.0)
    assert refusal is not None
    assert refusal.limit == "rate"
    assert refusal.retry_after_seconds == pytest.approx(0.5)
    assert limiter.acquire("a", LIMIT, 0.5) is None  # one token back after 1/rate
    limiter.release("a")
    assert limiter.acquire("b", LIMIT, 0.5) is None  # another principal: its own bucket


def test_concurrency_limit_and_release() -> None:
    limiter = RateLimiter()
    wide = replace(LIMIT, burst=100)
    assert limiter.acquire("a", wide, 0.0) is None
    assert limiter.acquire("a", wide, 0.0) is None
    refusal = limiter.acquire("a", wide, 0.0)
    assert refusal is not None
    assert refusal.limit == "concurrency"
    limiter.release("a")
    assert limiter.acquire("a", wide, 0.0) is None
    assert limiter.in_flight("a") == 2


def test_the_table_is_bounded_and_keeps_busy_principals() -> None:
    limiter = RateLimiter(max_keys=10)
    assert limiter.acquire("busy", LIMIT, 0.0) is None
    for i in range(100):
        limiter.acquire(f"k{i}", LIMIT, 0.0)
        limiter.release(f"k{i}")
    assert len(limiter) <= 10
    assert limiter.in_flight("busy") == 1


class Peer:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


@pytest.fixture
def limits() -> tuple[CallLimits, list[str]]:
    refused: list[str] = []
    settings = LimitSettings(
        roles={"pay_module": RoleLimit(1000, 1000, 2), "anonymous": RoleLimit(1, 1, 5)},
        max_in_flight=3,
    )
    return CallLimits(settings, refused.append), refused


def test_principals_are_token_subjects_or_peer_hosts(
    limits: tuple[CallLimits, list[str]],
) -> None:
    calls, refused = limits
    with acting_as(ANONYMOUS):
        calls.release(calls.admit(Peer("ipv4:10.0.0.1:1000")))
        with pytest.raises(ResourceExhausted) as caught:  # same host, another port
            calls.admit(Peer("ipv4:10.0.0.1:2000"))
        assert caught.value.metadata == {"limit": "rate"}
        assert caught.value.reason == "ERROR_REASON_RATE_LIMITED"
        assert caught.value.retry_after_seconds > 0
        calls.release(calls.admit(Peer("ipv4:10.0.0.2:1000")))
    assert refused == ["rate"]
    assert calls.in_flight == 0


def test_concurrency_per_principal_and_server_wide(
    limits: tuple[CallLimits, list[str]],
) -> None:
    calls, refused = limits
    with acting_as(Principal("pay", frozenset({"pay_module"}))):
        held = [calls.admit(Peer("ipv4:1.1.1.1:1")) for _ in range(2)]
        with pytest.raises(ResourceExhausted):
            calls.admit(Peer("ipv4:1.1.1.1:1"))
    with acting_as(Principal("connect", frozenset({"pay_module"}))):
        held.append(calls.admit(Peer("ipv4:1.1.1.1:1")))
        with pytest.raises(ResourceExhausted) as caught:  # 3 in flight: the server cap
            calls.admit(Peer("ipv4:1.1.1.1:1"))
        assert caught.value.metadata == {"limit": "server_in_flight"}
    for key in held:
        calls.release(key)
    assert refused == ["concurrency", "server_in_flight"]
    assert calls.in_flight == 0


def test_peer_host() -> None:
    assert peer_host("ipv4:127.0.0.1:5000") == "ipv4:127.0.0.1"
    assert peer_host("ipv6:[::1]:5000") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s"


def test_role_limits_take_the_most_generous_and_default_to_anonymous() -> None:
    settings = LimitSettings()
    both = settings.role_limit(frozenset({"ops_admin", "pay_module"}))
    assert both == settings.roles["pay_module"]
    assert settings.role_limit(frozenset({"unknown"})) == settings.roles["anonymous"]
    assert settings.role_limit(frozenset()) == settings.roles["anonymous"]


def test_limit_settings_from_env() -> None:
    settings = Settings.from_env(
        {
            "SIRA_RATE_LIMITS": "marketing=1.5/3/2, anonymous=10/20/4",
            "SIRA_MAX_IN_FLIGHT": "0",
            "SIRA_MAX_RECEIVE_MESSAGE_BYTES": "65536",
            "SIRA_MAX_CONNECTION_AGE_SECONDS": "60",
        }
    ).limits
    assert settings.roles["marketing"] == RoleLimit(1.5, 3, 2)
    assert settings.roles["anonymous"] == RoleLimit(10, 20, 4)
    assert settings.roles["pay_module"] == LimitSettings().roles["pay_module"]
    assert settings.max_in_flight == 0
    options = dict(settings.grpc_options())
    assert options["grpc.max_receive_message_length"] == 65536
    assert options["grpc.max_connection_age_ms"] == 60_000
    assert options["grpc.max_connection_idle_ms"] == 300_000
    for bad in ("marketing=1/2", "marketing=x/1/1", "=1/1/1", "marketing=0/1/1"):
        with pytest.raises(ConfigError, match="SIRA_RATE_LIMITS"):
            Settings.from_env({"SIRA_RATE_LIMITS": bad})


def test_lifecycle_calls_share_a_small_cap() -> None:
    refused: list[str] = []
    calls = CallLimits(LimitSettings(admin_max_in_flight=2), refused.append)
    with acting_as(Principal("olga", frozenset({"ops_admin"}))):
        first = calls.admit(Peer("ipv4:1.1.1.1:1"), admin=True)
    with acting_as(Principal("mia", frozenset({"marketing"}))):
        second = calls.admit(Peer("ipv4:1.1.1.1:1"), admin=True)
        with pytest.raises(ResourceExhausted) as caught:
            calls.admit(Peer("ipv4:1.1.1.1:1"), admin=True)
        assert caught.value.metadata == {"limit": "admin_in_flight"}
        calls.release(calls.admit(Peer("ipv4:1.1.1.1:1")))  # not an admin call: admitted
    calls.release(first, admin=True)
    calls.release(second, admin=True)
    assert (calls.in_flight, calls.admin_in_flight) == (0, 0)
    assert refused == ["admin_in_flight"]
