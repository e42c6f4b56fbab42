"""The seed event sized from measured figures (issue 13, item 6; docs/capacity.md).

The event: 600,000 listeners at once, 1,000,000 join attempts within one minute, a host with 100M
followers notified. Nothing here is estimated from a model of the code: every per-core figure comes from a
run on the multi-host topology, each process in a container on a CPU quota and the load from outside it,

- `scaleout.json` (`townhall cluster scale`): admitted joins/s per admission core and listeners per edge
  core (p99 within the audience bar, nothing lost), each from the one-process step (N = 1, M = 1: one
  process at its quota while the machine has cores to spare, the cleanest reading of a process's cost),
  the scaling efficiency at the largest step beside it (sizing assumes linear scaling; the efficiency
  says how far the run bore that out), and the bytes each edge put on the wire per listener per second;
- `isolation.json` (`townhall cluster isolation`): followers notified per second per notifier core during
  the celebrity's fan-out, and the bytes of notification records per follower on Kafka.

The sizing rules (named constants below, stated again in the doc): joins are sized for a peak second at
PEAK_FACTOR times the minute's average (the waiting room spreads what is above it); every tier runs at
UTILISATION of its cores at the peak; a pod is one process on one core (the chart's limits); an edge pod
also stops at relay.listener_capacity listeners; the followers are all notified within NOTIFY_WITHIN_S.
A tier without its measured input says so and is not sized.

`python -m townhall_tools.bench.capacity [.townhall/bench]` writes capacity.json and capacity.png there and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# The seed event.
LISTENERS = 600_000
JOIN_ATTEMPTS = 1_000_000
JOIN_WINDOW_S = 60.0
FOLLOWERS = 100_000_000
# Sizing rules.
PEAK_FACTOR = 2.0  # the busiest second of the minute against its average
UTILISATION = 0.7  # the share of a tier's cores in use at the peak (the rest: GC, a pod lost, noise)
NOTIFY_WITHIN_S = 60.0  # every follower told within the minute the crowd arrives in
LISTENER_CAPACITY = 2_500  # relay.listener_capacity: an edge pod refuses Subscribe past it
EDGE_NIC_BYTES_S = 1.25e9  # a 10 Gbit/s interface per node, for the bandwidth column
BROKER_WRITE_BYTES_S = 50e6  # bytes/s one broker takes in comfortably (with replication 3, acks=all)
MIN_BROKERS = 3  # replication factor 3, min.insync.replicas 2


@dataclass(frozen=True)
class Tier:
    """One service's sizing: demand at the peak, the measured rate per core, and what follows."""

    service: str
    demand: str  # what drives it, in words with the figure
    per_core: float | None  # measured, in the unit of `unit`
    unit: str
    cores: int | None  # at UTILISATION
    pods: int | None
    bound: str  # what saturates first in one pod
    measured_in: str
    # Throughput at the largest step / (its count x one process's), as measured (None: one step only).
    efficiency: float | None = None


def _ceil(value: float) -> int:
    return max(1, math.ceil(value - 1e-9))


def _admission(scale: dict[str, Any]) -> Tier:
    points = scale.get("points") or []
    unit = "admitted joins/s per core"
    source = "scaleout.json (admission points)"
    peak = JOIN_ATTEMPTS / JOIN_WINDOW_S * PEAK_FACTOR
    demand = f"{peak:,.0f} joins/s at the peak ({JOIN_ATTEMPTS:,} in {JOIN_WINDOW_S:.0f} s, x{PEAK_FACTOR:g})"
    if not points:
        return Tier("admission", demand, None, unit, None, None, "not measured", source)
    one = next((p for p in points if p["admission"] == 1), None)
    if one is None or not one["admitted_per_s"]:
        return Tier("admission", demand, None, unit, None, None, "not measured (no N = 1 step)", source)
    per_core = one["admitted_per_s"] / scale["cpu_quota_cores"]
    cores = _ceil(peak / (per_core * UTILISATION))
    bound = "CPU (grpc.aio per-call work); the crowd lane sheds the rest at ~0.15 ms each"
    largest = max(points, key=lambda p: p["admission"])
    efficiency = _efficiency(largest["admitted_per_s"], largest["admission"], one["admitted_per_s"])
    name = "admission (owners + crowd lane)"
    return Tier(name, demand, round(per_core, 1), unit, cores, cores, bound, source, efficiency)


def _edges(scale: dict[str, Any]) -> tuple[Tier, dict[str, Any]]:
    relays = scale.get("relays") or {}
    points = relays.get("points") or []
    unit = "listeners per edge core"
    source = "scaleout.json (relays points)"
    demand = f"{LISTENERS:,} listeners, {relays.get('chunk_ms', 100)} ms chunks"
    one = next((p for p in points if p["edges"] == 1 and p["served"]), None)
    if one is None:
        return Tier("relay edges", demand, None, unit, None, None, "not measured", source), {}
    per_core = one["served"] / relays["cpu_quota_cores"]
    per_listener = one.get("sent_bytes_per_listener_s")
    largest = max(points, key=lambda p: p["edges"])
    per_pod_cpu = per_core * UTILISATION
    per_pod = min(per_pod_cpu, LISTENER_CAPACITY)
    limits = {"CPU": per_pod_cpu, "relay.listener_capacity": float(LISTENER_CAPACITY)}
    if per_listener:
        limits["NIC (10 Gbit/s)"] = EDGE_NIC_BYTES_S / per_listener
        per_pod = min(per_pod, limits["NIC (10 Gbit/s)"])
    bound = min(limits, key=lambda k: limits[k])
    pods = _ceil(LISTENERS / per_pod)
    bandwidth = {
        "bytes_per_listener_s": per_listener,
        "total_bytes_s": LISTENERS * per_listener if per_listener else None,
        "per_edge_pod_bytes_s": LISTENERS * per_listener / pods if per_listener else None,
    }
    tier = Tier(
        "relay edges",
        demand,
        round(per_core, 1),
        unit,
        _ceil(LISTENERS / per_pod_cpu),
        pods,
        f"{bound} (at {per_pod:,.0f} listeners per pod)",
        source,
        _efficiency(largest["served"], largest["edges"], one["served"]),
    )
    return tier, bandwidth


def _efficiency(value: float, count: int, one: float) -> float | None:
    return round(value / (count * one), 3) if count > 1 and one else None


def _notifiers(isolation: dict[str, Any]) -> tuple[Tier, dict[str, Any]]:
    notifications = isolation.get("notifications") or {}
    unit = "followers notified/s per notifier core"
    source = "isolation.json (notifications)"
    rate = FOLLOWERS / NOTIFY_WITHIN_S
    demand = f"{FOLLOWERS:,} followers within {NOTIFY_WITHIN_S:.0f} s ({rate:,.0f}/s)"
    per_core = notifications.get("fanout_per_core_s")
    if not per_core:
        return Tier("notifiers", demand, None, unit, None, None, "not measured", source), {}
    cores = _ceil(rate / (per_core * UTILISATION))
    per_follower = notifications.get("record_bytes_per_follower")
    kafka: dict[str, Any] = {"record_bytes_per_follower": per_follower}
    if per_follower:
        written = rate * per_follower
        kafka["notifications_bytes_s"] = written
        kafka["brokers"] = max(MIN_BROKERS, _ceil(3 * written / BROKER_WRITE_BYTES_S))
    # One partition per notifier worker at least, so every worker has one; 12 is the chart's default.
    kafka["partitions"] = max(12, cores)
    tier = Tier("notifiers", demand, round(per_core, 1), unit, cores, cores, "CPU (record expansion)", source)
    return tier, kafka


def size(bench: Path) -> dict[str, Any]:
    """The event sized from the JSON in `bench`; what a missing input leaves unsized is marked so."""

    def read(name: str) -> dict[str, Any]:
        path = bench / name
        return dict(json.loads(path.read_text())) if path.exists() else {}

    scale, isolation = read("scaleout.json"), read("isolation.json")
    admission = _admission(scale)
    edges, bandwidth = _edges(scale)
    notifiers, kafka = _notifiers(isolation)
    tiers = [admission, edges, notifiers]
    return {
        "event": {
            "listeners": LISTENERS,
            "join_attempts": JOIN_ATTEMPTS,
            "join_window_s": JOIN_WINDOW_S,
            "followers": FOLLOWERS,
        },
        "rules": {
            "peak_factor": PEAK_FACTOR,
            "utilisation": UTILISATION,
            "notify_within_s": NOTIFY_WITHIN_S,
            "listener_capacity": LISTENER_CAPACITY,
            "edge_nic_bytes_s": EDGE_NIC_BYTES_S,
            "broker_write_bytes_s": BROKER_WRITE_BYTES_S,
        },
        "measured_at": {
            name: (data or {}).get("at") for name, data in (("scaleout", scale), ("isolation", isolation))
        },
        "tiers": [asdict(t) for t in tiers],
        "total_cores": sum(t.cores or 0 for t in tiers),
        "bandwidth": bandwidth,
        "kafka": kafka,
    }


def table(report: dict[str, Any]) -> Table:
    """The tiers as a rich table."""
    out = Table(title="The seed event, sized from measured figures")
    for column in ("service", "demand", "measured per core", "cores", "pods", "saturates first"):
        out.add_column(column)
    for t in report["tiers"]:
        per_core = f"{t['per_core']:,} {t['unit']}" if t["per_core"] else "not measured"
        out.add_row(
            t["service"], t["demand"], per_core, str(t["cores"] or "-"), str(t["pods"] or "-"), t["bound"]
        )
    return out


def write(bench: Path) -> dict[str, Any]:
    """capacity.json and capacity.png in `bench`."""
    report = size(bench)
    (bench / "capacity.json").write_text(json.dumps(report, indent=2))
    from townhall_tools.bench import plots

    plots.write(bench, "capacity")
    return report


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m townhall_tools.bench.capacity", description=__doc__)
    parser.add_argument("bench", type=Path, nargs="?", default=Path(".townhall/bench"))
    report = write(parser.parse_args().bench)
    Console().print(table(report))


if __name__ == "__main__":
    main()
