"""Prometheus metrics shared by every service, and the metrics endpoint.

Names are in base units; `_total` only on counters; labels are low-cardinality (never a user id).
Domain metrics live beside the code that moves them, in each service's `metrics` module.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Histogram, start_http_server

RPC_REQUESTS = Counter(
    "townhall_rpc_requests_total",
    "RPCs finished, by method and gRPC status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
RPC_DURATION = Histogram(
    "townhall_rpc_duration_seconds",
    "Time from the start of an RPC to its status (a stream's whole life for streams).",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
)
KAFKA_PRODUCE_ERRORS = Counter(
    "townhall_kafka_produce_errors_total",
    "Kafka produce requests that failed, by topic.",
    ["topic"],
)

RATE_LIMITED = Counter(
    "townhall_rate_limited_total",
    "Client RPCs refused by a rate limit (core/limits.py), by class of method and key (user or address).",
    ["limit_class", "key"],
)
CALLS_REFUSED = Counter(
    "townhall_calls_refused_total",
    "Calls refused at once because a bound on calls in flight was reached (core/bounds.py), by bound.",
    ["bound"],
)
PEER_PROBES = Counter(
    "townhall_peer_probes_total",
    "Health probes of peer processes (admission probing members and relays), by result "
    "(serving, not_serving, busy, no_answer).",
    ["result"],
)


def from_zero(counter: Counter, *label_sets: str | Iterable[str]) -> None:
    """Gives `counter` a series at 0 for each set of label values (a string for a one-label counter).

    A labelled counter has no series before its first increment, so `rate(..._errors_total[5m])` in a
    dashboard or alert returns no data on a healthy system, not 0; and an alert's increase() misses the
    first error. Every counter whose label values are known in advance is given them when the code that
    moves it starts.
    """
    for labels in label_sets:
        counter.labels(*((labels,) if isinstance(labels, str) else labels))


def serve_metrics(port: int, host: str) -> None:
    """Serves /metrics on `host`:`port` on a background thread; port 0 disables it."""
    if port:
        start_http_server(port, addr=host)
