"""Who may call which RPC: the seed's RBAC table, as data.

Keys are gRPC method full names ("/sira.experiments.v1.LifecycleService/
CreateExperiment"), built from the generated descriptors so a renamed RPC
fails at import instead of silently losing its protection. A method missing
from the table is denied to everyone (fail closed); health checks and server
reflection are public and never look at a token.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.descriptor import FileDescriptor

from sira.experiments.v1 import (
    assignment_service_pb2,
    insights_service_pb2,
    lifecycle_service_pb2,
    tracking_service_pb2,
)

OPS_ADMIN = "ops_admin"
MARKETING = "marketing"
DATA_SCIENCE = "data_science"
PAY_MODULE = "pay_module"
CONNECT_MODULE = "connect_module"

ROLES: frozenset[str] = frozenset({OPS_ADMIN, MARKETING, DATA_SCIENCE, PAY_MODULE, CONNECT_MODULE})
"""Every role name a token's `roles` claim may carry that means something here."""

_EDITORS = frozenset({OPS_ADMIN, MARKETING})
_ADMINS = frozenset({OPS_ADMIN})
_READERS = frozenset({OPS_ADMIN, MARKETING, DATA_SCIENCE})
_MODULES = frozenset({PAY_MODULE, CONNECT_MODULE})

# (file descriptor, service, {rpc: roles}, rpcs also open to anonymous callers)
_TABLE: tuple[tuple[FileDescriptor, str, Mapping[str, frozenset[str]], frozenset[str]], ...] = (
    (
        lifecycle_service_pb2.DESCRIPTOR,
        "LifecycleService",
        {
            "CreateExperiment": _EDITORS,
            "UpdateExperiment": _EDITORS,
            "StartExperiment": _EDITORS,
            "StopExperiment": _EDITORS,
            "ArchiveExperiment": _EDITORS,
            "DeleteExperiment": _ADMINS,
            "ArchiveStaleExperiments": _ADMINS,
            "GetExperiment": _READERS,
            "ListExperiments": _READERS,
            "ListAuditEvents": _READERS,
        },
        frozenset(),
    ),
    (
        insights_service_pb2.DESCRIPTOR,
        "InsightsService",
        {"GetResults": _READERS, "GetInsights": _READERS, "GetInsightsHistory": _READERS},
        frozenset(),
    ),
    (
        assignment_service_pb2.DESCRIPTOR,
        "AssignmentService",
        {"Assign": _MODULES, "AssignAll": _MODULES},
        frozenset(),
    ),
    (
        # The seed makes tracking public; the servicer then checks that the
        # subject really holds the assignment it reports on.
        tracking_service_pb2.DESCRIPTOR,
        "TrackingService",
        {"Track": _MODULES, "TrackBatch": _MODULES},
        frozenset({"Track", "TrackBatch"}),
    ),
)

PUBLIC_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Methods under these prefixes need no token; it is not even inspected."""


def _build() -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    roles: dict[str, frozenset[str]] = {}
    anonymous: set[str] = set()
    for file, service_name, rpcs, open_rpcs in _TABLE:
        service = file.services_by_name[service_name]
        known = {m.name for m in service.methods}
        unknown = (set(rpcs) | open_rpcs) - known
        if unknown:
            raise RuntimeError(
                f"RBAC table names RPCs {sorted(unknown)} absent from {service_name}"
            )
        for rpc, allowed in rpcs.items():
            roles[f"/{service.full_name}/{rpc}"] = allowed
        anonymous.update(f"/{service.full_name}/{rpc}" for rpc in open_rpcs)
    return roles, frozenset(anonymous)


METHOD_ROLES, ANONYMOUS_METHODS = _build()
"""Method full name -> roles allowed; methods also callable without a token."""


def allowed_roles(method: str) -> frozenset[str] | None:
    """Roles that may call `method`, or None when the method is not in the table (deny)."""
    return METHOD_ROLES.get(method)


def is_public(method: str) -> bool:
    """Health and reflection: served without looking at any token."""
    return method.startswith(PUBLIC_PREFIXES)


def allows_anonymous(method: str) -> bool:
    """Whether `method` may be called with no token at all."""
    return method in ANONYMOUS_METHODS
