"""Audience benchmark: 10 speakers at 50 frames/s on an origin relay, listeners spread over edge relays.

For each chunk interval (100, 200, 300 ms) it starts an origin and E edge relays (separate
processes), and raises the listeners per edge step by step until a step misses the bar (p99
end-to-end latency over budget, a chunk lost, or a stream failing): the most listeners per edge
core that passed, time to first audio, resident memory per listener stream. Then a bare grpc.aio
streaming writer with chunks of the same size and the same listener count (bare_stream_server.py): the
relay's listeners per core as a fraction of the ceiling's messages per core / chunks per second.

Latency is the oldest frame of each chunk (capture on the speaker, receipt on the listener, one
machine clock): an upper bound of the per-frame figure, since a chunk waits for its interval.

`python -m townhall_tools.bench.audience --edges 2 --listeners 250 500 1000 --seconds 5` or `run(...)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from townhall.core.channels import channel
from townhall.core.config import DEV_ENV, TlsConfig
from townhall.core.tickets import TICKET_KEY
from townhall.v1 import relay_pb2_grpc
from townhall.v1.common_pb2 import Role
from townhall.v1.relay_pb2 import SubscribeRequest
from townhall_tools.bench import listener_generator
from townhall_tools.bench.env import LIMITS
from townhall_tools.bench.listener_generator import bench_signer, cpu_s
from townhall_tools.bench.relay import (
    FRAME_MS,
    PAYLOAD_BYTES,
    Server,
    _interrupt_on_sigterm,
    _merge_counts,
    _round,
    _start,
    _stop_all,
    speak,
)
from townhall_tools.bench.stats import LatencyHistogram, percentile
from townhall_tools.devtools.kafka_broker import free_port

SPEAKERS = 10
CHUNKS_MS = (100, 200, 300)
LATENCY_BUDGET_MS = 300
WARMUP_S = 1.0
LISTENERS_PER_GENERATOR = 1500
PROBES_PER_S = 4
STEP_RETRIES = 1
ROOM = "audience"


def budget_ms(chunk_ms: int) -> int:
    """The p99 bar: 300 ms, or the interval plus 200 ms where a chunk alone waits longer than that."""
    return max(LATENCY_BUDGET_MS, chunk_ms + 200)


@contextlib.contextmanager
def _relays(out_dir: Path, edges: int, chunk_ms: int) -> Iterator[list[Server]]:
    """An origin (first) and `edges` edge relays as child processes, always stopped on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOWNHALL_")}
    started: list[Server] = []
    with open(out_dir / f"audience-relays-{chunk_ms}ms.log", "w") as log:
        try:
            for index in range(edges + 1):
                port, internal = free_port(), f"127.0.0.1:{free_port()}"
                relay_env = {
                    **env,
                    **DEV_ENV,
                    "TOWNHALL_RELAY_LISTEN": f"127.0.0.1:{port}",
                    "TOWNHALL_RELAY_INTERNAL_LISTEN": internal,
                    "TOWNHALL_RELAY_METRICS_PORT": "0",
                    "TOWNHALL_RELAY_CHUNK_S": str(chunk_ms / 1000),
                    "TOWNHALL_RELAY_LOAD_REPORT_S": "0",
                    "TOWNHALL_RELAY_FOLLOW_ROOM_STATE": "false",  # no Kafka in the bench
                    "TOWNHALL_LOG_LEVEL": "warning",
                    **LIMITS,
                }
                name = "origin" if index == 0 else f"edge-{index}"
                argv = [sys.executable, "-m", "townhall.relay"]
                started.append(_start(name, argv, relay_env, port, log))
                started[-1].internal = internal
            yield started
        finally:
            _stop_all(started)


@contextlib.contextmanager
def _ceiling(out_dir: Path, chunk_ms: int) -> Iterator[Server]:
    """The bare streaming writer with chunks the size of 10 speakers' frames over `chunk_ms`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOWNHALL_")}
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "townhall_tools.bench.bare_stream_server",
        "--port",
        str(port),
        "--chunk-ms",
        str(chunk_ms),
    ]
    argv += ["--frames", str(SPEAKERS * chunk_ms // FRAME_MS), "--payload", str(PAYLOAD_BYTES)]
    with open(out_dir / f"audience-ceiling-{chunk_ms}ms.log", "w") as log:
        server = _start("ceiling", argv, env, port, log)
        try:
            yield server
        finally:
            _stop_all([server])


async def _probe(
    targets: list[Server],
    upstream: tuple[str, ...],
    until: float,
    times_ms: list[float],
    ticket_key: str = "",
) -> None:
    """Late joiners at a steady 4/s while the step runs: time from Subscribe to the first chunk."""
    signer = bench_signer(ticket_key)
    channels = [channel(t.address, TlsConfig()) for t in targets]
    try:
        for index in range(int((until - time.time()) * PROBES_PER_S)):  # bounded by the window
            if time.time() >= until:
                break
            target = targets[index % len(targets)]
            ticket = signer.issue(ROOM, 900_000 + index, Role.ROLE_LISTENER, target.claim, upstream=upstream)
            stub = relay_pb2_grpc.RelayStub(channels[index % len(targets)])
            opened = time.monotonic()
            call = stub.Subscribe(
                SubscribeRequest(room_id=ROOM), metadata=((TICKET_KEY, signer.sign(ticket)),)
            )
            with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                await asyncio.wait_for(call.read(), 5.0)
                times_ms.append((time.monotonic() - opened) * 1000)
            call.cancel()
            await asyncio.sleep(max(0.0, opened + 1 / PROBES_PER_S - time.monotonic()))
    finally:
        for open_channel in channels:
            await open_channel.close()


def _rss(servers: list[Server]) -> int:
    return sum(int(server.ps.memory_info().rss) for server in servers)


async def _phase(
    targets: list[Server],
    upstream: tuple[str, ...],
    per_target: int,
    seconds: float,
    others: list[Server],
    baseline_rss: int,
    progress: Progress,
    task: Any,
    ticket_key: str = "",
    netns: bool = False,
) -> dict[str, Any]:
    """`per_target` listeners on each target; CPU and memory of the targets, CPU of `others`. Tickets
    are signed with `ticket_key` (tickets.private_key; default the development key) and name each
    target's claim. With `netns` (each target in a network namespace of its own, as a container is), also
    the bytes the targets sent, from their namespaces' interface counters."""
    label = progress.tasks[task].description
    generators = listener_generator.Generators()
    workers = max(1, -(-per_target // LISTENERS_PER_GENERATOR))
    ready_timeout = 15.0 + per_target * len(targets) / 100
    try:
        for t_index, target in enumerate(targets):
            for w in range(workers):
                share = per_target // workers + (1 if w < per_target % workers else 0)
                generators.spawn(
                    listener_generator.Spec(
                        address=target.address,
                        room_id=ROOM,
                        listeners=share,
                        first_user=1_000_000 * (1 + t_index * workers + w),
                        relay_claim=target.claim,
                        ready_timeout_s=ready_timeout,
                        result_timeout_s=ready_timeout + seconds + 30,
                        upstream=upstream,
                        light=True,
                        ticket_key=ticket_key,
                    )
                )
        progress.update(task, description=f"{label}: connecting")
        connected = await generators.ready(ready_timeout + 15)
        start_at, end_at = generators.open_window(WARMUP_S, seconds)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu_start = sum(map(cpu_s, (t.ps for t in targets))), [cpu_s(o.ps) for o in others]
        sent_start = sum(tx_bytes(t.ps.pid) for t in targets) if netns else 0
        gen_start = generators.cpu_s()
        progress.update(task, description=f"{label}: measuring")
        probe_ms: list[float] = []
        probe = asyncio.create_task(_probe(targets, upstream, end_at - 0.5, probe_ms, ticket_key))
        await listener_generator.tick_through(progress, task, seconds, end_at)
        cpu_end = sum(map(cpu_s, (t.ps for t in targets))), [cpu_s(o.ps) for o in others]
        sent_end = sum(tx_bytes(t.ps.pid) for t in targets) if netns else 0
        gen_end = generators.cpu_s()
        rss = _rss(targets)
        await asyncio.wait_for(probe, 10)
        progress.update(task, completed=seconds, description=f"{label}: collecting")
        results = await generators.results()
    finally:
        generators.reap()
    latency = LatencyHistogram()
    for result in results:
        latency.merge(result["latency"])
    first_audio = [ms for result in results for ms in result["first_audio_ms"]]
    chunks = sum(r["chunks"] for r in results)
    cores = (cpu_end[0] - cpu_start[0]) / seconds
    return {
        "listeners": per_target * len(targets),
        "listeners_connected": connected,
        "relays": len(targets),
        "delivered_per_s": round(chunks / seconds, 1),
        "cores": round(cores, 3),
        "delivered_per_core_s": round(chunks / seconds / cores, 1) if cores > 0 else None,
        "listeners_per_core": round(connected / cores, 1) if cores > 0 else None,
        "other_cores": [round((e - s) / seconds, 3) for s, e in zip(cpu_start[1], cpu_end[1], strict=True)],
        "generator_cores": round((gen_end - gen_start) / seconds, 3),
        "latency_p50_ms": latency.percentile_ms(0.50),
        "latency_p99_ms": latency.percentile_ms(0.99),
        "chunks_lost": sum(r["gaps"] for r in results),
        "stream_errors": sum(r["errors"] for r in results),
        "stream_error_kinds": _merge_counts(r["error_kinds"] for r in results),
        # Joiners arriving one by one while the room plays (the user's figure).
        "first_audio_p50_ms": _round(percentile(probe_ms, 0.50)),
        "first_audio_p99_ms": _round(percentile(probe_ms, 0.99)),
        "first_audio_probes": len(probe_ms),
        # The step's own listeners, connected in waves of 250 per generator (a join burst).
        "burst_first_audio_p99_ms": _round(percentile(first_audio, 0.99)),
        "rss_mb": round(rss / 2**20, 1),
        "rss_per_listener_kb": round((rss - baseline_rss) / 1024 / connected, 1) if connected else None,
        **(
            {
                "sent_bytes_per_s": round((sent_end - sent_start) / seconds),
                "sent_bytes_per_listener_s": round((sent_end - sent_start) / seconds / connected, 1)
                if connected
                else None,
            }
            if netns
            else {}
        ),
    }


def tx_bytes(pid: int) -> int:
    """Bytes sent on every interface but loopback of the network namespace process `pid` is in
    (/proc/PID/net/dev): what a container put on the wire, TCP/IP and TLS headers included."""
    total = 0
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]:
        name, counters = line.split(":", 1)
        if name.strip() != "lo":
            total += int(counters.split()[8])
    return total


def _passed(step: dict[str, Any], chunk_ms: int) -> bool:
    p99 = step["latency_p99_ms"]
    return bool(
        step["listeners_connected"] == step["listeners"]
        and not step["chunks_lost"]
        and not step["stream_errors"]
        and p99 is not None
        and p99 <= budget_ms(chunk_ms)
    )


async def step_search(
    counts: Sequence[int],
    measure: Callable[[int], Awaitable[dict[str, Any]]],
    passed: Callable[[dict[str, Any]], bool],
    retries: int = STEP_RETRIES,
) -> list[dict[str, Any]]:
    """Measures each count in turn until one misses the bar: every attempt's step, marked `passed` and
    `attempt`. A failed step runs `retries` more times (the machine is shared: one noisy step should not
    end the search); the search stops after a step that failed every attempt."""
    steps: list[dict[str, Any]] = []
    for count in counts:
        for attempt in range(1 + retries):
            step = await measure(count)
            step["passed"] = passed(step)
            step["attempt"] = attempt + 1
            steps.append(step)
            if step["passed"]:
                break
        if not steps[-1]["passed"]:
            break
    return steps


async def _interval(
    out_dir: Path, chunk_ms: int, edges: int, listeners: list[int], seconds: float, progress: Progress
) -> dict[str, Any]:
    """Every step at one chunk interval, then the ceiling at the best passing step's listeners per edge."""
    scale = chunk_ms / 100  # longer chunks: proportionally more listeners for the same message rate
    with _relays(out_dir, edges, chunk_ms) as relays:
        origin, edge_servers = relays[0], relays[1:]
        baseline = _rss(edge_servers)
        stop = asyncio.Event()
        speakers = [
            asyncio.create_task(speak(origin.address, ROOM, stop, user)) for user in range(1, SPEAKERS + 1)
        ]
        try:

            async def measure(per_edge: int) -> dict[str, Any]:
                task = progress.add_task(f"{chunk_ms} ms, {per_edge}x{edges} on edges", total=seconds)
                step = await _phase(
                    edge_servers, (origin.internal,), per_edge, seconds, [origin], baseline, progress, task
                )
                step["origin_cores"] = step.pop("other_cores")[0]
                verdict = "ok" if _passed(step, chunk_ms) else "over"
                progress.update(task, description=f"{chunk_ms} ms, {per_edge}x{edges}: {verdict}")
                return step

            steps = await step_search(
                [int(n * scale) for n in listeners], measure, lambda s: _passed(s, chunk_ms)
            )
        finally:
            stop.set()
            for speaker in speakers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(speaker, 5)
    # One ceiling process with as many listeners as one edge had at the best passing step: per-core
    # figures depend on the listeners per process (the event loop batches more work per wake-up).
    passing = [s["listeners"] for s in steps if s["passed"]]
    total = (max(passing) if passing else steps[-1]["listeners"] if steps else 0) // edges
    with _ceiling(out_dir, chunk_ms) as ceiling:
        task = progress.add_task(f"{chunk_ms} ms, ceiling {total}", total=seconds)
        bare = await _phase([ceiling], (), total, seconds, [], _rss([ceiling]), progress, task)
    return {"chunk_ms": chunk_ms, "steps": steps, "ceiling": bare, **_summary(chunk_ms, steps, bare)}


def _summary(chunk_ms: int, steps: list[dict[str, Any]], bare: dict[str, Any]) -> dict[str, Any]:
    passing = [s for s in steps if s["passed"] and s["listeners_per_core"]]
    best = max(passing, key=lambda s: s["listeners_connected"]) if passing else None
    largest = max(steps, key=lambda s: s["listeners_connected"]) if steps else None
    per_s = 1000 / chunk_ms
    ceiling_per_core = bare["delivered_per_core_s"] / per_s if bare["delivered_per_core_s"] else None
    mine = best["listeners_per_core"] if best else None
    return {
        "best_listeners": best["listeners_connected"] if best else 0,
        "listeners_per_core": mine,
        "ceiling_listeners_per_core": _round(ceiling_per_core),
        "vs_ceiling": round(mine / ceiling_per_core, 2) if mine and ceiling_per_core else None,
        "first_audio_p99_ms": max((s["first_audio_p99_ms"] or 0 for s in passing), default=None),
        # At the most listeners tried: there the fixed memory and what earlier steps left matter least.
        "rss_per_listener_kb": largest["rss_per_listener_kb"] if largest else None,
        "latency_p99_ms": best["latency_p99_ms"] if best else None,
    }


def _tables(intervals: list[dict[str, Any]], edges: int) -> list[Table]:
    steps = Table(
        title=f"Audience: {SPEAKERS} speakers x 50 frames/s, origin + {edges} edges, {os.cpu_count()} CPUs"
    )
    columns = [
        ("chunk ms", None),
        ("listeners", "listeners_connected"),
        ("edge cores", "cores"),
        ("listeners/core", "listeners_per_core"),
        ("origin cores", "origin_cores"),
        ("p50 ms", "latency_p50_ms"),
        ("p99 ms", "latency_p99_ms"),
        ("lost", "chunks_lost"),
        ("errors", "stream_errors"),
        ("1st audio p99 ms", "first_audio_p99_ms"),
        ("burst 1st p99", "burst_first_audio_p99_ms"),
        ("KB/listener", "rss_per_listener_kb"),
        ("gen cores", "generator_cores"),
        ("ok", "passed"),
    ]
    for heading, _ in columns:
        steps.add_column(heading, justify="right")
    for interval in intervals:
        for step in [*interval["steps"], {**interval["ceiling"], "passed": "ceiling"}]:
            cells = [str(interval["chunk_ms"])]
            cells += ["-" if step.get(key) is None else str(step[key]) for _, key in columns[1:] if key]
            steps.add_row(*cells)
    summary = Table(title="Listeners per edge core (passing steps) vs the bare streaming ceiling")
    for heading in (
        "chunk ms",
        "listeners",
        "per core",
        "ceiling per core",
        "vs ceiling",
        "1st audio p99",
        "KB/listener",
    ):
        summary.add_column(heading, justify="right")
    for i in intervals:
        keys = [
            "best_listeners",
            "listeners_per_core",
            "ceiling_listeners_per_core",
            "vs_ceiling",
            "first_audio_p99_ms",
            "rss_per_listener_kb",
        ]
        summary.add_row(str(i["chunk_ms"]), *("-" if i.get(k) is None else str(i[k]) for k in keys))
    return [steps, summary]


async def _run_all(
    out_dir: Path, edges: int, listeners: list[int], seconds: float, chunks: list[int]
) -> list[Any]:
    columns = (TextColumn("{task.description:<40}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        return [
            await _interval(out_dir, chunk_ms, edges, listeners, seconds, progress) for chunk_ms in chunks
        ]


def run(
    out_dir: Path,
    edges: int = 2,
    listeners: list[int] | None = None,
    seconds: float = 5.0,
    chunks: list[int] | None = None,
) -> dict[str, Any]:
    """Runs the audience benchmark, prints its tables, writes out_dir/audience.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    listeners = listeners or [250, 500, 750, 1000, 1500]
    chunks = chunks or list(CHUNKS_MS)
    with _interrupt_on_sigterm():
        intervals = asyncio.run(_run_all(out_dir, edges, listeners, seconds, chunks))
    report = {
        "benchmark": "audience",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "platform": platform.platform(),
        },
        "parameters": {
            "speakers": SPEAKERS,
            "frame_ms": FRAME_MS,
            "payload_bytes": PAYLOAD_BYTES,
            "edges": edges,
            "listeners_per_edge_at_100ms": listeners,
            "seconds": seconds,
            "warmup_s": WARMUP_S,
            "latency_budget_ms": {c: budget_ms(c) for c in chunks},
            "latency": "oldest frame of each chunk, capture to receipt",
        },
        "intervals": intervals,
    }
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    for table in _tables(intervals, edges):
        console.print(table)
    (out_dir / "audience.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m townhall_tools.bench.audience", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".townhall/bench"))
    parser.add_argument("--edges", type=int, default=2)
    parser.add_argument(
        "--listeners", type=int, nargs="+", default=[250, 500, 750, 1000, 1500], help="per edge at 100 ms"
    )
    parser.add_argument("--chunks", type=int, nargs="+", default=list(CHUNKS_MS), help="chunk intervals, ms")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    run(args.out, args.edges, args.listeners, args.seconds, args.chunks)


if __name__ == "__main__":
    main()
