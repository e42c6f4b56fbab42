"""Server child processes of the local topology, the benchmarks and the tests: start one, wait until it
serves, stop a few. One policy for all: a process serves when its gRPC health check says SERVING, or, for a
bare server with no health service (the benchmarks' bare_*_server), when it answers the check at all; one
that exits first fails at once, naming its log, instead of waiting out the timeout."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from townhall.core.channels import blocking_channel
from townhall.core.config import TlsConfig

Popen = subprocess.Popen[bytes]
POLL_S = 0.2


def wait_serving(
    process: Popen, address: str, name: str, timeout_s: float, tls: TlsConfig | None = None
) -> None:
    """Returns once the server `process` runs at `address` serves (see the module docstring); raises
    RuntimeError if it exits first, TimeoutError if it does not serve within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with blocking_channel(address, tls or TlsConfig()) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see its log")
            try:
                reply = check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a bare server: it answers, it serves
                    return
            time.sleep(POLL_S)
    raise TimeoutError(f"{name} not serving at {address} within {timeout_s:.0f} s; see its log")


def start_serving(
    name: str,
    argv: Sequence[str],
    env: dict[str, str],
    address: str,
    log: IO[Any],
    timeout_s: float,
    tls: TlsConfig | None = None,
    **popen: Any,
) -> Popen:
    """Starts `argv` (output to `log`) and waits until it serves at `address`; killed if it does not."""
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, **popen)
    try:
        wait_serving(process, address, name, timeout_s, tls)
    except BaseException:
        stop([process], grace_s=0)
        raise
    return process


def stop(processes: Iterable[Popen | None], grace_s: float = 10.0) -> None:
    """SIGTERM to every process still running, then waits for them together; kills those still running
    `grace_s` later."""
    running = [p for p in processes if p is not None and p.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
