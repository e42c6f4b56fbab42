"""Isolation under real CPU limits (issue 13, item 4) on the multi-host topology, where each process has its
own CPU quota and the load comes from the host, outside every quota. Two halves:

- joins: cold rooms' joins alone, then the same cold joins while one hot room takes a join storm through the
  crowd lane; the claim is that the cold rooms' join p99 during the storm stays within twice its value alone.
- notifications (notify_isolation.py): small hosts' notification p99 alone, then while a celebrity's fan-out
  (10M followers by default) runs; the claim is a p99 within 1 s during the fan-out.

Figures of both go to `isolation.json` in the bench folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from townhall.core.config import TlsConfig
from townhall_tools.bench import join_load_ghz
from townhall_tools.bench.join_load import Load, make_rooms, offer, wait_live
from townhall_tools.hosts import notify_isolation
from townhall_tools.hosts.cluster import BENCH_SETTINGS, LIMITS, Cluster, Host, plan

console = Console(stderr=True)
BOUND = 2.0  # cold p99 during the storm / alone
SECONDS_MAX = 600.0
HALVES = ("joins", "notifications")
# `--lean`: each half on a topology of the processes it uses only, so that idle ones (each a few
# hundredths of a core: probes, Kafka followers, load reports) do not share the machine's cores with
# what is measured. Joins need the owners, the crowd lane and a relay to place on; the notification
# half writes room starts itself and reads Inbox streams from the notifiers.
LEAN = {
    "joins": {"admission": 3, "crowd": 1, "relays": 1, "notifiers": 0},
    "notifications": {"admission": 0, "crowd": 0, "relays": 0, "notifiers": 2},
}


def lean_plan(half: str) -> list[Host]:
    """The containers of one half's lean topology."""
    return plan(**LEAN[half])


def pinning(hosts: list[Host], cpus: int) -> tuple[dict[str, str], set[int]] | None:
    """The lean join topology on cores of its own, as a deployment puts the two lanes on nodes of their
    own: the owners (the cold rooms' joins and every room's authoritative changes) on CPU 0; the crowd
    lane, the brokers, the relay and the host's generators on the rest. None on a single CPU. CPU quotas
    cap a process's share but leave every process on every core: on a machine with fewer cores than the
    topology's quotas add up to, the owners wait for the storm's processes on the host's scheduler."""
    if cpus < 2:
        return None
    rest = f"1-{cpus - 1}" if cpus > 2 else "1"
    return {h.name: ("0" if h.role == "admission" else rest) for h in hosts}, set(range(1, cpus))


@dataclass(frozen=True)
class Notifications:
    """The notification half's sizes."""

    followers: int = 10_000_000
    small_hosts: int = 100
    window_s: float = 10.0


async def _phases(
    cluster: Cluster, hot_rate: float, cold_rate: float, cold_rooms: int, seconds: float
) -> dict[str, Any]:
    owners = tuple(h.direct for h in cluster.of("admission"))
    # The cold rooms' joins: spread over the owners, as clients' joins land on any admission pod.
    colds_at = owners
    crowd = tuple(h.direct for h in cluster.of("crowd"))
    pids = [cluster.pid(h) for h in cluster.hosts if h.service == "admission"]
    auth, tls = cluster.secrets.auth, TlsConfig()
    hot, colds = await make_rooms(owners[0], cold_rooms, auth, tls)
    await wait_live(owners, [hot, *colds], auth, tls)
    # The compiled generator when it is built (`make joinload`): a storm from Python generator processes
    # takes a core of the host's for 2,000 joins/s, and starves what it measures on a small machine.
    ghz = join_load_ghz.find()
    alone = Load(colds_at, None, 0.0, tuple(colds), cold_rate, seconds, ghz=ghz, auth=auth, tls=tls)
    storm = Load(
        colds_at,
        hot,
        hot_rate,
        tuple(colds),
        cold_rate,
        seconds,
        ghz=ghz,
        hot_addresses=crowd,
        auth=auth,
        tls=tls,
    )
    return {
        "alone": await offer(alone, pids, "cold rooms alone", console),
        "storm": await offer(storm, pids, "cold rooms during the storm", console),
    }


def joins(
    cluster: Cluster,
    hot_rate: float,
    cold_rate: float,
    seconds: float,
    cold_rooms: int = 50,
) -> dict[str, Any]:
    """The join half: both phases on the running topology, with the ratio and its verdict."""
    phases = asyncio.run(_phases(cluster, hot_rate, cold_rate, cold_rooms, seconds))
    alone, storm = phases["alone"]["cold"]["p99_ms"], phases["storm"]["cold"]["p99_ms"]
    ratio = round(storm / alone, 2) if alone and storm is not None else None
    return {
        "hot_rate": hot_rate,
        "cold_rate": cold_rate,
        "seconds": seconds,
        "cold_p99_ms_alone": alone,
        "cold_p99_ms_storm": storm,
        "ratio": ratio,
        "bound": BOUND,
        "within_bound": ratio is not None and ratio <= BOUND,
        "phases": phases,
    }


@contextlib.contextmanager
def _affinity(cpus: set[int] | None) -> Iterator[None]:
    """This process (and the generators it starts) on `cpus` for the block; None: unchanged."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run(
    cluster: Cluster,
    hot_rate: float,
    cold_rate: float,
    seconds: float,
    out_dir: Path,
    halves: tuple[str, ...] = HALVES,
    notifications: Notifications = Notifications(),
    lean: bool = False,
) -> dict[str, Any]:
    """The halves asked for on the running topology, or with `lean` each on a lean topology of its own
    (brought up and removed here, replacing a running one); writes isolation.json to `out_dir` and
    returns it."""
    if not 0 < seconds <= SECONDS_MAX:
        raise ValueError(f"seconds: 0..{SECONDS_MAX:.0f}, not {seconds}")
    if not halves or not set(halves) <= set(HALVES):
        raise ValueError(f"halves: some of {', '.join(HALVES)}, not {', '.join(halves) or 'none'}")
    n = notifications
    notify_isolation.check(n.followers, n.small_hosts, n.window_s)
    report: dict[str, Any] = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpu_quota_cores": {role: limits[0] for role, limits in LIMITS.items()},
    }
    path = out_dir / "isolation.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    # A half not run this time keeps its last figures (with the time they were taken).
    for half in HALVES:
        if half not in halves and half in earlier:
            report[half] = {"at": earlier[half].get("at", earlier.get("at")), **earlier[half]}
    for half in (h for h in HALVES if h in halves):
        hosts = lean_plan(half)
        pins = pinning(hosts, os.cpu_count() or 1) if lean and half == "joins" else None
        on = (
            Cluster(
                cluster.root,
                cluster.image,
                cluster.kafka_image,
                hosts,
                settings=BENCH_SETTINGS,
                cpusets=pins[0] if pins else None,
            )
            if lean
            else cluster
        )
        with on.fresh() if lean else contextlib.nullcontext(0.0), _affinity(pins[1] if pins else None):
            if half == "joins":
                report[half] = joins(on, hot_rate, cold_rate, seconds)
            else:
                report[half] = notify_isolation.run(on, n.followers, n.small_hosts, n.window_s, console)
        if pins:
            report[half]["pinned"] = {
                "owners_cpu": "0",
                "cpusets": pins[0],
                "generators_cpus": sorted(pins[1]),
            }
        report[half]["at"] = report["at"]
        if on is not None:  # (None: a test's stand-in for the topology)
            report[half]["topology"] = {role: len(on.of(role)) for role in LIMITS}
    report["within_bound"] = all(report[half]["within_bound"] for half in HALVES if half in report)
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return report
