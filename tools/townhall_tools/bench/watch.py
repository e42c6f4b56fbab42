"""WatchRoom benchmark: what one watch stream per listener costs (docs/live-state.md).

Starts a Kafka broker and one admission process, opens WatchRoom streams from generator processes and
changes the watched rooms (a host mutes and unmutes a speaker: a change every watcher sees) as fast as the
rooms take it; admission sends at most one update per room every watch_interval_s (0.25 s).

1. Delivery: `streams` watchers over `rooms` rooms. Updates written to streams per second and per
   admission core (the one serialisation per room and view is shared by every stream of the room).
2. The audience with and without watchers: the audience benchmark's step (an origin and 2 edge relays,
   10 speakers, `listeners` listeners at 100 ms chunks) run twice, the second time with one WatchRoom
   per listener on the admission process (their room changing every interval, as a 600k room's counts
   would). Listeners per core without (edge cores) and with (edge + admission cores), and their ratio.

`python -m townhall_tools.bench.watch --streams 2000 --listeners 500` or `run(...)`; JSON in
.townhall/bench/watch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from townhall.client import Client, Endpoints
from townhall.core.auth import HOST, MODERATE, PUBLISH, SUBSCRIBE, Tokens, bearer
from townhall.core.config import DEV_AUTH, DEV_ENV, KafkaConfig, TlsConfig
from townhall.core.kafka import ensure_topics
from townhall.v1.rooms_pb2 import WatchRoomRequest
from townhall_tools.bench import audience
from townhall_tools.bench.env import LIMITS
from townhall_tools.bench.listener_generator import cpu_s
from townhall_tools.bench.relay import Server, _interrupt_on_sigterm, _merge_counts, _start, _stop_all, speak
from townhall_tools.devtools.kafka_broker import Broker, free_port

WATCH_METHOD = "/townhall.v1.Rooms/WatchRoom"
STREAMS_PER_CHANNEL = 100
STREAMS_PER_GENERATOR = 1000
WARMUP_S = 1.0
HOST_ID, SPEAKER_ID = 7_000_000, 7_000_001
# A change per room this often: admission's watch interval (admission.watch_interval_s, 0.25 s).
PACE_S = 0.25


@contextlib.asynccontextmanager
async def _admission(out_dir: Path) -> AsyncIterator[tuple[Server, Broker]]:
    """A Kafka broker and one admission process (watch bounds out of the way), stopped on exit."""
    broker = Broker(out_dir / "watch-kafka", port=free_port())
    broker.start()
    server: Server | None = None
    try:
        await ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        port, internal = free_port(), f"127.0.0.1:{free_port()}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TOWNHALL_")},
            **DEV_ENV,
            **LIMITS,
            "TOWNHALL_KAFKA_BOOTSTRAP": broker.bootstrap,
            "TOWNHALL_ADMISSION_LISTEN": f"127.0.0.1:{port}",
            "TOWNHALL_ADMISSION_INTERNAL_LISTEN": internal,
            "TOWNHALL_ADMISSION_MEMBERS": internal,
            "TOWNHALL_ADMISSION_METRICS_PORT": "0",
            "TOWNHALL_ADMISSION_MAX_WATCH_STREAMS": "1000000",
            "TOWNHALL_ADMISSION_MAX_WATCH_STREAMS_PER_USER": "1000000",
            "TOWNHALL_LOG_LEVEL": "warning",
        }
        with open(out_dir / "watch-admission.log", "w") as log:  # noqa: ASYNC230 (a bench's setup)
            server = _start("admission", [sys.executable, "-m", "townhall.admission"], env, port, log)
            yield server, broker
    finally:
        if server is not None:
            _stop_all([server])
        broker.stop()


def _client(address: str, user: int, *grants: str) -> Client:
    return Client(Endpoints(address, address, TlsConfig()), user, Tokens(DEV_AUTH).mint(user, grants))


async def _rooms(address: str, count: int) -> list[str]:
    """`count` live rooms of one host, each with one speaker to mute and unmute."""
    host = _client(address, HOST_ID, HOST, MODERATE, PUBLISH)
    try:
        ids = []
        for i in range(count):
            room = await host.create_room(f"watched {i}", speakers=[SPEAKER_ID])
            await host.start_room(room.room_id)
            ids.append(room.room_id)
        return ids
    finally:
        await host.close()


# Room changes made so far (read before and after a window).
_CHANGES = [0]


async def _change(address: str, room_ids: list[str], stop: asyncio.Event) -> int:
    """Mutes and unmutes each room's speaker until `stop`, once per room every PACE_S: each room has a
    change at every watch interval (more would be coalesced away), at little cost to admission."""
    host = _client(address, HOST_ID, HOST, MODERATE, PUBLISH)
    changes = 0

    async def loop(room_id: str) -> None:
        nonlocal changes
        muted = True
        due = time.monotonic()
        while not stop.is_set():
            due += PACE_S
            await host.mute(room_id, SPEAKER_ID, muted)
            muted = not muted
            changes += 1
            _CHANGES[0] += 1
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    try:
        await asyncio.gather(*(loop(room_id) for room_id in room_ids))
    finally:
        await host.close()
    return changes


@contextlib.asynccontextmanager
async def _watchers(
    address: str, room_ids: list[str], streams: int
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Generator processes holding `streams` WatchRoom streams, spread over the rooms, all open on entry."""
    procs = []
    try:
        for first in range(0, streams, STREAMS_PER_GENERATOR):
            count = min(STREAMS_PER_GENERATOR, streams - first)
            argv = [sys.executable, "-m", "townhall_tools.bench.watch", "--generator", address]
            argv += [
                "--room-ids",
                *room_ids,
                "--streams",
                str(count),
                "--first-user",
                str(10_000_000 + first),
            ]
            procs.append(
                await asyncio.create_subprocess_exec(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            )
        for proc in procs:  # each says when its streams are open
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60 + streams / 20)
            ready = json.loads(line)
            if ready["failed"]:
                raise RuntimeError(f"{ready['failed']} WatchRoom streams did not open: {ready['kinds']}")
        yield procs
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _window(procs: list[asyncio.subprocess.Process], start_at: float, end_at: float) -> None:
    """Tells the generators when to count updates (Unix seconds)."""
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{start_at} {end_at}\n".encode())
        await proc.stdin.drain()


async def _results(procs: list[asyncio.subprocess.Process], timeout_s: float) -> list[dict[str, Any]]:
    out = []
    for proc in procs:
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        out.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    return out


async def _generate(address: str, room_ids: list[str], streams: int, first_user: int) -> dict[str, Any]:
    """One generator: opens the streams (then prints a line), reads when to count from stdin, counts the
    updates and bytes read within that window, and returns them."""
    tokens = Tokens(DEV_AUTH)
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(-(-streams // STREAMS_PER_CHANNEL))
    ]
    counts: dict[str, Any] = {"updates": 0, "bytes": 0, "errors": 0, "error_kinds": {}}
    failed: dict[str, int] = {}
    window = [float("inf"), float("inf")]
    settled = asyncio.Event()
    pending = [streams]

    def opened_or_not() -> None:
        pending[0] -= 1
        if not pending[0]:
            settled.set()

    async def watch(i: int) -> None:
        method = channels[i // STREAMS_PER_CHANNEL].unary_stream(
            WATCH_METHOD, request_serializer=WatchRoomRequest.SerializeToString, response_deserializer=bytes
        )
        request = WatchRoomRequest(room_id=room_ids[i % len(room_ids)])
        metadata = bearer(tokens.mint(first_user + i, (SUBSCRIBE,)))
        # Opened again if refused (a burst of opens past admission's pending-call queue is CANCELLED by
        # gRPC, by design: clients come back), for up to a minute.
        give_up = time.monotonic() + 60
        while True:
            call = method(request, metadata=metadata)
            try:
                first = await call.read()
                if first is not grpc.aio.EOF:
                    break
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() > give_up:
                    failed[exc.code().name] = failed.get(exc.code().name, 0) + 1
                    opened_or_not()
                    return
            await asyncio.sleep(0.2)
        opened_or_not()
        try:
            while (data := await call.read()) is not grpc.aio.EOF:
                now = time.time()
                if window[0] <= now < window[1]:
                    counts["updates"] += 1
                    counts["bytes"] += len(data)
                elif now >= window[1]:
                    break
        except grpc.aio.AioRpcError as exc:
            if time.time() < window[1]:
                counts["errors"] += 1
                kinds = counts["error_kinds"]
                kinds[exc.code().name] = kinds.get(exc.code().name, 0) + 1
        finally:
            call.cancel()

    tasks = []
    for i in range(streams):  # in waves, as listeners arrive
        tasks.append(asyncio.create_task(watch(i)))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    await settled.wait()
    print(json.dumps({"failed": sum(failed.values()), "kinds": failed}), flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    window[0], window[1] = map(float, line.split())
    await asyncio.wait(tasks, timeout=max(1.0, window[1] - time.time() + 5))
    for task in tasks:
        task.cancel()
    for ch in channels:
        await ch.close()
    return counts


async def _changing(
    admission: Server, room_ids: list[str], seconds: float, start_at: float
) -> tuple[float, int]:
    """Admission's cores and the room changes made while the rooms change for `seconds` from `start_at`."""
    stop = asyncio.Event()
    changer = asyncio.create_task(_change(admission.address, room_ids, stop))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu0, before = cpu_s(admission.ps), _CHANGES[0]
    await asyncio.sleep(seconds)
    cores, changes = (cpu_s(admission.ps) - cpu0) / seconds, _CHANGES[0] - before
    stop.set()
    await changer
    return cores, changes


async def _delivery(admission: Server, streams: int, rooms: int, seconds: float) -> dict[str, Any]:
    """Phase 1: the rooms changing with no watcher (what the changes cost), then with `streams` watchers."""
    room_ids = await _rooms(admission.address, rooms)
    idle_cores, idle_changes = await _changing(admission, room_ids, seconds, time.time() + WARMUP_S)
    async with _watchers(admission.address, room_ids, streams) as procs:
        start_at = time.time() + WARMUP_S
        await _window(procs, start_at, start_at + seconds)
        cores, changes = await _changing(admission, room_ids, seconds, start_at)
        results = await _results(procs, 60)
    updates = sum(r["updates"] for r in results)
    # What the watchers cost: admission's cores less those the same rate of changes took without them.
    watch_cores = cores - idle_cores * changes / idle_changes if idle_changes else cores
    return {
        "streams": streams,
        "rooms": rooms,
        "room_changes_per_s": round(changes / seconds, 1),
        "updates_per_s": round(updates / seconds, 1),
        "bytes_per_update": round(sum(r["bytes"] for r in results) / updates, 1) if updates else None,
        "admission_cores": round(cores, 3),
        "admission_cores_without_watchers": round(idle_cores, 3),
        "watch_cores": round(watch_cores, 3),
        "updates_per_core_s": round(updates / seconds / watch_cores, 1) if watch_cores > 0 else None,
        "stream_errors": sum(r["errors"] for r in results),
        "stream_error_kinds": _merge_counts(r["error_kinds"] for r in results),
        "changes_without_watchers": idle_changes,
        "changes_with_watchers": changes,
    }


async def _audience(
    admission: Server, listeners: int, seconds: float, out_dir: Path, progress: Progress
) -> dict[str, Any]:
    """Phase 2: an audience step without, then with, one WatchRoom per listener."""
    edges, chunk_ms = 2, 100
    per_edge = listeners // edges
    room_ids = await _rooms(admission.address, 1)
    steps = {}
    with audience._relays(out_dir, edges, chunk_ms) as relays:
        origin, edge_servers = relays[0], relays[1:]
        baseline = audience._rss(edge_servers)
        stop = asyncio.Event()
        speakers = [
            asyncio.create_task(speak(origin.address, audience.ROOM, stop, user))
            for user in range(1, audience.SPEAKERS + 1)
        ]
        try:
            idle_admission = 0.0
            for name, watching in (("without", 0), ("with", listeners)):
                task = progress.add_task(f"audience {listeners}, {name} watchers", total=seconds)
                change_stop = asyncio.Event()
                # The watchers hold their streams through the whole step (they are stopped after it).
                async with _watchers(admission.address, room_ids, watching) as procs:
                    await _window(procs, time.time(), time.time() + 3600)
                    changer = asyncio.create_task(_change(admission.address, room_ids, change_stop))
                    step = await audience._phase(
                        edge_servers,
                        (origin.internal,),
                        per_edge,
                        seconds,
                        [origin, admission],
                        baseline,
                        progress,
                        task,
                    )
                    change_stop.set()
                    changes = await changer
                origin_cores, admission_cores = step.pop("other_cores")
                # Listeners per core: edge cores, plus (with watchers) what the watchers cost admission on
                # top of the same room changes without them (the "without" step's admission cores).
                cores = step["cores"] + (admission_cores - idle_admission if watching else 0.0)
                if not watching:
                    idle_admission = admission_cores
                steps[name] = {
                    "listeners": step["listeners_connected"],
                    "watch_streams": watching,
                    "room_changes": changes,
                    "edge_cores": step["cores"],
                    "origin_cores": origin_cores,
                    "admission_cores": admission_cores,
                    "listeners_per_core": round(step["listeners_connected"] / cores, 1) if cores else None,
                    "latency_p99_ms": step["latency_p99_ms"],
                    "chunks_lost": step["chunks_lost"],
                    "stream_errors": step["stream_errors"],
                    # The audience benchmark's bar (p99 latency, every listener connected, nothing lost):
                    # a step that misses it ran on a machine too busy for its cores to mean much.
                    "passed": audience._passed(step, chunk_ms),
                }
        finally:
            stop.set()
            for speaker in speakers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(speaker, 5)
    without, with_ = steps["without"]["listeners_per_core"], steps["with"]["listeners_per_core"]
    return {
        **steps,
        "ratio": round(with_ / without, 3) if with_ and without else None,
        "both_passed": steps["without"]["passed"] and steps["with"]["passed"],
    }


async def _run_all(out_dir: Path, streams: int, rooms: int, listeners: int, seconds: float) -> dict[str, Any]:
    columns = (TextColumn("{task.description:<40}"), BarColumn(), TimeElapsedColumn())
    async with _admission(out_dir) as (admission, _):
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task(f"delivery: {streams} streams, {rooms} rooms", total=None)
            delivery = await _delivery(admission, streams, rooms, seconds)
            progress.update(task, completed=1, total=1)
            with_audience = await _audience(admission, listeners, seconds, out_dir, progress)
    return {"delivery": delivery, "audience": with_audience}


def run(
    out_dir: Path, streams: int = 2000, rooms: int = 4, listeners: int = 1000, seconds: float = 5.0
) -> dict[str, Any]:
    """Runs the WatchRoom benchmark, prints its table, writes out_dir/watch.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with _interrupt_on_sigterm():
        figures = asyncio.run(_run_all(out_dir, streams, rooms, listeners, seconds))
    report = {
        "benchmark": "watch",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "grpcio": grpc.__version__},
        "parameters": {
            "streams": streams,
            "rooms": rooms,
            "listeners": listeners,
            "seconds": seconds,
            "watch_interval_s": 0.25,
            "change": f"host mutes/unmutes a speaker, every {PACE_S} s per room",
        },
        **figures,
    }
    table = Table(
        title="WatchRoom: updates per admission core; audience listeners per core with one watch each"
    )
    for heading in ("figure", "value"):
        table.add_column(heading)
    d, a = figures["delivery"], figures["audience"]
    rows = [
        ("updates/s delivered", d["updates_per_s"]),
        (
            "admission cores (without watchers)",
            f"{d['admission_cores']} ({d['admission_cores_without_watchers']})",
        ),
        ("updates per core-second", d["updates_per_core_s"]),
        ("bytes per update", d["bytes_per_update"]),
        ("listeners/core without watchers", a["without"]["listeners_per_core"]),
        ("listeners/core with one watcher each", a["with"]["listeners_per_core"]),
        (
            "ratio" + ("" if a["both_passed"] else " (a step missed the audience bar: busy machine)"),
            a["ratio"],
        ),
    ]
    for name, value in rows:
        table.add_row(name, "-" if value is None else str(value))
    Console().print(table)
    (out_dir / "watch.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    """Command line entry point (also the generator processes' own)."""
    parser = argparse.ArgumentParser(prog="python -m townhall_tools.bench.watch", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".townhall/bench"))
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--rooms", type=int, default=4)
    parser.add_argument("--listeners", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--generator", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--room-ids", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--first-user", type=int, default=10_000_000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generator:
        result = asyncio.run(_generate(args.generator, args.room_ids, args.streams, args.first_user))
        print(json.dumps(result), flush=True)
        return
    run(args.out, args.streams, args.rooms, args.listeners, args.seconds)


if __name__ == "__main__":
    main()
