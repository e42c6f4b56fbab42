"""gRPC health as every Townhall server serves it: the reference servicer, with refusals that say why."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2

from townhall.core.errors import InvalidArgument, NotFound
from townhall.core.grpc_internals import health_statuses

# A service name a caller may ask about, in bytes: Townhall's are under 40. A Watch keeps the name for
# as long as it is open (bounded by server.max_open_streams), so what a name can cost is bounded too.
MAX_SERVICE_BYTES = 256


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1.Health: Check names the services it knows when asked about another; List is served."""

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        """The status of one service ("" is the whole server); NOT_FOUND naming the known ones."""
        _check_name(request.service)
        statuses = health_statuses(self)
        status = statuses.get(request.service)
        if status is None:
            known = ", ".join(repr(name) for name in sorted(statuses))
            raise NotFound(f"this server has no service {request.service[:100]!r}; it knows {known}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        """The status of one service now and whenever it changes (SERVICE_UNKNOWN for one it does not know),
        until the server ends the stream (server.open_stream_max_s)."""
        _check_name(request.service)
        await super().Watch(request, context)

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """The status of every service this server knows."""
        held = health_statuses(self)
        statuses = {name: health_pb2.HealthCheckResponse(status=s) for name, s in held.items()}
        return health_pb2.HealthListResponse(statuses=statuses)


def _check_name(service: str) -> None:
    size = len(service.encode())
    if size > MAX_SERVICE_BYTES:
        raise InvalidArgument(
            f"service is {size} bytes; a service name is at most {MAX_SERVICE_BYTES}", "service"
        )
