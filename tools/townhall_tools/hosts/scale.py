"""The scale-out curve of admission (issue 13, item 5): N admission processes, each in a container with the
same CPU quota, against an open-loop join load generated outside every quota (on the host).

For each N the topology is brought up afresh with N owners (no crowd lane, one relay, one notifier), cold
rooms are created, and `offered_per_process * N` joins/s are offered to them at every owner's own address
(Host.direct: no docker-proxy in the path) by bench.join_load's generator; admitted joins/s, p99 latency
and the server cores used are recorded. The scaling efficiency at N is admitted(N) / (N * admitted(1)).
JSON and a PNG go to the bench folder (`scaleout.json`, `scaleout.png`, bench/plots.py).

The figure only means something when the generator has cores of its own: on a machine shared with other
work the curve shows the generator's and the neighbours' limits as much as admission's.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from townhall.core.config import TlsConfig
from townhall_tools.bench.join_load import Load, make_rooms, offer, wait_live
from townhall_tools.hosts.cluster import LIMITS, Cluster, plan

console = Console(stderr=True)
STEPS_MAX = 8


async def _point(cluster: Cluster, offered: float, seconds: float, cold_rooms: int) -> dict[str, Any]:
    owners = cluster.of("admission")
    addresses = tuple(h.direct for h in owners)
    auth, tls = cluster.secrets.auth, TlsConfig()
    _, colds = await make_rooms(addresses[0], cold_rooms, auth, tls)
    await wait_live(addresses, colds, auth, tls)
    load = Load(addresses, None, 0.0, tuple(colds), offered, seconds, generators=2, auth=auth, tls=tls)
    return await offer(load, [cluster.pid(h) for h in owners], f"admission x{len(owners)}", console)


def run(
    root: Path,
    image: str,
    kafka_image: str,
    steps: list[int],
    offered_per_process: float,
    seconds: float,
    out_dir: Path,
    cold_rooms: int = 50,
) -> dict[str, Any]:
    """Each step's figures and the efficiencies; writes scaleout.json and scaleout.png to `out_dir`."""
    if not steps or len(steps) > STEPS_MAX or any(not 1 <= n <= 8 for n in steps):
        raise ValueError(f"steps: 1..{STEPS_MAX} counts of 1..8 admission processes, not {steps}")
    points: list[dict[str, Any]] = []
    for n in steps:
        cluster = Cluster(root, image, kafka_image, plan(admission=n, crowd=0, relays=1, notifiers=1))
        cluster.down()
        started = time.monotonic()
        cluster.up()
        up_s = time.monotonic() - started
        try:
            figures = asyncio.run(_point(cluster, offered_per_process * n, seconds, cold_rooms))
        finally:
            cluster.down()
        points.append(
            {
                "admission": n,
                "offered_per_s": offered_per_process * n,
                "admitted_per_s": figures["admitted_per_s"],
                "p99_ms": figures["cold"]["p99_ms"],
                "server_cpu_cores": figures["server_cpu_cores"],
                "generator_cpu_cores": figures["generator_cpu_cores"],
                "up_s": round(up_s, 1),
                "figures": figures,
            }
        )
        console.print(
            f"admission x{n}: {figures['admitted_per_s']} joins/s admitted, p99 {points[-1]['p99_ms']} ms"
        )
    base = next((p["admitted_per_s"] for p in points if p["admission"] == 1), None)
    for point in points:
        point["efficiency"] = (
            round(point["admitted_per_s"] / (point["admission"] * base), 3) if base else None
        )
    report = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "cpu_quota_cores": LIMITS["admission"][0],
        "seconds": seconds,
        "offered_per_process": offered_per_process,
        "points": points,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scaleout.json").write_text(json.dumps(report, indent=2))
    from townhall_tools.bench import plots

    plots.write(out_dir, "scaleout")
    return report


def _cpus() -> int:
    return os.cpu_count() or 0
