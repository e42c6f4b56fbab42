"""Writes the Grafana dashboards (helm/townhall/dashboards/*.json) from the panel lists below.

The JSON files are committed (the chart packages them); tests/chart checks they match this script.
Run: python deploy/grafana/dashboards.py   (or: make dashboards-json)

Queries use `job` = the service name (admission, relay, notifier; admission-crowd for admission's crowd
lane), as the chart's ServiceMonitor and deploy/prometheus/render.py label them, and Grafana's
$__rate_interval. Every dashboard has a `namespace` and a `job` variable (All by default; namespace All
also matches series without the label, as a local Prometheus has them), and every selector of every
query carries both, so one Grafana shows one release, or one component, among several.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "helm" / "townhall" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
# Admission's processes: the owners and the crowd lane.
ADMISSION_JOBS = "admission|admission-crowd"
ALL_JOBS = f"{ADMISSION_JOBS}|relay|notifier"
# Every selector of every query is scoped to the dashboard's variables.
SCOPE = 'namespace=~"$namespace", job=~"$job"'


@dataclass
class Panel:
    """One panel: a title, its queries as (expr, legend) pairs, a unit, and its kind."""

    title: str
    queries: list[tuple[str, str]]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    width: int = 12
    height: int = 8


@dataclass
class Dashboard:
    """A dashboard: uid, title and panels laid out left to right, top to bottom."""

    uid: str
    title: str
    description: str
    jobs: str  # the regex of the jobs the `job` variable offers
    panels: list[Panel] = field(default_factory=list)


def sel(*matchers: str) -> str:
    """A label selector: the dashboard's namespace and job variables, then `matchers`."""
    return "{" + ", ".join([SCOPE, *matchers]) + "}"


def rate(metric: str, by: str = "", matchers: str = "") -> str:
    """sum [by (...)] (rate(metric{scope, matchers}[$__rate_interval]))."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{sel(*filter(None, [matchers]))}[{RATE}]))"


def gauge(aggregation: str, metric: str, by: str = "") -> str:
    """aggregation [by (...)] (metric{scope})."""
    grouping = f" by ({by})" if by else ""
    return f"{aggregation}{grouping} ({metric}{sel()})"


def quantile(q: float, histogram: str, by: str = "", matchers: str = "") -> str:
    """histogram_quantile(q, sum by (le[, ...]) (rate(<histogram>_bucket{scope, ...}[$__rate_interval])))."""
    labels = ", ".join(["le", *([by] if by else [])])
    bucket = f"{histogram}_bucket{sel(*filter(None, [matchers]))}"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({bucket}[{RATE}])))"


def latency(histogram: str, matchers: str = "") -> list[tuple[str, str]]:
    """p50 and p99 of a histogram (of its series that match `matchers`)."""
    return [
        (quantile(0.5, histogram, matchers=matchers), "p50"),
        (quantile(0.99, histogram, matchers=matchers), "p99"),
    ]


# Joins are timed by the RPC interceptor like every call (there is no join histogram of its own).
JOIN_LATENCY = latency(
    "grpc_server_handling_seconds", 'grpc_service="townhall.v1.Admission", grpc_method="Join"'
)


def rpc_panels(services: str, streams_only: bool = False) -> list[Panel]:
    """RPC rate, error ratio and latency (unary calls, or stream lifetimes) of a service's gRPC services."""
    calls = f'grpc_service=~"{services}"'
    ok = f'grpc_service=~"{services}", grpc_code="OK"'
    # A service with only streaming methods (Relay) has no unary latency to show: show stream lifetimes.
    kind = 'grpc_type=~".*_stream"' if streams_only else 'grpc_type="unary"'
    unary = f'grpc_service=~"{services}", {kind}'
    latency_title = "Stream lifetime p99 by method" if streams_only else "Unary RPC latency p99 by method"
    return [
        Panel(
            "RPCs/s by method and code",
            [
                (
                    rate("grpc_server_handled_total", "grpc_method, grpc_code", calls),
                    "{{grpc_method}} {{grpc_code}}",
                )
            ],
            "reqps",
        ),
        Panel(
            "RPC error ratio by method",
            [
                (
                    f"1 - {rate('grpc_server_handled_total', 'grpc_method', ok)}"
                    f" / {rate('grpc_server_handled_total', 'grpc_method', calls)}",
                    "{{grpc_method}}",
                )
            ],
            "percentunit",
            "Share of finished RPCs with a status other than OK (shed joins count: ResourceExhausted).",
        ),
        Panel(
            latency_title,
            [(quantile(0.99, "grpc_server_handling_seconds", "grpc_method", unary), "{{grpc_method}}")],
            "s",
        ),
        Panel(
            "CPU per process (cores)",
            [(rate("process_cpu_seconds_total", "instance"), "{{instance}}")],
            "short",
            "One Python process uses at most one core.",
        ),
        Panel(
            "Resident memory per process",
            [(gauge("sum", "process_resident_memory_bytes", "instance"), "{{instance}}")],
            "bytes",
        ),
    ]


def kafka_panels(best_effort: bool = True) -> list[Panel]:
    """Kafka produce errors, records skipped and (for a service that sends best-effort events: admission's
    presence) events queued or dropped by one service."""
    events = Panel(
        "Events queued for Kafka, dropped/s",
        [
            (gauge("sum", "townhall_events_queued"), "queued"),
            (rate("townhall_events_dropped_total", "topic"), "dropped {{topic}}"),
        ],
        "short",
        "Best-effort events (presence) wait in a bounded queue; a full queue drops and counts them.",
    )
    produce = Panel(
        "Kafka produce errors/s by topic",
        [(rate("townhall_kafka_produce_errors_total", "topic"), "{{topic}}")],
        "ops",
    )
    return [produce, *([events] if best_effort else []), skipped_panel()]


def skipped_panel() -> Panel:
    """Kafka records consumers skipped (core/records.py), by topic and reason."""
    return Panel(
        "Kafka records skipped/s by topic and reason",
        [(rate("townhall_kafka_records_skipped_total", "topic, reason"), "{{topic}} {{reason}}")],
        "ops",
        "Records a consumer did not act on: malformed, invalid, unsigned, forged, stale or failed "
        "(docs/hostile-input.md). Normally none.",
    )


OVERVIEW = Dashboard(
    "townhall-overview",
    "Townhall / Overview",
    "The whole system at a glance: rooms, joins, audio, notifications and Kafka.",
    ALL_JOBS,
    [
        Panel(
            "Live rooms",
            [(gauge("max", "townhall_rooms_live"), "rooms")],
            kind="stat",
            width=6,
            height=4,
            description="Every admission process knows every live room; max over processes.",
        ),
        Panel(
            "Listeners",
            [(gauge("sum", "townhall_relay_listeners"), "listeners")],
            kind="stat",
            width=6,
            height=4,
            description="Subscribe streams open on all relays.",
        ),
        Panel(
            "Speakers publishing",
            [(gauge("sum", "townhall_relay_publishers"), "publishers")],
            kind="stat",
            width=6,
            height=4,
        ),
        Panel(
            "Inbox connections",
            [(gauge("sum", "townhall_notifier_inbox_connections"), "inbox")],
            kind="stat",
            width=6,
            height=4,
        ),
        Panel(
            "Joins/s: admitted, waiting, shed, rejected",
            [(rate("townhall_joins_total", "result"), "{{result}}")],
            "ops",
            "Shedding (RESOURCE_EXHAUSTED with retry-after) is the designed answer to a join storm.",
        ),
        Panel(
            "Join latency",
            JOIN_LATENCY,
            "s",
            "Admission.Join calls from their start to their status, every outcome (shed joins included).",
        ),
        Panel(
            "Audio latency (capture to chunk emit)",
            latency("townhall_relay_frame_delay_seconds"),
            "s",
            "Relay frame delay: from the speaker's capture clock to the chunk that carries the frame.",
        ),
        Panel(
            "Dropped chunks/s, cut subscribers/s",
            [
                (rate("townhall_relay_chunks_dropped_total"), "chunks dropped"),
                (rate("townhall_relay_subscribers_cut_total"), "subscribers cut"),
            ],
            "ops",
            "Slow listeners lose their oldest chunks; stuck ones are cut off. Healthy listeners lose none.",
        ),
        Panel(
            "Follower fan-out lag",
            latency("townhall_notifier_fanout_lag_seconds"),
            "s",
            "From a room's start to the acknowledgement of its last notification record.",
        ),
        Panel("Notifications/s by path", [(rate("townhall_notifications_total", "path"), "{{path}}")], "ops"),
        Panel(
            "Kafka produce errors/s by topic",
            [(rate("townhall_kafka_produce_errors_total", "topic"), "{{topic}}")],
            "ops",
        ),
        Panel(
            "Kafka consumer lag by group and topic",
            [(gauge("sum", "townhall_kafka_consumer_lag_records", "group, topic"), "{{group}} {{topic}}")],
            "short",
            "Records between each consumer group's position and the end of each topic.",
        ),
        skipped_panel(),
        Panel(
            "Processes by component and version",
            [
                (
                    gauge(
                        "count", "townhall_build_info", "component, version, python_version, grpcio_version"
                    ),
                    "{{component}} {{version}} (Python {{python_version}}, grpcio {{grpcio_version}})",
                )
            ],
            "short",
            "townhall_build_info: during a rolling upgrade, two versions of a component side by side.",
        ),
    ],
)

ADMISSION = Dashboard(
    "townhall-admission",
    "Townhall / Admission",
    "Rooms, roles and joins.",
    ADMISSION_JOBS,
    [
        Panel("Joins/s by result", [(rate("townhall_joins_total", "result"), "{{result}}")], "ops"),
        Panel(
            "Join latency",
            JOIN_LATENCY,
            "s",
            "Admission.Join calls inside one admission process, from their start to their status: "
            "authentication, limits, the join decision and ticket signing; every outcome, shed joins "
            "included.",
        ),
        Panel("Live rooms per process", [(gauge("max", "townhall_rooms_live", "instance"), "{{instance}}")]),
        Panel(
            "Admitted listeners per process",
            [(gauge("sum", "townhall_admission_listeners", "instance"), "{{instance}}")],
        ),
        Panel(
            "WatchRoom streams per process",
            [(gauge("sum", "townhall_watch_streams", "instance"), "{{instance}}")],
            description="Open WatchRoom streams (at most admission.max_watch_streams; docs/live-state.md).",
        ),
        Panel(
            "WatchRoom updates/s by kind, and resyncs/s",
            [
                (rate("townhall_watch_updates_total", "kind"), "{{kind}}"),
                (rate("townhall_watch_resyncs_total"), "resyncs (a stream a whole queue behind)"),
            ],
            "ops",
            "Updates queued on WatchRoom streams: a room version (with its events) or counts; each room's "
            "update is serialised once and written to every stream. Resyncs: readers too slow for the "
            "updates, sent the room as it is instead of what they missed.",
        ),
        Panel(
            "Room changes/s by kind",
            [(rate("townhall_room_changes_total", "change"), "{{change}}")],
            "ops",
            "Authoritative changes, acknowledged by Kafka (acks=all) before the RPC returns: lifecycle "
            "(created, started, ended), moderation (hand_raised, invited, role_changed, muted, removed, "
            "banned, ...) and host failover (handed_over, abandoned).",
        ),
        Panel(
            "Host failovers/s by outcome",
            [(rate("townhall_host_failovers_total", "outcome"), "{{outcome}}")],
            "ops",
            "Rooms whose host had no relay stream for admission.host_grace_s: handed_over to a co-host, "
            "or ended (no host or co-host connected).",
        ),
        *rpc_panels("townhall.v1.(Rooms|Admission)"),
        *kafka_panels(),
    ],
)

RELAY = Dashboard(
    "townhall-relay",
    "Townhall / Relay",
    "The audio path: publishers, listeners, chunks.",
    "relay",
    [
        Panel(
            "Listeners per relay", [(gauge("sum", "townhall_relay_listeners", "instance"), "{{instance}}")]
        ),
        Panel(
            "Publishers and rooms per relay",
            [
                (gauge("sum", "townhall_relay_publishers", "instance"), "publishers {{instance}}"),
                (gauge("sum", "townhall_relay_rooms", "instance"), "rooms {{instance}}"),
            ],
        ),
        Panel(
            "Frames in/s, chunks emitted/s, chunks out/s",
            [
                (rate("townhall_relay_frames_in_total"), "frames in"),
                (rate("townhall_relay_chunks_emitted_total"), "chunks emitted"),
                (rate("townhall_relay_chunks_out_total"), "chunks out"),
            ],
            "ops",
            "A chunk is serialised once (emitted) and written to every subscriber (out).",
        ),
        Panel("Audio latency (capture to chunk emit)", latency("townhall_relay_frame_delay_seconds"), "s"),
        Panel(
            "Dropped chunks/s, cut subscribers/s, rejected frames/s",
            [
                (rate("townhall_relay_chunks_dropped_total"), "chunks dropped"),
                (rate("townhall_relay_subscribers_cut_total"), "subscribers cut"),
                (rate("townhall_relay_frames_rejected_total"), "frames rejected"),
            ],
            "ops",
        ),
        Panel("Chunk size", latency("townhall_relay_chunk_bytes"), "bytes"),
        Panel(
            "Streams cut by moderation/s by reason, muted frames dropped/s",
            [
                (rate("townhall_relay_streams_revoked_total", "reason"), "cut: {{reason}}"),
                (rate("townhall_relay_frames_muted_total"), "muted frames dropped"),
            ],
            "ops",
            "Streams a room change revoked on this relay (removed, banned, demoted, ended room); frames of "
            "muted speakers dropped at the origin.",
        ),
        Panel(
            "Revocation delay (room change written to stream cut)",
            latency("townhall_relay_revocation_delay_seconds"),
            "s",
            "From the room-state record's timestamp to the relay ending the streams it revokes.",
        ),
        *rpc_panels("townhall.v1.Relay", streams_only=True),
    ],
)

NOTIFIER = Dashboard(
    "townhall-notifier",
    "Townhall / Notifier",
    "Follower graph, fan-out and Inbox.",
    "notifier",
    [
        Panel(
            "Notifications/s by path",
            [(rate("townhall_notifications_total", "path"), "{{path}}")],
            "ops",
            "topic: records acknowledged on the notifications topic; inbox: queued to a connected client.",
        ),
        Panel("Fan-out lag", latency("townhall_notifier_fanout_lag_seconds"), "s"),
        Panel(
            "Room-start events/s by outcome",
            [(rate("townhall_notifier_fanout_events_total", "outcome"), "{{outcome}}")],
            "ops",
        ),
        Panel(
            "Inbox: connections, duplicates dropped/s, overflow dropped/s",
            [
                (gauge("sum", "townhall_notifier_inbox_connections"), "connections"),
                (rate("townhall_notifier_duplicates_dropped_total"), "duplicates dropped"),
                (rate("townhall_notifier_inbox_dropped_total"), "overflow dropped"),
            ],
        ),
        Panel(
            "Follow edges stored",
            [(gauge("sum", "townhall_notifier_followers_stored", "instance"), "{{instance}}")],
        ),
        Panel(
            "Follows/s and unfollows/s",
            [
                (rate("townhall_notifier_follows_total"), "follows"),
                (rate("townhall_notifier_unfollows_total"), "unfollows"),
            ],
            "ops",
        ),
        Panel(
            "Kafka consumer lag by group and topic",
            [(gauge("sum", "townhall_kafka_consumer_lag_records", "group, topic"), "{{group}} {{topic}}")],
        ),
        *rpc_panels("townhall.v1.(Graph|Inbox)"),
        *kafka_panels(best_effort=False),  # the notifier's writes are all acknowledged: no event queue
    ],
)

DASHBOARDS = {"overview": OVERVIEW, "admission": ADMISSION, "relay": RELAY, "notifier": NOTIFIER}


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    """The Grafana JSON model of one panel."""
    targets = [
        {
            "datasource": DATASOURCE,
            "refId": chr(ord("A") + i),
            "expr": expr,
            "legendFormat": legend,
            "range": True,
            "instant": False,
        }
        for i, (expr, legend) in enumerate(panel.queries)
    ]
    body: dict = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
    }
    if panel.kind == "stat":
        body["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
        }
    else:
        body["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return body


def variable(name: str, label: str, query: str, all_value: str | None = None) -> dict:
    """A multi-value query variable, All by default. Grafana's All is `all_value` when given, else the
    values the query found, as one regex."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": query,
        "definition": query,
        "regex": "",
        "sort": 1,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        **({"allValue": all_value} if all_value is not None else {}),
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "options": [],
    }


def dashboard_json(dashboard: Dashboard) -> dict:
    """The Grafana JSON model of one dashboard, panels placed on the 24-column grid."""
    panels, x, y, row_height = [], 0, 0, 0
    for i, panel in enumerate(dashboard.panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(panel_json(panel, i, x, y))
        x, row_height = x + panel.width, max(row_height, panel.height)
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["townhall"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "browser",
        "links": [{"title": "Townhall", "type": "dashboards", "tags": ["townhall"], "asDropdown": True}],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "options": [],
                },
                # No namespace (a local Prometheus) leaves only All, which matches series without it.
                variable("namespace", "Namespace", f'label_values(up{{job=~"{ALL_JOBS}"}}, namespace)', ".*"),
                variable(
                    "job", "Job", f'label_values(up{{namespace=~"$namespace", job=~"{dashboard.jobs}"}}, job)'
                ),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{name}.json": json.dumps(dashboard_json(d), indent=2) + "\n" for name, d in DASHBOARDS.items()}


def main() -> int:
    """Writes the dashboards; with --check, exits 1 if the committed files differ instead."""
    check = "--check" in sys.argv[1:]
    stale = []
    for name, text in render().items():
        path = OUT / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(
            f"stale dashboards (run python deploy/grafana/dashboards.py): {', '.join(stale)}", file=sys.stderr
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
