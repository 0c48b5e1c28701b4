"""Admission of every guarded call: a server-wide cap on calls in flight, a smaller one
on admin (LifecycleService) calls, then the caller's token bucket and concurrency limit
(`rate_limiter`), by role.

Applied at registration by `GuardedRegistrar`, inside the auth wrapper (it needs the
principal) and outside the servicer. A refused call ends at once with
RESOURCE_EXHAUSTED, reason ERROR_REASON_RATE_LIMITED, metadata "limit" and a
google.rpc.RetryInfo: overload sheds load instead of queueing it.

Principals: an authenticated caller is limited by its token's subject; callers
without a token by their peer address (behind a proxy that hides it, they share one
bucket: raise the anonymous limits or limit at the proxy).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from sira_server.api.context import current_principal
from sira_server.api.guards import Guard, StreamBehaviour, UnaryBehaviour
from sira_server.auth import Principal
from sira_server.errors import ResourceExhausted
from sira_server.limit_settings import LimitSettings, RoleLimit
from sira_server.rate_limiter import RateLimiter

__all__ = ["CallLimits", "peer_host"]

SERVER_BUSY_RETRY_SECONDS = 0.1
ADMIN_PREFIX = "/sira.experiments.v1.LifecycleService/"
"""Admin calls: Postgres reads and writes, long pages; capped together."""


def peer_host(peer: str) -> str:
    """`ipv4:10.0.0.1:5000` -> `ipv4:10.0.0.1`; `ipv6:[::1]:5000` -> `ipv6:[::1]`."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer


class CallLimits(Guard):
    def __init__(
        self,
        settings: LimitSettings,
        on_limited: Callable[[str], None] = lambda limit: None,
    ) -> None:
        self._settings = settings
        self._on_limited = on_limited
        self._limiter = RateLimiter()
        self._by_roles: dict[frozenset[str], RoleLimit] = {}
        self.in_flight = 0
        self.admin_in_flight = 0

    def _refuse(self, limit: str, message: str, retry_after: float) -> ResourceExhausted:
        self._on_limited(limit)
        return ResourceExhausted(
            message, metadata={"limit": limit}, retry_after_seconds=retry_after
        )

    def _key(self, principal: Principal, context: Any) -> str:
        if principal.is_anonymous:
            return "peer:" + peer_host(str(context.peer()))
        return "sub:" + principal.subject

    def admit(self, context: Any, admin: bool = False) -> str:
        """Count one call in (returns the key to `release`) or raise ResourceExhausted."""
        cap = self._settings.max_in_flight
        if cap and self.in_flight >= cap:
            raise self._refuse(
                "server_in_flight",
                f"the server has {cap} calls in flight; retry shortly",
                SERVER_BUSY_RETRY_SECONDS,
            )
        admin_cap = self._settings.admin_max_in_flight
        if admin and admin_cap and self.admin_in_flight >= admin_cap:
            raise self._refuse(
                "admin_in_flight",
                f"the server has {admin_cap} LifecycleService calls in flight; retry shortly",
                SERVER_BUSY_RETRY_SECONDS,
            )
        principal = current_principal()
        limit = self._by_roles.get(principal.roles)
        if limit is None:
            limit = self._by_roles[principal.roles] = self._settings.role_limit(principal.roles)
        key = self._key(principal, context)
        refusal = self._limiter.acquire(key, limit, time.monotonic())
        if refusal is not None:
            if refusal.limit == "rate":
                message = f"over {limit.rate:g} calls per second (burst {limit.burst})"
            else:
                message = f"over {limit.concurrency} calls in flight"
            raise self._refuse(
                refusal.limit,
                f"rate limited: {message} for this caller",
                refusal.retry_after_seconds,
            )
        self.in_flight += 1
        self.admin_in_flight += admin
        return key

    def release(self, key: str, admin: bool = False) -> None:
        self.in_flight -= 1
        self.admin_in_flight -= admin
        self._limiter.release(key)

    def unary(self, behaviour: UnaryBehaviour, method: str) -> UnaryBehaviour:
        admit, release = self.admit, self.release
        admin = method.startswith(ADMIN_PREFIX)

        async def limited(request: Any, context: Any) -> Any:
            key = admit(context, admin)
            try:
                return await behaviour(request, context)
            finally:
                release(key, admin)

        return limited

    def stream(self, behaviour: StreamBehaviour, method: str) -> StreamBehaviour:
        admit, release = self.admit, self.release
        admin = method.startswith(ADMIN_PREFIX)

        async def limited(request: Any, context: Any) -> AsyncIterator[Any]:
            key = admit(context, admin)
            try:
                async for item in behaviour(request, context):
                    yield item
            finally:
                release(key, admin)

        return limited
