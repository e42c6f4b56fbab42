"""The helm test pod's script (helm/townhall/files/health_check.py) against a real gRPC health server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.chart.helpers import CHART
from townhall.core.certs import Authority

SCRIPT = CHART / "files" / "health_check.py"


@pytest.fixture
def server() -> Iterator[tuple[str, health.HealthServicer]]:
    """A gRPC server with only the health service; overall and townhall.v1.Relay SERVING."""
    servicer = health.HealthServicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    for name in ("", "townhall.v1.Relay"):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        grpc_server.stop(0)


def check(*args: str) -> subprocess.CompletedProcess[str]:
    # Exactly how the test pod runs it: the file's text through `python -c`.
    return subprocess.run(
        [sys.executable, "-c", SCRIPT.read_text(), *args], capture_output=True, text=True, timeout=60
    )


def test_serving_targets_pass(server: tuple[str, health.HealthServicer]) -> None:
    target, _ = server
    result = check("--timeout", "5", f"{target}=townhall.v1.Relay")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok  ") == 2


def test_a_draining_or_unknown_service_fails(server: tuple[str, health.HealthServicer]) -> None:
    target, servicer = server
    servicer.set("townhall.v1.Relay", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = check("--timeout", "1", f"{target}=townhall.v1.Relay,townhall.v1.Inbox")
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "NOT_SERVING" in result.stdout and "NOT_FOUND" in result.stdout


def test_an_unreachable_target_fails() -> None:
    result = check("--timeout", "1", "127.0.0.1:1=townhall.v1.Rooms")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stdout


def test_tls_targets_are_checked_with_the_pods_certificate(tmp_path: Path) -> None:
    """What the test pod does under mutual TLS: dial with the mounted certificate, expect its name."""
    ca = Authority(tmp_path)
    pem = ca.issue("townhall", dns=("townhall.internal",))
    servicer = health.HealthServicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    credentials = grpc.ssl_server_credentials(
        [(pem.key.read_bytes(), pem.cert.read_bytes())], ca.ca.read_bytes(), require_client_auth=True
    )
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        tls = ["--tls", str(ca.ca), str(pem.cert), str(pem.key), "townhall.internal"]
        result = check("--timeout", "5", *tls, f"127.0.0.1:{port}")
        assert result.returncode == 0, result.stdout + result.stderr
        plain = check("--timeout", "1", f"127.0.0.1:{port}")
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stdout
    finally:
        grpc_server.stop(0)
