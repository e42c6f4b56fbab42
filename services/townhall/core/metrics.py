"""Prometheus metrics shared by every service, and the metrics endpoint.

Names are in base units; `_total` only on counters; labels are low-cardinality (never a user id).
Domain metrics live beside the code that moves them, in each service's `metrics` module. RPCs are
counted under the gRPC ecosystem's names (`RpcMetrics`), so its dashboards and alerts work as they are.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from importlib import metadata
from itertools import accumulate

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

BUILD_INFO = Gauge(
    "townhall_build_info",
    "1 for the running process, labelled with its component and the versions it runs.",
    ["version", "python_version", "grpcio_version", "component"],
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


def build_info(component: str) -> None:
    """Sets townhall_build_info{component, version, python_version, grpcio_version} to 1."""
    try:
        version = metadata.version("townhall")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = "unknown"
    BUILD_INFO.labels(version, platform.python_version(), grpc.__version__, component).set(1)


# Status codes as the gRPC ecosystem's metrics spell them (Go's codes.Code.String()), so that
# dashboards written for go-grpc-prometheus match: "OK", "Canceled", "InvalidArgument", ...
GRPC_CODES = {code: "".join(w.capitalize() for w in code.name.split("_")) for code in grpc.StatusCode} | {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
}
RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60)
_LE = [*map(floatToGoString, RPC_BUCKETS), "+Inf"]


class RpcMethod:
    """One method's calls started and handled, and how long they took: plain numbers, so that counting
    a call costs a few attribute writes. prometheus_client's children take a lock per write: with them
    the metrics added 1.7-2.2 us to a call (two children; a third, for started, 0.3 us more), as this
    0.8-1.4 us (python -m townhall_tools.bench.limits_cost, "added by the RPC metrics", same runs on the
    shared 2-core machine). Written only by the event loop's thread (core/interceptor.py): `+=` is
    not atomic across threads. Read by the scrape's thread, which copies before it reads."""

    __slots__ = ("buckets", "handled", "labels", "seconds", "started")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.started = 0
        self.handled: dict[grpc.StatusCode, int] = {}
        self.buckets = [0] * len(_LE)  # per bucket, not cumulative: the bucket of `le` counts (prev, le]
        self.seconds = 0.0

    def handled_with(self, code: grpc.StatusCode, seconds: float) -> None:
        """Counts a call that ended with `code` after `seconds`."""
        handled = self.handled
        handled[code] = handled.get(code, 0) + 1
        self.buckets[bisect_left(RPC_BUCKETS, seconds)] += 1
        self.seconds += seconds


class RpcMetrics(Collector):
    """The gRPC server metrics of grpc-ecosystem/go-grpc-prometheus, by grpc_type (unary, client_stream,
    server_stream, bidi_stream), grpc_service, grpc_method (and grpc_code, spelled as GRPC_CODES):
    grpc_server_started_total, grpc_server_handled_total and grpc_server_handling_seconds (the time from
    a call's start to its status: a stream's whole life). A method's series exist from its registration;
    a code's from its first call."""

    def __init__(self) -> None:
        self._methods: dict[tuple[str, str, str], RpcMethod] = {}

    def method(self, service: str, method: str, kind: str) -> RpcMethod:
        """The record of one method (the same for every server of the process that serves it)."""
        labels = (kind, service, method)
        record = self._methods.get(labels)
        if record is None:
            record = self._methods[labels] = RpcMethod(labels)
        return record

    def describe(self) -> Iterator[Metric]:
        """The families, without samples (what the registry checks for clashing names)."""
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        """The families with a sample per method (and per code seen)."""
        started, handled, seconds = families = self._families()
        for record in list(self._methods.values()):  # list(): methods registered while scraped
            labels = record.labels
            started.add_metric(labels, record.started)
            for code, count in list(record.handled.items()):
                handled.add_metric((*labels, GRPC_CODES[code]), count)
            seconds.add_metric(
                labels, list(zip(_LE, accumulate(list(record.buckets)), strict=True)), record.seconds
            )
        return iter(families)

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                "grpc_server_started_total", "Total number of RPCs started on the server.", labels=RPC_LABELS
            ),
            CounterMetricFamily(
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
                labels=(*RPC_LABELS, "grpc_code"),
            ),
            HistogramMetricFamily(
                "grpc_server_handling_seconds",
                "Time from the start of an RPC to its status on the server (a stream's whole life).",
                labels=RPC_LABELS,
            ),
        )


RPCS = RpcMetrics()
REGISTRY.register(RPCS)


def serve_metrics(port: int, host: str) -> None:
    """Serves /metrics on `host`:`port` on a background thread; port 0 disables it."""
    if port:
        start_http_server(port, addr=host)
