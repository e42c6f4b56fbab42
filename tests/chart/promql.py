"""Evaluates every dashboard panel query and alert expression against a live Prometheus.

    report = check("http://127.0.0.1:9090")
    assert not report.errors, report.summary()
    assert not report.unexpected_empty(), report.summary()

Queries come from helm/townhall/dashboards/*.json and helm/townhall/files/rules.yml (the files the chart
ships). Grafana's interval variables are replaced by fixed windows before evaluation, and a dashboard's
query variables (namespace, job) by what Grafana sends for their default, All: the variable's allValue, or
else every value its label_values() query finds in this Prometheus, as one regex. An alert expression
is normally empty (nothing firing), so for rules "no data" means a metric it reads is absent from
Prometheus; for panels it means the query itself returned no series.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "helm" / "townhall" / "dashboards"
RULES = REPO / "helm" / "townhall" / "files" / "rules.yml"
# Grafana's built-in interval variables, as fixed windows. 1m covers four scrapes at the local 15 s.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
# grpc_server_*: the RPC metrics (core/metrics.py RpcMetrics); never grpc_ alone, a label prefix.
METRIC = re.compile(r"\b((?:townhall|process|python|grpc_server)_[a-zA-Z0-9_]*)\b")
# Label names may share a metric's prefix (python_version): grouping lists and matchers hold no metric.
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
MATCHERS = re.compile(r"\{[^}]*\}")
LABEL_VALUES = re.compile(r"label_values\((.+),\s*(\w+)\s*\)", re.DOTALL)
# Characters Grafana escapes in each value of a multi-value variable it puts into a PromQL regex.
REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|{}\[\]']")
# Metrics a healthy run may leave without a series. None: a labelled counter has no series before its
# first increment, so every error, refusal and skip counter is given its known label values at 0 when the
# code that moves it starts (core/metrics.from_zero), and a panel or alert reading one has data (zeros)
# on a healthy system. A metric named here would hide exactly that.
EXPECTED_EMPTY_WHEN_HEALTHY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Variable:
    """A dashboard's query variable: label_values(<selector>, <label>), and its custom All value if any."""

    name: str
    query: str
    all_value: str | None = None

    def parse(self) -> tuple[str, str]:
        """(selector, label) of its label_values() query."""
        found = LABEL_VALUES.fullmatch(self.query.strip())
        if not found:
            raise ValueError(f"${self.name}: not a label_values(<selector>, <label>) query: {self.query}")
        return found.group(1).strip(), found.group(2)


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from (with its dashboard's variables)."""

    source: str  # "dashboard" or "rule"
    where: str  # "<dashboard title> / <panel title> / <refId>" or "<group> / <alert>"
    expr: str
    variables: tuple[Variable, ...] = ()

    @property
    def metrics(self) -> set[str]:
        """The metric names the expression reads (townhall_*, grpc_server_*, process_*, python_*)."""
        return set(METRIC.findall(MATCHERS.sub("", GROUPING.sub("", self.expr))))


@dataclass
class Result:
    """The outcome of one query: an error message, or the number of series returned."""

    query: Query
    error: str = ""
    series: int = 0
    missing_metrics: set[str] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        """A panel that showed nothing, or a rule reading a metric Prometheus does not have."""
        if self.error:
            return False
        if self.query.source == "rule":
            return bool(self.missing_metrics)
        return self.series == 0


@dataclass
class Report:
    """Every query's result."""

    results: list[Result]

    @property
    def errors(self) -> list[Result]:
        """Queries Prometheus rejected or failed to run."""
        return [r for r in self.results if r.error]

    @property
    def empty(self) -> list[Result]:
        """Queries that returned no data (panels) or read absent metrics (rules)."""
        return [r for r in self.results if r.empty]

    def unexpected_empty(self, expected: Iterable[str] = EXPECTED_EMPTY_WHEN_HEALTHY) -> list[Result]:
        """Empty results other than those explained by metrics that are empty when all is well."""
        allowed = set(expected)
        return [r for r in self.empty if not r.query.metrics <= allowed and not _absent(r) <= allowed]

    def summary(self) -> str:
        """A readable list of errored and empty queries."""
        lines = [f"{len(self.results)} queries, {len(self.errors)} errors, {len(self.empty)} empty"]
        lines += [f"ERROR {r.query.where}: {r.error}\n    {r.query.expr}" for r in self.errors]
        lines += [
            f"EMPTY {r.query.where}"
            + (f" (missing {', '.join(sorted(r.missing_metrics))})" if r.missing_metrics else "")
            + f"\n    {r.query.expr}"
            for r in self.empty
        ]
        return "\n".join(lines)


def _absent(result: Result) -> set[str]:
    return result.missing_metrics or result.query.metrics


def dashboard_queries(directory: Path = DASHBOARDS) -> list[Query]:
    """Every target expr of every panel (rows' nested panels included) of every dashboard."""
    queries = []
    for path in sorted(directory.glob("*.json")):
        dashboard = json.loads(path.read_text())
        variables = dashboard_variables(dashboard)
        for panel in _panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                where = f"{dashboard['title']} / {panel.get('title', '?')} / {target.get('refId', '?')}"
                queries.append(Query("dashboard", where, target.get("expr", ""), variables))
    return queries


def dashboard_variables(dashboard: dict[str, Any]) -> tuple[Variable, ...]:
    """The query variables of a dashboard, in the order Grafana resolves them."""
    found = []
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            found.append(Variable(v["name"], query, v.get("allValue") if v.get("includeAll") else None))
    return tuple(found)


def _panels(panels: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def rule_queries(path: Path = RULES) -> list[Query]:
    """Every alerting and recording rule expression in a Prometheus rules file."""
    document = yaml.safe_load(path.read_text())
    return [
        Query("rule", f"{group['name']} / {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in document["groups"]
        for rule in group["rules"]
    ]


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """Replaces Grafana's interval variables and the given ones ($name or ${name}); any other $variable is
    an error (it cannot be evaluated)."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    given = variables or {}

    def fill(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return given.get(name, match.group(0))

    expr = re.sub(r"\$\{(\w+)\}|\$(\w+)", fill, expr)
    leftover = [f"${m.group(1) or m.group(2)}" for m in re.finditer(r"\$\{(\w+)\}|\$(\w+)", expr)]
    if leftover:
        raise ValueError(f"unknown Grafana variables {leftover}")
    return expr


def all_values(prometheus: Prometheus, variables: Iterable[Variable]) -> dict[str, str]:
    """What Grafana puts in place of each variable set to All, resolving them in order (a variable's
    query may use the ones before it). A variable without allValue whose query finds nothing is an
    error: every panel filtered by it would be empty."""
    values: dict[str, str] = {}
    for variable in variables:
        selector, label = variable.parse()
        found = prometheus.get(f"label/{label}/values", **{"match[]": substitute(selector, values)})
        if variable.all_value is not None:
            values[variable.name] = variable.all_value
        elif found:
            escaped = [REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), v) for v in sorted(found)]
            values[variable.name] = "(" + "|".join(escaped) + ")"
        else:
            raise ValueError(f"${variable.name}: {variable.query} finds no values")
    return values


class Prometheus:
    """The few HTTP API calls the check needs."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def get(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data`, or raises RuntimeError with Prometheus's error."""
        url = f"{self.base_url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            # 400/422: a bad query, with a JSON error body; 503 "Service Unavailable" (text) until the
            # server is ready, which a busy machine makes last long enough to be asked.
            text = exc.read().decode(errors="replace")
            try:
                body = json.loads(text)
            except ValueError:
                raise RuntimeError(f"HTTP {exc.code}: {text.strip()[:200]}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query; the result vector (or matrix/scalar as one item)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.get("query", **params)
        result = data["result"]
        return result if isinstance(result, list) else [result]

    def metric_names(self) -> set[str]:
        """Every metric name Prometheus has series for."""
        return set(self.get("label/__name__/values"))

    def targets_up(self) -> dict[str, bool]:
        """scrapeUrl -> up, for every active target."""
        return {t["scrapeUrl"]: t["health"] == "up" for t in self.get("targets")["activeTargets"]}

    def rule_health(self) -> dict[str, str]:
        """'<group> / <rule>' -> lastError (only rules Prometheus could not evaluate)."""
        bad = {}
        for group in self.get("rules")["groups"]:
            for rule in group["rules"]:
                if rule.get("health") not in {"ok", "unknown"}:
                    bad[f"{group['name']} / {rule['name']}"] = rule.get("lastError", rule.get("health"))
        return bad


def wait_until_scraped(prometheus: Prometheus, timeout: float = 60.0, scrapes: int = 2) -> None:
    """Waits until every target is up and has been scraped `scrapes` times (rate() needs two samples)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            up = prometheus.targets_up()
            counts = prometheus.query("min(count_over_time(up[5m]))")
            seen = int(float(counts[0]["value"][1])) if counts else 0
            if up and all(up.values()) and seen >= scrapes:
                return
            state = f"targets {up}, scrapes {seen}"
        except (OSError, RuntimeError) as exc:
            state = str(exc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"Prometheus at {prometheus.base_url} not ready: {state}")
        time.sleep(1)


def evaluate(prometheus: Prometheus, queries: Iterable[Query], at: float | None = None) -> Report:
    """Runs every query; records errors, series counts and (for all) the metrics Prometheus lacks."""
    known = prometheus.metric_names()
    resolved: dict[tuple[Variable, ...], dict[str, str] | Exception] = {}
    results = []
    for query in queries:
        result = Result(query, missing_metrics=query.metrics - known)
        try:
            if query.variables not in resolved:
                try:
                    resolved[query.variables] = all_values(prometheus, query.variables)
                except (RuntimeError, ValueError, OSError) as exc:
                    resolved[query.variables] = exc
            values = resolved[query.variables]
            if isinstance(values, Exception):
                raise values
            result.series = len(prometheus.query(substitute(query.expr, values), at))
        except (RuntimeError, ValueError, OSError) as exc:
            result.error = str(exc)
        results.append(result)
    return Report(results)


def check(base_url: str, dashboards: Path = DASHBOARDS, rules: Path = RULES) -> Report:
    """Evaluates every dashboard panel query and alert expression; rules Prometheus failed count as errors."""
    prometheus = Prometheus(base_url)
    report = evaluate(prometheus, [*dashboard_queries(dashboards), *rule_queries(rules)])
    for where, error in prometheus.rule_health().items():
        report.results.append(Result(Query("rule", f"{where} (loaded)", ""), error=f"rule health: {error}"))
    return report
