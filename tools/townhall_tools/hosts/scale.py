"""The scale-out curves (issue 13, item 5): N admission processes, and M edge relays, each in a container
with the same CPU quota, against a load generated outside every quota (on the host).

For each N the topology is brought up afresh with N owners (no crowd lane, one relay, one notifier), cold
rooms are created, and joins are offered to them at every owner's own address (Host.direct: no
docker-proxy in the path) by bench.join_load's generators (ghz's runner when `make joinload` built it),
at rates rising from `offered_per_process * N` by the join storm's rate search (bench.join_storm.search:
a step is clean when at least 97% of its offered rate is answered, at most 1% fails and p99 is within
250 ms), then two steps between the best clean rate and the first that was not; admitted(N) is the best
clean step's admitted joins/s, with its p99 and the cores the owners used. The scaling efficiency at N is
admitted(N) / (N * admitted(1)).

The relay half runs on one topology with an origin relay and max(M) edge relays (no admission, no
notifier): one speaker publishes a room to the origin at 50 frames/s and, for each M, listeners subscribe
to the first M edges, each ticket (signed with the topology's ticket key, as admission would) naming the
origin as its upstream, so every edge pulls one copy from the origin and the origin feeds edges only.
The listeners per edge are raised step by step (bench.audience.step_search, the same open-loop
listener generator processes and bar as `make bench`: p99 capture-to-receipt within 300 ms, no chunk lost,
no stream failing, every listener connected) until a step misses the bar; served(M) is the most listeners
of a passing step, and the efficiency at M is served(M) / (M * served(1)). Admission is not in the path
(its half measures it): the tree is the one admission builds for a room whose listeners fill M edges.

JSON and a PNG go to the bench folder (`scaleout.json`, `scaleout.png`, bench/plots.py); a half that is
not run (no steps given) keeps its figures from the JSON already there.

The figure only means something when the generator has cores of its own: on a machine shared with other
work the curve shows the generator's and the neighbours' limits as much as admission's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from townhall.core.config import TlsConfig
from townhall_tools.bench import audience, join_load_ghz, join_storm
from townhall_tools.bench.join_load import Load, make_rooms, wait_live
from townhall_tools.bench.relay import CHUNK_MS, Server, speak
from townhall_tools.hosts.cluster import BENCH_SETTINGS, LIMITS, Cluster, plan

console = Console(stderr=True)
STEPS_MAX = 8
# Steps that narrow the gap between the best clean rate and the first failed one (x1.2 -> x1.047): the
# efficiency divides two such figures, so x1.2 steps alone could move it by a fifth.
REFINE_STEPS = 2
EDGES_MAX = 8  # relays are 172.29.0.40.. and notifiers .50..: the origin and at most 9 edges fit
LISTENER_STEPS_MAX = 12
LISTENERS_PER_EDGE_MAX = 2_500  # relay.listener_capacity: past it an edge refuses Subscribe


async def _point(cluster: Cluster, start: float, seconds: float, cold_rooms: int) -> dict[str, Any]:
    owners = cluster.of("admission")
    addresses = tuple(h.direct for h in owners)
    auth, tls = cluster.secrets.auth, TlsConfig()
    _, colds = await make_rooms(addresses[0], cold_rooms, auth, tls)
    await wait_live(addresses, colds, auth, tls)

    # The compiled generator when it is built (`make joinload`, which `make cluster-scale` runs): Python
    # generator processes take about a millisecond of the host's CPU per join, which the owners' cores
    # share on a small machine.
    ghz = join_load_ghz.find()

    def load_at(rate: float) -> Load:
        return Load(
            addresses, None, 0.0, tuple(colds), rate, seconds, generators=2, ghz=ghz, auth=auth, tls=tls
        )

    pids = [cluster.pid(h) for h in owners]
    return await join_storm.search(
        load_at, start, pids, f"admission x{len(owners)}", console, kind="cold", refine=REFINE_STEPS
    )


def efficiency(points: list[dict[str, Any]], count: str, value: str) -> None:
    """Sets each point's `efficiency`: value / (count * the value at count 1); None without a count-1
    point or when that one is 0."""
    base = next((p[value] for p in points if p[count] == 1), None)
    for point in points:
        point["efficiency"] = round(point[value] / (point[count] * base), 3) if base else None


def _admission(
    root: Path,
    image: str,
    kafka_image: str,
    steps: list[int],
    offered_per_process: float,
    seconds: float,
    cold_rooms: int,
    quota: float,
) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    for n in steps:
        hosts = plan(admission=n, crowd=0, relays=1, notifiers=1)
        cluster = Cluster(root, image, kafka_image, hosts, cpus={"admission": quota}, settings=BENCH_SETTINGS)
        with cluster.fresh() as up_s:
            figures = asyncio.run(_point(cluster, offered_per_process * n, seconds, cold_rooms))
        points.append(
            {
                "admission": n,
                "offered_per_s": figures["offered_cold_per_s"],
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
    efficiency(points, "admission", "admitted_per_s")
    return {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpu_quota_cores": quota,
        "seconds": seconds,
        "offered_per_process": offered_per_process,
        "latency_budget_ms": join_storm.STEP_P99_MS,
        "points": points,
    }


def relay_point(edges: int, steps: list[dict[str, Any]], per_edge: Sequence[int]) -> dict[str, Any]:
    """One M's figures from its step search: the passing step with the most listeners connected (served
    0 if none passed), and whether the search ran out of steps before a step failed (served is then a
    floor, not the edges' limit)."""
    passing = [s for s in steps if s["passed"]]
    best = max(passing, key=lambda s: s["listeners_connected"]) if passing else None
    return {
        "edges": edges,
        "served": best["listeners_connected"] if best else 0,
        "delivered_per_s": best["delivered_per_s"] if best else 0.0,
        "latency_p99_ms": best["latency_p99_ms"] if best else None,
        "edge_cores": best["cores"] if best else None,
        "origin_cores": best["origin_cores"] if best else None,
        "sent_bytes_per_listener_s": best.get("sent_bytes_per_listener_s") if best else None,
        "limited_by_steps": bool(steps)
        and steps[-1]["passed"]
        and steps[-1]["listeners"] == per_edge[-1] * edges,
        "steps": steps,
    }


async def _search(
    progress: Progress, origin: Server, targets: list[Server], per_edge: list[int], seconds: float, key: str
) -> list[dict[str, Any]]:
    """The step search on `targets` (the edges), each listener's ticket naming the origin upstream."""
    baseline = audience._rss(targets)

    async def measure(n: int) -> dict[str, Any]:
        task = progress.add_task(f"relays: {n} x {len(targets)} edges", total=seconds)
        step = await audience._phase(
            targets, (origin.internal,), n, seconds, [origin], baseline, progress, task, key, netns=True
        )
        step["origin_cores"] = step.pop("other_cores")[0]
        verdict = "ok" if audience._passed(step, CHUNK_MS) else "over"
        progress.update(task, description=f"relays: {n} x {len(targets)} edges: {verdict}")
        return step

    return await audience.step_search(per_edge, measure, lambda s: audience._passed(s, CHUNK_MS))


async def _relay_points(
    cluster: Cluster, edges: list[int], per_edge: list[int], seconds: float
) -> list[dict[str, Any]]:
    key = cluster.secrets.keys["tickets.private_key"]
    servers = [
        Server(h.name, h.direct, None, internal=h.internal, advertise=h.grpc, pid=cluster.pid(h))
        for h in cluster.of("relay")
    ]
    origin = servers[0]
    stop = asyncio.Event()
    speaker = asyncio.create_task(
        speak(origin.address, audience.ROOM, stop, ticket_key=key, claim=origin.claim)
    )
    points: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description:<40}"), BarColumn(), TimeElapsedColumn())
    try:
        await asyncio.sleep(1.0)
        if speaker.done():
            speaker.result()  # the origin refused the speaker: say why
            raise RuntimeError("the speaker's stream ended before any listener joined")
        with Progress(*columns, console=console, transient=False) as progress:
            for m in edges:
                steps = await _search(progress, origin, servers[1 : 1 + m], per_edge, seconds, key)
                points.append(relay_point(m, steps, per_edge))
                console.print(
                    f"relays x{m}: {points[-1]['served']} listeners served "
                    f"(p99 {points[-1]['latency_p99_ms']} ms, {points[-1]['delivered_per_s']} chunks/s)"
                )
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(speaker, 5)
    efficiency(points, "edges", "served")
    return points


def _relays(
    root: Path,
    image: str,
    kafka_image: str,
    edges: list[int],
    per_edge: list[int],
    seconds: float,
    quota: float,
) -> dict[str, Any]:
    hosts = plan(admission=0, crowd=0, relays=max(edges) + 1, notifiers=0)
    cluster = Cluster(root, image, kafka_image, hosts, cpus={"relay": quota}, settings=BENCH_SETTINGS)
    with cluster.fresh() as up_s:
        points = asyncio.run(_relay_points(cluster, edges, per_edge, seconds))
    return {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpu_quota_cores": quota,
        "seconds": seconds,
        "listeners_per_edge": per_edge,
        "latency_budget_ms": audience.budget_ms(CHUNK_MS),
        "chunk_ms": CHUNK_MS,
        "speakers": 1,
        "up_s": round(up_s, 1),
        "points": points,
    }


def check(steps: list[int], edges: list[int], per_edge: list[int]) -> None:
    """Refuses step lists the topology or the relays cannot take (ValueError, saying which)."""
    if not steps and not edges:
        raise ValueError("nothing to run: give admission steps, edge steps or both")
    if len(steps) > STEPS_MAX or any(not 1 <= n <= 8 for n in steps):
        raise ValueError(f"steps: at most {STEPS_MAX} counts of 1..8 admission processes, not {steps}")
    if len(edges) > STEPS_MAX or any(not 1 <= m <= EDGES_MAX for m in edges):
        raise ValueError(f"edges: at most {STEPS_MAX} counts of 1..{EDGES_MAX} edge relays, not {edges}")
    if edges and (
        not per_edge
        or len(per_edge) > LISTENER_STEPS_MAX
        or any(not 1 <= n <= LISTENERS_PER_EDGE_MAX for n in per_edge)
        or per_edge != sorted(set(per_edge))
    ):
        raise ValueError(
            f"listeners: 1..{LISTENER_STEPS_MAX} rising counts of 1..{LISTENERS_PER_EDGE_MAX} listeners "
            f"per edge, not {per_edge}"
        )


def run(
    root: Path,
    image: str,
    kafka_image: str,
    steps: list[int],
    offered_per_process: float,
    seconds: float,
    out_dir: Path,
    cold_rooms: int = 50,
    edges: Sequence[int] = (),
    listeners_per_edge: Sequence[int] = (),
    quota: float = LIMITS["admission"][0],
    relay_quota: float = LIMITS["relay"][0],
) -> dict[str, Any]:
    """Each half's steps and efficiencies; writes scaleout.json and scaleout.png to `out_dir`. The
    admission half's figures stay at the top level (`points`), the relay half's go under `relays`."""
    edges, per_edge = sorted(set(edges)), list(listeners_per_edge)
    check(steps, edges, per_edge)
    path = out_dir / "scaleout.json"
    report: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(ValueError):
            report = json.loads(path.read_text())
    if steps:
        report.update(
            _admission(root, image, kafka_image, steps, offered_per_process, seconds, cold_rooms, quota)
        )
    if edges:
        report["relays"] = _relays(root, image, kafka_image, edges, per_edge, seconds, relay_quota)
    report["machine"] = {"cpus": _cpus(), "python": platform.python_version()}
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    from townhall_tools.bench import plots

    plots.write(out_dir, "scaleout")
    return report


def _cpus() -> int:
    return os.cpu_count() or 0
