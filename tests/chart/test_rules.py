"""Alert rules, the local Prometheus config and the Grafana dashboards, checked with promtool and by parsing."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chart import promql
from tests.chart.helpers import CHART, REPO

RULES = CHART / "files" / "rules.yml"
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))


def run(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_checks_the_rules(promtool: Path) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_when_they_should_and_only_then(promtool: Path) -> None:
    """promtool unit tests: synthetic series for each alert (tests/chart/promtool/rules_test.yml)."""
    result = run(promtool, "test", "rules", "rules_test.yml", cwd=Path(__file__).parent / "promtool")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        line.split(":", 1)[1].strip()
        for line in (Path(__file__).parent / "promtool" / "rules_test.yml").read_text().splitlines()
        if line.strip().startswith("alertname:")
    }
    assert tested == {q.where.split(" / ")[1] for q in promql.rule_queries(RULES)}


def test_promtool_checks_the_local_prometheus_config(promtool: Path) -> None:
    result = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_plain_prometheus_uses_the_charts_rules() -> None:
    """One copy of the rules: deploy/prometheus/rules.yml is the chart's file."""
    assert (PROMETHEUS / "rules.yml").resolve() == RULES.resolve()


def test_committed_prometheus_config_is_rendered_from_the_default_topology() -> None:
    spec = importlib.util.spec_from_file_location("render", PROMETHEUS / "render.py")
    assert spec and spec.loader
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    expected = render.render(render.DEFAULT_TOPOLOGY, "rules.yml")
    assert (PROMETHEUS / "prometheus.yml").read_text() == expected


def test_render_makes_one_job_per_service_from_a_topology(promtool: Path, tmp_path: Path) -> None:
    topology = {
        "kafka": "127.0.0.1:19092",
        "services": {
            "admission": [
                {"grpc": "127.0.0.1:50051", "metrics": "http://127.0.0.1:9101/metrics"},
                {"grpc": "127.0.0.1:50061", "metrics": "http://127.0.0.1:9111/metrics"},
            ],
            "relay": [{"grpc": "127.0.0.1:50052", "metrics": "http://127.0.0.1:9102/metrics"}],
            "notifier": [{"grpc": "127.0.0.1:50053", "metrics": "http://127.0.0.1:9103/metrics"}],
        },
    }
    (tmp_path / "topology.json").write_text(json.dumps(topology))
    out = tmp_path / "conf" / "prometheus.yml"
    render = [sys.executable, str(PROMETHEUS / "render.py"), "--topology", str(tmp_path / "topology.json")]
    subprocess.run([*render, "--out", str(out)], check=True)
    text = out.read_text()
    assert 'job_name: "admission"' in text and '["127.0.0.1:9101", "127.0.0.1:9111"]' in text
    result = run(promtool, "check", "config", str(out))
    assert result.returncode == 0, result.stdout + result.stderr  # rule_files path resolves from there


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_parses_and_every_panel_has_a_query(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"].startswith("townhall-") and dashboard["title"].startswith("Townhall / ")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    scope = {v.name for v in promql.dashboard_variables(dashboard)}
    assert scope == {"namespace", "job"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and ids
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']} {target['refId']}"
            promql.substitute(target["expr"], dict.fromkeys(scope, ".*"))  # variables the live check fills in
            assert unscoped(target["expr"]) == [], f"{panel['title']} {target['refId']}: {target['expr']}"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24


def unscoped(expr: str) -> list[str]:
    """The metric selectors of a query that do not filter on both dashboard variables."""
    return [
        found.group(0)
        for found in re.finditer(promql.METRIC.pattern + r"(\{[^}]*\})?", promql.GROUPING.sub("", expr))
        if not found.group(2)
        or 'namespace=~"$namespace"' not in found.group(2)
        or 'job=~"$job"' not in found.group(2)
    ]


def test_a_query_without_the_dashboard_variables_is_found() -> None:
    assert unscoped('sum(rate(townhall_joins_total{job=~"$job"}[1m])) / sum(townhall_rooms_live)') == [
        'townhall_joins_total{job=~"$job"}',
        "townhall_rooms_live",
    ]
    assert unscoped('max(townhall_rooms_live{namespace=~"$namespace", job=~"$job", x="y"})') == []
    # Label names are not metrics, even with a metric's prefix; the RPC metrics are selectors too.
    assert (
        unscoped('count by (python_version) (townhall_build_info{namespace=~"$namespace", job=~"$job"})')
        == []
    )
    assert unscoped("sum by (grpc_code) (rate(grpc_server_handled_total[1m]))") == [
        "grpc_server_handled_total"
    ]


def test_a_querys_metrics_are_its_metric_names_not_its_labels() -> None:
    expr = (
        'count by (python_version) (townhall_build_info{python_version="3.11"}) + grpc_server_started_total'
    )
    assert promql.Query("rule", "x", expr).metrics == {"townhall_build_info", "grpc_server_started_total"}


def test_dashboards_are_generated_from_their_source() -> None:
    result = run(sys.executable, str(REPO / "deploy" / "grafana" / "dashboards.py"), "--check")
    assert result.returncode == 0, result.stderr


def test_overview_shows_what_an_operator_watches() -> None:
    overview = json.loads((CHART / "dashboards" / "overview.json").read_text())
    exprs = " ".join(t["expr"] for p in overview["panels"] for t in p["targets"])
    for metric in [
        "townhall_rooms_live",
        "townhall_relay_listeners",
        "townhall_joins_total",
        'grpc_server_handling_seconds_bucket{namespace=~"$namespace", job=~"$job", '
        'grpc_service="townhall.v1.Admission", grpc_method="Join"}',
        "townhall_relay_frame_delay_seconds_bucket",
        "townhall_relay_chunks_dropped_total",
        "townhall_notifier_fanout_lag_seconds_bucket",
        "townhall_notifications_total",
        "townhall_kafka_produce_errors_total",
        "townhall_kafka_consumer_lag_records",
    ]:
        assert metric in exprs, metric
    assert "histogram_quantile(0.99" in exprs
