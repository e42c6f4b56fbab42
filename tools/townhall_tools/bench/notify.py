"""Celebrity notification benchmark: a 10M-follower host starts a room while small hosts start theirs.

Everything is real: a Kafka broker of its own, K notifier processes (planner, workers, Inbox) with
the graph sharded between them, the graph loaded through Graph.Import. The celebrity's
followers are counted by a separate process reading the notifications topic (10M gRPC streams
would measure the load generator, not the notifier); the small hosts' followers are measured on
real Inbox streams, from the room start written to Kafka to the notification on the stream.

`python -m townhall_tools.bench.notify --followers 1000000` or `run(...)` from `townhall bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from aiokafka import AIOKafkaConsumer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from townhall.cli.graph import import_with_progress
from townhall.core.auth import Tokens, bearer
from townhall.core.channels import channel
from townhall.core.config import DEV_AUTH, DEV_ENV, AuthConfig, KafkaConfig, TlsConfig
from townhall.core.kafka import Topics, ensure_topics, producer
from townhall.notifier.graphfile import GraphSpec, generate
from townhall.notifier.records import decode_batch
from townhall.v1 import inbox_pb2, inbox_pb2_grpc
from townhall_tools.bench.env import LIMITS
from townhall_tools.bench.listener_generator import cpu_s
from townhall_tools.bench.stats import percentile
from townhall_tools.devtools.events import publish_room_started
from townhall_tools.devtools.fanout import from_end
from townhall_tools.devtools.kafka_broker import Broker, free_port
from townhall_tools.devtools.processes import stop, wait_serving

START_TIMEOUT_S = 60.0
# What the figures mean, written into the JSON next to them.
METHOD = {
    "rooms": "room-started events written to Kafka as admission writes them (admission not in the loop)",
    "celebrity": (
        "distinct celebrity followers counted by a separate process reading the notifications topic "
        "(a bitmap over the id space); 10M gRPC Inbox streams would measure the load generator"
    ),
    "small_hosts": (
        "real Inbox streams (2 per small host): room start (started_at_ms) to the notification on the "
        "stream; small_topic_* is the same to the notifications topic"
    ),
    "per_core": (
        "all notifications / CPU seconds of all notifier processes (planner, workers, Inbox readers) "
        "from the celebrity's start to the end; the broker's CPU is reported, not included"
    ),
    "extrapolation": (
        "100M followers / (2 x notifications_per_cpu_s): linear in followers, assumes two cores' worth "
        "of notifier processes and a Kafka that keeps up (here Kafka shares the same 2 cores)"
    ),
}
CELEBRITY = 1
SAMPLE_S = 0.5


INBOX_PER_HOST = 2


@dataclass
class Notifier:
    """A notifier process under test."""

    address: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    internal: str  # its internal port: Graph.Import, and the member address the graph is sharded over

    @property
    def ps(self) -> psutil.Process:
        """The process, for CPU figures."""
        return psutil.Process(self.process.pid)


@contextlib.contextmanager
def _cluster(work: Path, count: int, bulk_threshold: int) -> Iterator[tuple[Broker, list[Notifier]]]:
    broker = Broker(work / "kafka", port=free_port())
    broker.start()
    notifiers: list[Notifier] = []
    try:
        asyncio.run(ensure_topics(KafkaConfig(bootstrap=broker.bootstrap)))
        addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
        members = [f"127.0.0.1:{free_port()}" for _ in range(count)]
        group = f"bench-{uuid.uuid4().hex[:8]}"
        for i, (address, member) in enumerate(zip(addresses, members, strict=True)):
            env = {
                **os.environ,
                **DEV_ENV,
                "TOWNHALL_KAFKA_BOOTSTRAP": broker.bootstrap,
                "TOWNHALL_NOTIFIER_LISTEN": address,
                "TOWNHALL_NOTIFIER_INTERNAL_LISTEN": member,
                "TOWNHALL_NOTIFIER_METRICS_PORT": "0",
                "TOWNHALL_NOTIFIER_DATA_DIR": str(work / f"notifier-{i}"),
                "TOWNHALL_NOTIFIER_MEMBERS": ",".join(members),
                "TOWNHALL_NOTIFIER_GROUP_ID": group,
                "TOWNHALL_NOTIFIER_BULK_THRESHOLD": str(bulk_threshold),
                "TOWNHALL_NOTIFIER_INBOX_QUEUE": "4096",
                "TOWNHALL_LOG_LEVEL": "warning",
                **LIMITS,
            }
            log = (work / f"notifier-{i}.log").open("ab")
            process = subprocess.Popen(
                [sys.executable, "-m", "townhall.notifier"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
            notifiers.append(Notifier(address, work / f"notifier-{i}", process, member))
        for n in notifiers:
            wait_serving(n.process, n.address, f"notifier at {n.address}", START_TIMEOUT_S)
        yield broker, notifiers
    finally:
        stop([n.process for n in notifiers], grace_s=15)
        broker.stop()


def _store_bytes(data_dir: Path) -> int:
    """The follower store's size on disk after folding the WAL into the main file."""
    path = data_dir / "followers.sqlite3"
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in data_dir.glob("followers.sqlite3*"))


def _count_celebrity(
    bootstrap: str,
    topic: str,
    room: str,
    users: int,
    expected: int,
    small_rooms: int,
    timeout_s: float,
    conn: Connection,
) -> None:
    """Child process: counts distinct celebrity followers on the notifications topic."""
    asyncio.run(_count_async(bootstrap, topic, room, users, expected, small_rooms, timeout_s, conn))


async def _count_async(
    bootstrap: str,
    topic: str,
    room: str,
    users: int,
    expected: int,
    small_rooms: int,
    timeout_s: float,
    conn: Connection,
) -> None:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        metadata_max_age_ms=5_000,
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    seen = np.zeros(users + 1, dtype=bool)
    got = duplicates = 0
    last = 0.0
    # First record of each small host's room on the topic: room start to the topic, seconds.
    small: dict[str, float] = {}
    try:
        await asyncio.wait_for(from_end(consumer), 30)
        conn.send(("ready", 0, 0, 0.0))
        deadline = time.monotonic() + timeout_s
        reported = 0.0
        while got < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=2000)
            for records in batch.values():
                for record in records:
                    notification, ids = decode_batch(record.value or b"")
                    if notification.room_id != room:
                        if notification.room_id.startswith("small-") and notification.room_id not in small:
                            small[notification.room_id] = time.time() - notification.started_at_ms / 1000
                        continue
                    ids = ids[ids <= users]
                    fresh = ~seen[ids]
                    n = int(fresh.sum())
                    duplicates += len(ids) - n
                    if n:
                        seen[ids[fresh]] = True
                        got += n
                        last = time.time()
            if time.monotonic() - reported > 0.25:
                reported = time.monotonic()
                conn.send(("progress", got, duplicates, last))
        # The small hosts' rooms may still be starting when the celebrity is done.
        until = time.monotonic() + 15
        while len(small) < small_rooms and time.monotonic() < until:
            batch = await consumer.getmany(timeout_ms=200, max_records=2000)
            for records in batch.values():
                for record in records:
                    notification, _ = decode_batch(record.value or b"")
                    if notification.room_id.startswith("small-") and notification.room_id not in small:
                        small[notification.room_id] = time.time() - notification.started_at_ms / 1000
    finally:
        conn.send(("done", got, duplicates, last))
        conn.send(("small", list(small.values()), 0, 0.0))
        await consumer.stop()


async def small_host_latencies(
    addresses: list[str],
    hosts: list[tuple[int, np.ndarray]],
    kafka: KafkaConfig,
    window_s: float,
    state: dict[str, Any],
    auth: AuthConfig = DEV_AUTH,
) -> list[float]:
    """Connects Inbox streams (at the notifiers' client `addresses`) for followers of each small host, starts
    the rooms at random moments within `window_s` (room-started events signed with `auth`'s service key),
    and returns each stream's latency (room start to notification), seconds. `state` counts the streams
    (small_total), those notified (small_done) and when (small_arrivals)."""
    state.setdefault("small_done", 0)
    state.setdefault("small_arrivals", [])
    channels = [channel(address, TlsConfig()) for address in addresses]
    tokens = Tokens(auth)
    latencies: list[float] = []
    rooms: dict[str, int] = {}
    calls = []
    pending: dict[str, int] = {}
    all_done = asyncio.Event()

    async def listen(call: Any, user: int) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for note in call:
                if note.room_id in rooms and pending.get(f"{note.room_id}/{user}", 0):
                    pending[f"{note.room_id}/{user}"] = 0
                    latencies.append(time.time() - note.started_at_ms / 1000)
                    state["small_arrivals"].append(time.time())
                    state["small_done"] += 1
                    if state["small_done"] >= state["small_total"]:
                        all_done.set()

    tasks = []
    for host, followers in hosts:
        for user in followers[:INBOX_PER_HOST].tolist():
            stub = inbox_pb2_grpc.InboxStub(channels[host % len(channels)])
            call = stub.Subscribe(inbox_pb2.InboxSubscribeRequest(), metadata=bearer(tokens.mint(user, ())))
            await asyncio.wait_for(call.initial_metadata(), 20)
            calls.append(call)
            tasks.append((host, user, call))
    listeners = [asyncio.create_task(listen(call, user)) for _, user, call in tasks]
    state["small_total"] = len(tasks)
    p = producer(kafka, "bench-notify")
    await p.start()
    try:
        rng = random.Random(11)
        starts = sorted((rng.uniform(0.1, window_s), host) for host, _ in hosts)
        t0 = time.monotonic()
        for at, host in starts:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            room = f"small-{host}-{uuid.uuid4().hex[:6]}"
            rooms[room] = host
            for h, user, _ in tasks:
                if h == host:
                    pending[f"{room}/{user}"] = 1
            await publish_room_started(p, kafka, room, host, "small host", auth=auth)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_done.wait(), 120)
    finally:
        await p.stop()
        for call in calls:
            call.cancel()
        for t in listeners:
            t.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        for ch in channels:
            await ch.close()
    return latencies


def write_graph(spec: GraphSpec, path: Path) -> tuple[int, list[tuple[int, np.ndarray]]]:
    """Writes the graph of `spec` to `path` (16-byte little-endian pairs, what Graph.Import takes); returns
    the edge count and each small host (every host but the celebrity) with its followers."""
    hosts: list[tuple[int, np.ndarray]] = []
    edges = 0
    with path.open("wb") as fh:
        for pairs in generate(spec):
            fh.write(np.ascontiguousarray(pairs, dtype="<u8").tobytes())
            edges += len(pairs)
            small = pairs[pairs[:, 0] != spec.celebrity]
            if len(small):
                for host in np.unique(small[:, 0]).tolist():
                    hosts.append((host, small[small[:, 0] == host, 1]))
    return edges, hosts


def run(
    out_dir: Path,
    followers: int = 10_000_000,
    small_hosts: int = 100,
    notifiers: int = 2,
    window_s: float = 5.0,
    bulk_threshold: int = 10_000,
) -> dict[str, Any]:
    """Runs the benchmark, prints a table, writes out_dir/notify.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    spec = GraphSpec(
        users=2 * followers, celebrity_followers=followers, hosts=small_hosts, max_followers=1000
    )
    with tempfile.TemporaryDirectory(prefix="townhall-notify-") as tmp:
        work = Path(tmp)
        graph = work / "graph.bin"
        with console.status("generating the graph..."):
            edges, hosts = write_graph(spec, graph)
        small_followers = sum(len(f) for _, f in hosts)
        with _cluster(work, notifiers, bulk_threshold) as (broker, procs):
            kafka = KafkaConfig(bootstrap=broker.bootstrap)
            imported = import_with_progress(procs[0].internal, graph, edges, console, DEV_AUTH)
            store_bytes = sum(_store_bytes(n.data_dir) for n in procs)
            report_run = _measure(console, kafka, procs, broker, hosts, followers, spec.users, window_s)
    series = report_run.pop("series")
    figures = {
        "edges": edges,
        "import_edges_per_s": round(imported.edges_per_s),
        "import_seconds": round(imported.seconds, 2),
        "store_bytes_per_edge": round(store_bytes / max(1, edges), 2),
        "small_hosts": len(hosts),
        "small_host_followers": small_followers,
        **report_run,
    }
    total = followers + small_followers
    rate_per_core = figures["notifications_per_cpu_s"]
    figures["extrapolated_100m_on_2_cores_s"] = (
        round(100_000_000 / (2 * rate_per_core), 1) if rate_per_core else None
    )
    report = {
        "benchmark": "notify",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "parameters": {
            "celebrity_followers": followers,
            "small_hosts": small_hosts,
            "notifiers": notifiers,
            "window_s": window_s,
            "bulk_threshold": bulk_threshold,
            "notifications": total,
        },
        "figures": figures,
        # Over time, from the celebrity's room start: what notify.png plots.
        "series": series,
        "method": METHOD,
        "targets": {
            "notifications_per_s_per_core": {"target": 1_000_000, "met": rate_per_core >= 1_000_000},
            "small_host_p99_s": {"target": 1.0, "met": (figures["small_p99_s"] or 99) <= 1.0},
            "extrapolated_100m_on_2_cores_s": {
                "target": 60,
                "met": (figures["extrapolated_100m_on_2_cores_s"] or 1e9) <= 60,
            },
        },
    }
    console.print(_table(figures))
    (out_dir / "notify.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _measure(
    console: Console,
    kafka: KafkaConfig,
    procs: list[Notifier],
    broker: Broker,
    hosts: list[tuple[int, np.ndarray]],
    followers: int,
    users: int,
    window_s: float,
) -> dict[str, Any]:
    topics = Topics(kafka.topic_prefix)
    room = f"celebrity-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    counter = ctx.Process(
        target=_count_celebrity,
        args=(kafka.bootstrap, topics.notifications, room, users, followers, len(hosts), 600.0, child),
        daemon=True,
    )
    counter.start()
    if not parent.poll(60) or parent.recv()[0] != "ready":
        raise RuntimeError("the counting consumer did not start")
    cpu0 = [cpu_s(n.ps) for n in procs]
    broker_ps = psutil.Process(broker.process.pid) if broker.process else None
    broker0 = cpu_s(broker_ps) if broker_ps else 0.0
    state: dict[str, Any] = {"small_done": 0, "small_total": 0, "got": 0, "dups": 0, "last": 0.0}
    # For the plot over time: (seconds since the celebrity's start, followers notified) at most every
    # SAMPLE_S (bounded by the 600 s deadline), and when each small-host stream got its notification.
    samples: list[tuple[float, int]] = []
    state["small_arrivals"] = []

    async def scenario() -> tuple[float, list[float]]:
        p = producer(kafka, "bench-celebrity")
        await p.start()
        try:
            started = time.time()
            await publish_room_started(p, kafka, room, CELEBRITY, "celebrity")
        finally:
            await p.stop()
        small = asyncio.create_task(
            small_host_latencies([n.address for n in procs], hosts, kafka, window_s, state)
        )
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,}"),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            celeb = bar.add_task("celebrity followers", total=followers)
            smalls = bar.add_task("small-host inboxes", total=len(hosts) * INBOX_PER_HOST)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                while parent.poll():
                    kind, got, dups, last = parent.recv()
                    if kind == "small":
                        state["small_topic"] = got
                        continue
                    state.update(got=got, dups=dups, last=last)
                    if kind == "done":
                        state["finished"] = True
                now = time.time() - started
                if not samples or (now - samples[-1][0] >= SAMPLE_S and state["got"] != samples[-1][1]):
                    samples.append((round(now, 2), state["got"]))
                bar.update(celeb, completed=state["got"])
                bar.update(smalls, completed=state["small_done"], total=max(1, state["small_total"]))
                if "small_topic" in state and small.done():
                    break
                await asyncio.sleep(0.2)
        if samples[-1][1] != state["got"]:
            samples.append((round(time.time() - started, 2), state["got"]))
        return started, await small

    started, latencies = asyncio.run(scenario())
    cpu = sum(cpu_s(n.ps) for n in procs) - sum(cpu0)
    broker_cpu = (cpu_s(broker_ps) - broker0) if broker_ps else 0.0
    counter.join(10)
    notified = state["got"] + len(latencies)
    small_total = sum(len(f) for _, f in hosts)
    elapsed = max(1e-9, state["last"] - started)
    return {
        "celebrity_notified": state["got"],
        "celebrity_duplicates_on_topic": state["dups"],
        "time_to_last_celebrity_follower_s": round(elapsed, 2),
        "wall_notifications_per_s": round((state["got"] + small_total) / elapsed),
        "notifier_cpu_s": round(cpu, 2),
        "broker_cpu_s": round(broker_cpu, 2),
        "notifications_per_cpu_s": round((state["got"] + small_total) / cpu) if cpu > 0 else 0,
        "small_streams": state["small_total"],
        "small_notified": len(latencies),
        "small_p50_s": _round(percentile(latencies, 0.5)),
        "small_p99_s": _round(percentile(latencies, 0.99)),
        "small_max_s": _round(max(latencies) if latencies else None),
        "small_topic_p50_s": _round(percentile(state.get("small_topic", []), 0.5)),
        "small_topic_p99_s": _round(percentile(state.get("small_topic", []), 0.99)),
        "notified_total_seen": notified,
        "series": {
            "seconds": [t for t, _ in samples],
            "celebrity_notified": [n for _, n in samples],
            "small_notified_at_s": [round(t - started, 3) for t in state["small_arrivals"]],
            "small_latency_s": [round(x, 4) for x in latencies],
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _table(figures: dict[str, Any]) -> Table:
    table = Table(title="Celebrity notification fan-out (notifier processes' CPU; Kafka on the same machine)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, "-" if value is None else (f"{value:,}" if isinstance(value, int) else str(value)))
    return table


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m townhall_tools.bench.notify", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".townhall/bench"))
    parser.add_argument("--followers", type=int, default=10_000_000)
    parser.add_argument("--small-hosts", type=int, default=100)
    parser.add_argument("--notifiers", type=int, default=2)
    parser.add_argument("--window", type=float, default=5.0)
    args = parser.parse_args()
    run(args.out, args.followers, args.small_hosts, args.notifiers, args.window)


if __name__ == "__main__":
    main()
