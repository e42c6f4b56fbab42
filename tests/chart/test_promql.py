"""Every dashboard query and alert expression, run by a real Prometheus scraping the services' real metrics.

A child process imports the services' metric modules (the real names, labels and types), gives every
labelled metric a child and moves them all, and serves them on three ports as admission, relay and
notifier would. deploy/prometheus/render.py writes the scrape config for that topology; a real
Prometheus (built from source into .cache/bin, deploy/tools/install-prometheus.sh) scrapes it, loads the alert rules, and
tests/chart/promql.py evaluates everything. The live check on the real topology uses the same module.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chart import promql
from tests.chart.helpers import REPO
from townhall_tools.devtools.kafka_broker import free_port

EXPORTER = r"""
import importlib, sys, time
import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase
from townhall.core.metrics import RPCS

modules = ["townhall.core.metrics", "townhall.core.kafka", "townhall.core.records", "townhall.admission.metrics",
           "townhall.relay.metrics", "townhall.notifier.metrics"]
# Module-level children (a metric with its labels already set) are covered by their parent.
metrics = [m for name in modules for m in vars(importlib.import_module(name)).values()
           if isinstance(m, MetricWrapperBase) and not m._labelvalues]
services = {"Rooms": "Create", "Admission": "Join", "Relay": "Subscribe", "Graph": "Follow", "Inbox": "Watch"}

def children(metric):
    names = metric._labelnames
    if not names or metric._labelvalues:  # unlabelled, or a child a module resolved once
        return [metric]
    return [metric.labels(**{n: "x" for n in names})]

live = [c for m in metrics for c in children(m)]
# The RPC metrics are a collector of their own (RpcMetrics), moved as the interceptor moves them.
rpcs = [RPCS.method(f"townhall.v1.{service}", method, "server_stream" if service in ("Relay", "Inbox") else "unary")
        for service, method in services.items()]
for port in sys.argv[1:]:
    start_http_server(int(port), addr="127.0.0.1")
print("serving", flush=True)
while True:
    for c in live:
        if isinstance(c, Histogram):
            c.observe(0.05)
        elif isinstance(c, Gauge):
            c.set(3)
        else:
            c.inc()
    for rpc in rpcs:
        rpc.started += 2
        rpc.handled_with(grpc.StatusCode.OK, 0.05)
        rpc.handled_with(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.05)
    time.sleep(0.2)
"""


@pytest.fixture(scope="module")
def prometheus_url(prometheus_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping the exporter as the local topology, with the alert rules loaded."""
    tmp = tmp_path_factory.mktemp("prometheus")
    ports = {name: free_port() for name in ("admission", "relay", "notifier")}
    topology = {
        "services": {
            name: [{"grpc": "127.0.0.1:0", "metrics": f"http://127.0.0.1:{port}/metrics"}]
            for name, port in ports.items()
        }
    }
    (tmp / "topology.json").write_text(json.dumps(topology))
    render = [sys.executable, str(REPO / "deploy" / "prometheus" / "render.py"), "--interval", "1s"]
    subprocess.run(
        [*render, "--topology", str(tmp / "topology.json"), "--out", str(tmp / "prometheus.yml")], check=True
    )
    web = f"127.0.0.1:{free_port()}"
    exporter = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, *map(str, ports.values())], stdout=subprocess.PIPE, text=True
    )
    server = subprocess.Popen(
        [
            prometheus_server,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address={web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "prometheus.log").open("w"),
    )
    try:
        assert exporter.stdout is not None and exporter.stdout.readline().strip() == "serving"
        url = f"http://{web}"
        promql.wait_until_scraped(promql.Prometheus(url), timeout=60, scrapes=5)
        time.sleep(1)  # one more rule evaluation
        yield url
    finally:
        for process in (server, exporter):
            process.terminate()
            process.wait(timeout=30)


def test_every_query_and_rule_runs_and_finds_its_metrics(prometheus_url: str) -> None:
    report = promql.check(prometheus_url)
    assert report.results, "no queries found"
    assert not report.errors, report.summary()
    assert not report.unexpected_empty(), report.summary()
    # Every metric a query reads is exported by some service.
    missing = set().union(*(r.missing_metrics for r in report.results))
    assert not missing, report.summary()


def test_check_reports_bad_and_empty_queries(prometheus_url: str, tmp_path: Path) -> None:
    """The checker itself: a syntax error is an error; a query for an unknown metric is empty."""
    panel = {
        "title": "p",
        "targets": [{"refId": "A", "expr": "sum(rate(townhall_nope_total[$__rate_interval]))"}],
    }
    broken = {"title": "q", "targets": [{"refId": "A", "expr": "sum(rate(townhall_joins_total[5m]"}]}
    (tmp_path / "d.json").write_text(json.dumps({"title": "T", "panels": [panel, broken]}))
    rules = tmp_path / "rules.yml"
    rules.write_text("groups: [{name: g, rules: [{alert: A, expr: 'townhall_nope > 1'}]}]\n")
    report = promql.check(prometheus_url, dashboards=tmp_path, rules=rules)
    assert [r.query.where for r in report.errors if "(loaded)" not in r.query.where] == ["T / q / A"]
    assert sorted(r.query.where for r in report.empty) == ["T / p / A", "g / A"]


def test_check_fills_in_dashboard_variables_as_grafana_does_for_all(
    prometheus_url: str, tmp_path: Path
) -> None:
    """Each variable becomes what Grafana's All sends: its allValue, or the values its query finds."""

    def dashboard(title: str, jobs: str, expr: str) -> dict[str, Any]:
        variables = [
            {
                "name": "namespace",
                "type": "query",
                "includeAll": True,
                "allValue": ".*",
                "query": "label_values(up, namespace)",
            },
            {
                "name": "job",
                "type": "query",
                "includeAll": True,
                "query": {"query": f'label_values(up{{namespace=~"$namespace", job=~"{jobs}"}}, job)'},
            },
        ]
        panel = {"title": "p", "targets": [{"refId": "A", "expr": expr}]}
        return {"title": title, "templating": {"list": variables}, "panels": [panel]}

    up = 'up{namespace=~"$namespace", job=~"$job"}'
    for name, d in {
        "a": dashboard("Admission", "admission|admission-crowd", up),  # no crowd lane here
        "b": dashboard("Relay and notifier", "relay|notifier", up),
        "c": dashboard("Nobody", "nope", up),  # the job variable finds no job
    }.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    rules = tmp_path / "rules.yml"
    rules.write_text("groups: []\n")
    report = promql.check(prometheus_url, dashboards=tmp_path, rules=rules)
    by_title = {r.query.where.split(" / ")[0]: r for r in report.results}
    assert (by_title["Admission"].series, by_title["Admission"].error) == (1, "")
    assert (by_title["Relay and notifier"].series, by_title["Relay and notifier"].error) == (2, "")
    assert "finds no values" in by_title["Nobody"].error


def test_grafana_variables_are_substituted() -> None:
    assert promql.substitute("rate(x[$__rate_interval])") == "rate(x[1m])"
    filled = promql.substitute('x{job=~"$job", ns=~"${namespace}"}', {"job": "(a|b)", "namespace": ".*"})
    assert filled == 'x{job=~"(a|b)", ns=~".*"}'
    with pytest.raises(ValueError):
        promql.substitute('x{job="$job"}')
    with pytest.raises(ValueError):
        promql.substitute('x{job="$jobs"}', {"job": "a"})


def test_waiting_for_prometheus_outlasts_its_start() -> None:
    """Until it is ready, Prometheus answers its API with 503 and the text "Service Unavailable" (a busy
    machine makes that last long enough to be asked): the wait goes on instead of failing on the text."""
    answers = iter([None, None])  # two "not ready yet", then a ready server's answers

    class Starting(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if next(answers, "ready") is None:
                self.send_response(503)
                body = b"Service Unavailable"
            else:
                self.send_response(200)
                data: Any = {"activeTargets": [{"scrapeUrl": "http://a/metrics", "health": "up"}]}
                if self.path.startswith("/api/v1/query"):
                    data = {"resultType": "vector", "result": [{"metric": {}, "value": [0, "5"]}]}
                body = json.dumps({"status": "success", "data": data}).encode()
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Starting) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            promql.wait_until_scraped(promql.Prometheus(f"http://127.0.0.1:{server.server_port}"), 30, 2)
        finally:
            server.shutdown()
