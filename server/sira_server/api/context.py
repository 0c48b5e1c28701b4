"""The principal of the RPC being served, set by `guards.AuthGuard`.

Servicers call `current_principal()` to learn the actor (audit log, Track's
ownership check). grpc.aio runs each RPC's guards and handler in one
contextvars.Context, so the value never leaks between calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from sira_server.auth import Principal

_PRINCIPAL: ContextVar[Principal] = ContextVar("sira_principal")


def current_principal() -> Principal:
    """The caller of the current RPC; raises if no AuthGuard set one."""
    try:
        return _PRINCIPAL.get()
    except LookupError:
        raise RuntimeError(
            "no principal for this call: was the servicer registered through GuardedRegistrar?"
        ) from None


def set_principal(principal: Principal) -> None:
    """Set the caller for the rest of this RPC (its Context is its own)."""
    _PRINCIPAL.set(principal)


@contextmanager
def acting_as(principal: Principal) -> Iterator[Principal]:
    """Run servicer code as `principal` without a gRPC server (embedded use, tests)."""
    token = _PRINCIPAL.set(principal)
    try:
        yield principal
    finally:
        _PRINCIPAL.reset(token)
