"""grpc.health.v1.Health: grpc's reference servicer, plus the List method.

grpcio-health-checking's aio servicer implements Check and Watch, but not List, which
the health proto it ships declares (its base then raises NotImplementedError). List
here answers like grpc-go's reference server: the status of every service that was
ever set, the overall "" included, and RESOURCE_EXHAUSTED past `MAX_LISTED`. Check,
Watch, `set` and graceful shutdown stay the library's; this class keeps its own copy
of the statuses through those public methods rather than reading the base's private
state.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2

__all__ = ["MAX_LISTED", "HealthServicer"]

MAX_LISTED = 100
"""grpc-go's `maxAllowedServices`: a List of more services answers RESOURCE_EXHAUSTED."""

ServingStatus: TypeAlias = int  # health_pb2.HealthCheckResponse.ServingStatus


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, ServingStatus] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._closing = False

    async def set(self, service: str, status: ServingStatus) -> None:
        await super().set(service, status)
        if not self._closing:  # the base ignores `set` after graceful shutdown too
            self._statuses[service] = status

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._closing = True
        self._statuses = dict.fromkeys(self._statuses, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        if len(self._statuses) > MAX_LISTED:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server health list exceeds maximum capacity: {MAX_LISTED}",
            )
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._statuses.items()
            }
        )
