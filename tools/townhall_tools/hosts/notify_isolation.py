"""Isolation under real CPU limits (issue 13, item 4, the notification half): small hosts' notification
latency alone, then while a celebrity's fan-out runs, on the multi-host topology (each notifier on its own
0.5-core quota), with the load generator on the host, outside every quota.

The celebrity's followers are loaded the way an operator bulk-loads a graph in a deployment: Graph.Import on
a notifier's internal port, signed with the operator (service) key, which splits the pairs by owner and
streams each part there (`townhall graph import --internal`). Room starts are the room-started events
admission writes (signed as admission), so the figures are the notifier's alone. The chart runs both lanes
in every notifier pod (one StatefulSet, no bulk-lane deployment): the fast lane shares its CPU quota with the
bulk lane, and what the figure measures is the worker's fast-first scheduling inside that quota.

The claim checked: the small hosts' p99 (room start to the notification on a real Inbox stream) stays within
1 s while the fan-out runs.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from aiokafka import TopicPartition
from rich.console import Console

from townhall.cli.graph import import_with_progress
from townhall.cli.status import sample_key, samples
from townhall.core.config import KafkaConfig
from townhall.core.kafka import Topics, consumer, end_offsets, producer
from townhall.notifier.graphfile import GraphSpec
from townhall.notifier.records import decode_batch
from townhall_tools.bench.listener_generator import cpu_s
from townhall_tools.bench.notify import small_host_latencies, write_graph
from townhall_tools.bench.stats import percentile
from townhall_tools.devtools.events import publish_room_started
from townhall_tools.hosts.cluster import LIMITS, Cluster

BOUND_S = 1.0  # small hosts' notification p99 during the fan-out
FOLLOWERS_MAX = 100_000_000
SMALL_HOSTS_MAX = 1000
WINDOW_MAX_S = 120.0
FANOUT_TIMEOUT_S = 900.0
START_TIMEOUT_S = 60.0  # until the first bulk task is done: the fan-out runs
POLL_S = 0.5
SAMPLE_RECORDS = 200  # notification records sampled for their size
SAMPLE_TIMEOUT_S = 20.0
# Before the phase alone: the graph import leaves the notifiers and brokers busy for a while (the store's
# writes, replication); "alone" means after they are back to (almost) idle, waited for at most QUIET_MAX_S.
QUIET_CORES = 0.3  # the notifiers' and brokers' CPU, summed
QUIET_MAX_S = 120.0
KAFKA_LOGS = "/var/lib/kafka/data"  # the brokers' log.dirs (hosts/cluster.py)
TASK_USERS = 4096  # notifier.task_users: followers per fan-out task

STORED = "townhall_notifier_followers_stored"
NOTIFIED = 'townhall_notifications_total{path="topic"}'
BULK_PLANNED = 'townhall_notifier_fanout_tasks_total{lane="bulk",stage="planned"}'
BULK_DONE = 'townhall_notifier_fanout_tasks_total{lane="bulk",stage="done"}'
FAST_LAG = "townhall_notifier_task_lag_seconds_bucket"


def fast_lag_p99_s(
    before: Sequence[Mapping[str, float]], after: Sequence[Mapping[str, float]]
) -> float | None:
    """The fast lane's task lag p99 (room start to a task's records acknowledged, the notifier's part of a
    small host's latency) between two scrapes of every notifier: the upper bound of the histogram bucket
    holding it (inf past the last bound), None when no fast task was done."""
    buckets: dict[float, float] = {}
    for then, now in zip(before, after, strict=True):
        for key, value in now.items():
            if key.startswith(FAST_LAG + "{") and 'lane="fast"' in key:
                bound = float(key.split('le="', 1)[1].split('"', 1)[0])
                buckets[bound] = buckets.get(bound, 0.0) + value - then.get(key, 0.0)
    count = buckets.get(math.inf, 0.0)
    if count <= 0:
        return None
    return next(bound for bound in sorted(buckets) if buckets[bound] >= 0.99 * count)


@dataclass(frozen=True)
class Fanout:
    """The bulk lane's progress summed over the notifiers: tasks planned, tasks done, users on the topic."""

    planned: float = 0.0
    done: float = 0.0
    notified: float = 0.0

    @classmethod
    def of(cls, scraped: Sequence[Mapping[str, float]]) -> Fanout:
        """The sums over every notifier's samples (keyed as `sample_key` writes them)."""
        return cls(
            sum(s.get(BULK_PLANNED, 0.0) for s in scraped),
            sum(s.get(BULK_DONE, 0.0) for s in scraped),
            sum(s.get(NOTIFIED, 0.0) for s in scraped),
        )

    def since(self, before: Fanout) -> Fanout:
        """What happened after `before`."""
        return Fanout(self.planned - before.planned, self.done - before.done, self.notified - before.notified)

    def running(self) -> bool:
        """Whether the fan-out has begun (a bulk task is done); applied to a `since`."""
        return self.done > 0

    def finished(self, followers: int) -> bool:
        """Whether every planned bulk task is done and they cover the celebrity's followers; applied to a
        `since`. The bulk lane holds only the celebrity (the small hosts are under the threshold)."""
        return (
            self.planned >= math.ceil(followers / TASK_USERS)
            and self.done >= self.planned
            and self.notified >= followers
        )


def summary(latencies: list[float], streams: int) -> dict[str, Any]:
    """p50/p99/max (seconds) of one phase's small-host latencies, and how many streams were notified."""

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {
        "streams": streams,
        "notified": len(latencies),
        "p50_s": rounded(percentile(latencies, 0.5)),
        "p99_s": rounded(percentile(latencies, 0.99)),
        "max_s": rounded(max(latencies) if latencies else None),
    }


def check(followers: int, small_hosts: int, window_s: float) -> None:
    """Refuses sizes outside the bounds (ValueError, with the bound)."""
    if not 0 < followers <= FOLLOWERS_MAX:
        raise ValueError(f"followers: 1..{FOLLOWERS_MAX:,}, not {followers}")
    if not 0 < small_hosts <= SMALL_HOSTS_MAX:
        raise ValueError(f"small hosts: 1..{SMALL_HOSTS_MAX}, not {small_hosts}")
    if not 0 < window_s <= WINDOW_MAX_S:
        raise ValueError(f"window: 0..{WINDOW_MAX_S:.0f} s, not {window_s}")


def _scrape(cluster: Cluster) -> list[dict[str, float]]:
    return [{sample_key(s): s.value for s in samples(host.metrics)} for host in cluster.of("notifier")]


async def read_bytes_per_follower(
    kafka: KafkaConfig, start: dict[TopicPartition, int], room: str, records: int = SAMPLE_RECORDS
) -> float | None:
    """Bytes of notification records as read (value, key and headers, uncompressed; no batch overhead) per
    follower they name, from a sample of `room`'s first records after `start` (each partition's end before
    the room started)."""
    reader = consumer(kafka, enable_auto_commit=False)
    await reader.start()
    size = users = seen = 0
    try:
        reader.assign(list(start))
        for partition, offset in start.items():
            reader.seek(partition, offset)
        deadline = time.monotonic() + SAMPLE_TIMEOUT_S
        while seen < records and time.monotonic() < deadline:
            batch = await reader.getmany(timeout_ms=500, max_records=records)
            for record in (r for rs in batch.values() for r in rs):
                notification, ids = decode_batch(record.value or b"")
                if notification.room_id == room and seen < records:
                    seen += 1
                    users += len(ids)
                    size += len(record.value or b"") + len(record.key or b"")
                    size += sum(len(k) + len(v or b"") for k, v in record.headers)
    finally:
        await reader.stop()
    return round(size / users, 2) if users else None


def _cpu_s(cluster: Cluster, role: str) -> float:
    """CPU seconds so far of a role's containers (each one's process is its container's init)."""
    return sum(cpu_s(psutil.Process(cluster.pid(h))) for h in cluster.of(role))


def quiet(cluster: Cluster, console: Console) -> float | None:
    """Waits until the notifiers and brokers together use less than QUIET_CORES over a second; the
    seconds waited, or None if they were still busy after QUIET_MAX_S."""
    started = time.monotonic()
    with console.status("waiting for the notifiers and brokers to settle after the import..."):
        while time.monotonic() - started < QUIET_MAX_S:
            before = _cpu_s(cluster, "notifier") + _cpu_s(cluster, "kafka")
            time.sleep(1.0)
            if _cpu_s(cluster, "notifier") + _cpu_s(cluster, "kafka") - before < QUIET_CORES:
                return round(time.monotonic() - started, 1)
    return None


def log_bytes(cluster: Cluster, topic: str) -> int:
    """Bytes of `topic`'s log segments on the first broker: every broker holds every partition
    (replication factor 3 on 3 brokers), so this is what the topic's writes take on disk and on the
    wire, compressed batches as they are."""
    broker = cluster.container(cluster.of("kafka")[0])
    code, out = broker.exec_run(["sh", "-c", f"cat {KAFKA_LOGS}/{topic}-*/*.log | wc -c"])
    if code != 0:
        why = out.decode(errors="replace")
        raise RuntimeError(f"could not size {topic}'s log on the first broker: {why}")
    return int(out.decode().strip())


def load(
    cluster: Cluster, followers: int, small_hosts: int, console: Console
) -> tuple[list[tuple[int, np.ndarray]], dict[str, Any]]:
    """Writes the graph (a celebrity with `followers`, `small_hosts` ordinary hosts) and imports it through
    the first notifier's internal port unless the notifiers store it already; returns the small hosts with
    their followers and the load's figures."""
    spec = GraphSpec(users=2 * followers, celebrity_followers=followers, hosts=small_hosts)
    with tempfile.TemporaryDirectory(prefix="townhall-notifyiso-") as tmp:
        graph = Path(tmp) / "graph.bin"
        started = time.monotonic()
        with console.status(f"generating a graph with a {followers:,}-follower celebrity..."):
            edges, hosts = write_graph(spec, graph)
        generated = time.monotonic() - started
        stored = sum(s.get(STORED, 0.0) for s in _scrape(cluster))
        figures: dict[str, Any] = {"edges": edges, "generate_s": round(generated, 2)}
        if stored >= edges:
            figures["import"] = "skipped: the notifiers store the graph already"
            return hosts, figures
        first = cluster.of("notifier")[0]
        result = import_with_progress(first.internal, graph, edges, console, cluster.secrets.auth)
    figures.update(
        import_s=round(result.seconds, 2),
        import_edges_per_s=round(result.edges_per_s),
        imported=result.created,
    )
    return hosts, figures


async def _phase(cluster: Cluster, hosts: list[tuple[int, np.ndarray]], window_s: float) -> dict[str, Any]:
    """The small hosts start their rooms within `window_s`: their latencies' summary, and the fast lane's
    task lag p99 over the same time."""
    state: dict[str, Any] = {}
    addresses = [h.direct for h in cluster.of("notifier")]
    auth = cluster.secrets.auth
    before = await asyncio.to_thread(_scrape, cluster)
    latencies = await small_host_latencies(addresses, hosts, cluster.kafka(), window_s, state, auth)
    after = await asyncio.to_thread(_scrape, cluster)
    return {
        **summary(latencies, state.get("small_total", 0)),
        "fast_task_lag_p99_s": fast_lag_p99_s(before, after),
    }


async def _during(
    cluster: Cluster, hosts: list[tuple[int, np.ndarray]], followers: int, window_s: float, console: Console
) -> dict[str, Any]:
    """Starts the celebrity's room, waits until its fan-out runs, then the small hosts' phase; waits for the
    fan-out's end and says whether it ran through the whole phase."""
    kafka, auth = cluster.kafka(), cluster.secrets.auth
    before = Fanout.of(await asyncio.to_thread(_scrape, cluster))
    cpu0, brokers0 = _cpu_s(cluster, "notifier"), _cpu_s(cluster, "kafka")
    topic = Topics(kafka.topic_prefix).notifications
    start = await end_offsets(kafka, topic)
    logged = await asyncio.to_thread(log_bytes, cluster, topic)
    room = f"celebrity-{uuid.uuid4().hex[:8]}"
    p = producer(kafka, "bench-notifyiso")
    await p.start()
    try:
        started = time.monotonic()
        await publish_room_started(p, kafka, room, 1, "celebrity", auth=auth)
    finally:
        await p.stop()
    progress = Fanout()
    while not progress.running():
        if time.monotonic() - started > START_TIMEOUT_S:
            raise RuntimeError(f"the celebrity's fan-out did not start within {START_TIMEOUT_S:.0f} s")
        await asyncio.sleep(POLL_S)
        progress = Fanout.of(await asyncio.to_thread(_scrape, cluster)).since(before)
    running_at = time.monotonic() - started
    with console.status("small hosts start their rooms during the fan-out..."):
        phase = await _phase(cluster, hosts, window_s)
    phase_end = time.monotonic() - started
    with console.status(f"waiting for the last of {followers:,} followers..."):
        while not progress.finished(followers):
            if time.monotonic() - started > FANOUT_TIMEOUT_S:
                break
            await asyncio.sleep(POLL_S)
            progress = Fanout.of(await asyncio.to_thread(_scrape, cluster)).since(before)
    fanout_s = time.monotonic() - started
    cpu, brokers = _cpu_s(cluster, "notifier") - cpu0, _cpu_s(cluster, "kafka") - brokers0
    logged = await asyncio.to_thread(log_bytes, cluster, topic) - logged
    per_follower = await read_bytes_per_follower(kafka, start, room)
    return {
        **phase,
        "fanout_finished": progress.finished(followers),
        "fanout_s": round(fanout_s, 1),
        "fanout_running_after_s": round(running_at, 1),
        "phase_ended_after_s": round(phase_end, 1),
        # The phase counts only if the bulk lane was busy for all of it (polled every POLL_S).
        "fanout_ran_throughout": fanout_s > phase_end,
        "notified_on_topic": int(progress.notified),  # the small hosts' followers too
        "bulk_tasks": int(progress.done),
        "notifier_cpu_s": round(cpu, 1),
        "notifier_cores": round(cpu / fanout_s, 2),  # of the notifiers' quotas, summed
        "broker_cores": round(brokers / fanout_s, 2),
        "broker_cpu_s": round(brokers, 1),
        # What bench/capacity.py sizes the notifier tier and Kafka from: followers per notifier core-s,
        # and bytes per follower on the notifications topic's log (batches as written: the bulk lane's
        # are compressed), next to the records' own bytes once read (uncompressed).
        "fanout_per_core_s": round(progress.notified / cpu) if cpu > 0 else None,
        "record_bytes_per_follower": round(logged / progress.notified, 2) if progress.notified else None,
        "read_bytes_per_follower": per_follower,
    }


def run(
    cluster: Cluster, followers: int, small_hosts: int, window_s: float, console: Console
) -> dict[str, Any]:
    """Loads the graph, then both phases on the running topology; returns the figures and the verdict."""
    check(followers, small_hosts, window_s)
    hosts, loaded = load(cluster, followers, small_hosts, console)
    settled = quiet(cluster, console)
    with console.status("warming up: one small host starts a room..."):
        # Not measured: the first room start after the notifiers start pays for their consumers' first
        # fetches and the Inbox readers catching up (seconds), which neither phase is about.
        asyncio.run(_phase(cluster, hosts[:1], 0.1))
    with console.status("small hosts start their rooms, alone..."):
        alone = asyncio.run(_phase(cluster, hosts, window_s))
    during = asyncio.run(_during(cluster, hosts, followers, window_s, console))
    p99 = during["p99_s"]
    return {
        "fanout_per_core_s": during["fanout_per_core_s"],
        "record_bytes_per_follower": during["record_bytes_per_follower"],
        "followers": followers,
        "small_hosts": len(hosts),
        "window_s": window_s,
        "load": loaded,
        "settled_after_import_s": settled,
        "alone": alone,
        "during": during,
        "p99_s_alone": alone["p99_s"],
        "p99_s_during": p99,
        "bound_s": BOUND_S,
        "within_bound": p99 is not None
        and p99 <= BOUND_S
        and during["notified"] == during["streams"]
        and during["fanout_ran_throughout"],
        "lanes": "fast and bulk lane in each notifier process (the chart's StatefulSet): one CPU quota; "
        "the bulk lane's records zstd-compressed",
        "quotas_cores": {"notifier": LIMITS["notifier"][0], "kafka": LIMITS["kafka"][0]},
    }
