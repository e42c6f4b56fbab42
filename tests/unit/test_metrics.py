"""Shared metrics: RPCs under the gRPC ecosystem's names, and townhall_build_info."""

from __future__ import annotations

import platform
from importlib import metadata

import grpc
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from townhall.core.metrics import GRPC_CODES, RpcMetrics, build_info

# Go's codes.Code.String(), as go-grpc-prometheus labels grpc_code.
GO_NAMES = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
]


def test_status_codes_are_spelled_as_the_grpc_ecosystem_spells_them() -> None:
    assert [GRPC_CODES[code] for code in sorted(grpc.StatusCode, key=lambda c: c.value[0])] == GO_NAMES


def test_a_method_has_series_from_registration_and_a_code_from_its_first_call() -> None:
    registry = CollectorRegistry()
    rpcs = RpcMetrics()
    registry.register(rpcs)
    join = rpcs.method("townhall.v1.Admission", "Join", "unary")
    assert rpcs.method("townhall.v1.Admission", "Join", "unary") is join  # one record for both ports
    labels = {"grpc_type": "unary", "grpc_service": "townhall.v1.Admission", "grpc_method": "Join"}
    assert registry.get_sample_value("grpc_server_started_total", labels) == 0
    assert registry.get_sample_value("grpc_server_handling_seconds_count", labels) == 0
    assert "grpc_server_handled_total{" not in generate_latest(registry).decode()

    join.started += 3
    join.handled_with(grpc.StatusCode.OK, 0.0005)  # a bucket counts values up to and including its bound
    join.handled_with(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0006)
    join.handled_with(grpc.StatusCode.OK, 100.0)
    assert registry.get_sample_value("grpc_server_started_total", labels) == 3
    assert registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 2
    exhausted = {**labels, "grpc_code": "ResourceExhausted"}
    assert registry.get_sample_value("grpc_server_handled_total", exhausted) == 1
    bucket = "grpc_server_handling_seconds_bucket"
    assert [
        registry.get_sample_value(bucket, {**labels, "le": le}) for le in ("0.0005", "0.001", "60.0", "+Inf")
    ] == [
        1,
        2,
        2,
        3,
    ]
    assert registry.get_sample_value("grpc_server_handling_seconds_sum", labels) == pytest.approx(100.0011)


def test_build_info_names_the_component_and_its_versions() -> None:
    build_info("notifier")
    labels = {
        "component": "notifier",
        "version": metadata.version("townhall"),
        "python_version": platform.python_version(),
        "grpcio_version": grpc.__version__,
    }
    assert REGISTRY.get_sample_value("townhall_build_info", labels) == 1
