"""helm test: each target answers grpc.health.v1 Check with SERVING, overall and per service.

Usage: python health_check.py [--timeout SECONDS] [--tls CA CERT KEY NAME] HOST:PORT=SERVICE[,SERVICE...] ...
With --tls the targets are dialled with TLS: trust CA, present CERT/KEY (mutual TLS), expect NAME in the
servers' certificates. Only grpcio and grpcio-health-checking are needed (both are in the Townhall image).
"""

import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


TLS: list = []  # [credentials, server name] when --tls is given


def _channel(target: str) -> grpc.Channel:
    if not TLS:
        return grpc.insecure_channel(target)
    credentials, name = TLS
    return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", name)])


def status(target: str, service: str) -> str:
    """The health status name of one service at target, or the gRPC error code name."""
    try:
        with _channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        return exc.code().name


def main(argv: list[str]) -> int:
    """Checks every target until all are SERVING or the timeout passes; 0 when all are."""
    timeout = 60.0
    if argv[:1] == ["--timeout"]:
        timeout, argv = float(argv[1]), argv[2:]
    if argv[:1] == ["--tls"]:
        ca, cert, key = (open(path, "rb").read() for path in argv[1:4])
        TLS[:] = [grpc.ssl_channel_credentials(ca, key, cert), argv[4]]
        argv = argv[5:]
    checks = []
    for arg in argv:
        target, _, services = arg.partition("=")
        checks += [(target, name) for name in ["", *filter(None, services.split(","))]]
    if not checks:
        print("no targets given", file=sys.stderr)
        return 2
    deadline = time.monotonic() + timeout
    pending = list(checks)
    while True:
        results = {check: status(*check) for check in pending}
        pending = [check for check, state in results.items() if state != "SERVING"]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(2)
    for target, name in checks:
        state = results.get((target, name), "SERVING")
        print(f"{'ok  ' if state == 'SERVING' else 'FAIL'} {target} {name or '(overall)'}: {state}")
    return 1 if pending else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
