"""The one place Townhall reads gRPC's private internals; tests/unit/test_grpc_internals.py checks them.

Everything else uses grpcio's public API. What is read here, and why:
- The reference aio HealthServicer's status table (`_server_status`): Check names the services a
  server knows when asked about another, and List answers from it (core/health.py). Not for speed:
  the reference servicer has no public read of its statuses, and it must stay the one that sets
  them (Watch and enter_graceful_shutdown work on that table).

What is no longer read, and the measurement that retired it: the handler wrapper used to take
grpc._utilities.DictionaryGenericHandler's private method table apart so that generic handlers were
wrapped once at registration. Measured on grpcio 1.85.1 (2 shared cores, under nice, best of 5 x 1M
calls): a generic lookup of a known method costs 105-115 ns that way and 300-320 ns through a public
wrapper that asks the handler and returns the wrapped method (core/interceptor._Generic); an unknown
method 80-95 ns against 105-150 ns. On served calls the gain is nil: grpc.aio serves a method
registered both ways (generated code registers both) from its registered handler, and 0 of 2,000
served Join calls, with and without the client's registered-method flag, reached a generic handler.
"""

from __future__ import annotations

from collections.abc import Mapping

from grpc_health.v1 import health

ServingStatus = int  # health_pb2.HealthCheckResponse.ServingStatus values


def health_statuses(servicer: health.aio.HealthServicer) -> Mapping[str, ServingStatus]:
    """The statuses the reference aio HealthServicer holds, by service name ("" is the server); read only."""
    statuses: Mapping[str, ServingStatus] = servicer._server_status
    return statuses
