"""Relay fan-out benchmark: one relay process, one speaker, N listeners from separate processes.

For each N it measures chunks delivered per second (and per relay CPU core), end-to-end audio
latency (capture to listener receipt, one machine clock), chunks lost (sequence gaps seen by
listeners), time to first audio and relay RSS; then the same for a bare grpc.aio writer (the
ceiling, see bare_stream_server.py), so the relay is reported as a fraction of what gRPC itself allows.

`python -m townhall_tools.bench.relay --listeners 100 500 --seconds 5` or `run(...)` from the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import grpc
import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from townhall.core.channels import channel
from townhall.core.config import DEV_ENV, TlsConfig
from townhall.core.tickets import TICKET_KEY
from townhall.v1 import relay_pb2_grpc
from townhall.v1.common_pb2 import Role
from townhall.v1.relay_pb2 import AudioFrame
from townhall_tools.bench import listener_generator
from townhall_tools.bench.env import LIMITS
from townhall_tools.bench.listener_generator import bench_signer, cpu_s
from townhall_tools.bench.stats import LatencyHistogram, percentile
from townhall_tools.devtools.kafka_broker import free_port
from townhall_tools.devtools.processes import start_serving, stop

CHUNK_MS = 100
FRAME_MS = 20
PAYLOAD_BYTES = 60  # a 20 ms Opus voice packet at ~24 kbit/s
WARMUP_S = 1.0
START_TIMEOUT_S = 20.0


@dataclass
class Server:
    """A server process under test."""

    name: str
    address: str
    # The child process; None for one the benchmark did not start (a container's: see `pid`).
    process: subprocess.Popen[bytes] | None
    # A relay's internal port (where other relays pull from), if it has one.
    internal: str = ""
    # The address tickets name, if not `address` (a relay advertising a published port, dialled directly).
    advertise: str = ""
    # The server's process id, if not the child's (a container's init process).
    pid: int = 0

    @property
    def claim(self) -> str:
        """The relay address its tickets name."""
        return self.advertise or self.address

    @property
    def ps(self) -> psutil.Process:
        """The process, for CPU and memory figures."""
        if self.pid:
            return psutil.Process(self.pid)
        assert self.process is not None, "a server the benchmark did not start needs its pid"
        return psutil.Process(self.process.pid)


def _start(name: str, argv: list[str], env: dict[str, str], port: int, log: TextIO) -> Server:
    address = f"127.0.0.1:{port}"
    return Server(name, address, start_serving(name, argv, env, address, log, START_TIMEOUT_S))


def _stop_all(servers: list[Server]) -> None:
    stop([server.process for server in servers if server.process is not None], grace_s=5)


@contextlib.contextmanager
def _servers(out_dir: Path) -> Iterator[tuple[Server, Server]]:
    """The relay and the ceiling as child processes, always killed on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOWNHALL_")}
    started: list[Server] = []
    with open(out_dir / "relay-server.log", "w") as log:
        try:
            relay_port, ceiling_port = free_port(), free_port()
            relay_env = {
                **env,
                **DEV_ENV,
                "TOWNHALL_RELAY_LISTEN": f"127.0.0.1:{relay_port}",
                "TOWNHALL_RELAY_INTERNAL_LISTEN": f"127.0.0.1:{free_port()}",
                "TOWNHALL_RELAY_METRICS_PORT": "0",
                "TOWNHALL_RELAY_CHUNK_S": str(CHUNK_MS / 1000),
                "TOWNHALL_RELAY_LOAD_REPORT_S": "0",  # no Kafka in the bench
                "TOWNHALL_RELAY_FOLLOW_ROOM_STATE": "false",
                "TOWNHALL_LOG_LEVEL": "warning",
                **LIMITS,
            }
            relay_argv = [sys.executable, "-m", "townhall.relay"]
            started.append(_start("relay", relay_argv, relay_env, relay_port, log))
            ceiling_argv = [
                sys.executable,
                "-m",
                "townhall_tools.bench.bare_stream_server",
                "--port",
                str(ceiling_port),
            ]
            ceiling_argv += ["--chunk-ms", str(CHUNK_MS), "--frames", str(CHUNK_MS // FRAME_MS)]
            ceiling_argv += ["--payload", str(PAYLOAD_BYTES)]
            started.append(_start("ceiling", ceiling_argv, env, ceiling_port, log))
            yield started[0], started[1]
        finally:
            _stop_all(started)


async def _frames(stop: asyncio.Event) -> AsyncIterator[AudioFrame]:
    payload = os.urandom(PAYLOAD_BYTES)
    start = time.monotonic()
    for seq in range(10_000_000):  # bounded; the phase stops it long before
        if stop.is_set():
            return
        delay = start + seq * FRAME_MS / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield AudioFrame(sequence=seq, capture_ts_us=time.time_ns() // 1_000, payload=payload)


async def speak(
    address: str, room_id: str, stop: asyncio.Event, user: int = 1, ticket_key: str = "", claim: str = ""
) -> None:
    """One speaker at 50 frames/s until `stop` (also used by the audience and scale-out benchmarks);
    its ticket names `claim` (default `address`), signed with `ticket_key` (default the development key)."""
    signer = bench_signer(ticket_key)
    token = signer.sign(signer.issue(room_id, user, Role.ROLE_SPEAKER, claim or address))
    async with channel(address, TlsConfig()) as ch:
        await relay_pb2_grpc.RelayStub(ch).Publish(_frames(stop), metadata=((TICKET_KEY, token),))


async def _phase(
    server: Server, listeners: int, seconds: float, progress: Progress, task: Any
) -> dict[str, Any]:
    """One measurement: `listeners` subscribers of one room on `server`."""
    room_id = f"bench-{listeners}"
    stop = asyncio.Event()
    speaker = asyncio.create_task(speak(server.address, room_id, stop)) if server.name == "relay" else None
    workers = 1 if listeners <= 250 else 2
    generators = listener_generator.Generators()
    ready_timeout = 15.0 + listeners / 100
    try:
        for index in range(workers):
            share = listeners // workers + (1 if index < listeners % workers else 0)
            generators.spawn(
                listener_generator.Spec(
                    address=server.address,
                    room_id=room_id,
                    listeners=share,
                    first_user=1_000 + index * 1_000_000,
                    relay_claim=server.address,
                    ready_timeout_s=ready_timeout,
                    result_timeout_s=ready_timeout + seconds + 30,
                )
            )
        progress.update(task, description=f"{server.name} {listeners}: connecting")
        connected = await generators.ready(ready_timeout + 15)
        start_at, end_at = generators.open_window(WARMUP_S, seconds)
        progress.update(task, description=f"{server.name} {listeners}: warming up")
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu_start = cpu_s(server.ps), generators.cpu_s()
        progress.update(task, description=f"{server.name} {listeners}: measuring")
        await listener_generator.tick_through(progress, task, seconds, end_at)
        cpu_end = cpu_s(server.ps), generators.cpu_s()
        rss = server.ps.memory_info().rss
        progress.update(task, completed=seconds, description=f"{server.name} {listeners}: collecting")
        results = await generators.results()
    finally:
        stop.set()
        if speaker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(speaker, 5)
        generators.reap()

    latency = LatencyHistogram()
    for result in results:
        latency.merge(result["latency"])
    first_audio = [ms for result in results for ms in result["first_audio_ms"]]
    chunks = sum(r["chunks"] for r in results)
    spans = [span for r in results for span in r["sequence_spans"]]
    server_cores = (cpu_end[0] - cpu_start[0]) / seconds
    delivered = chunks / seconds
    return {
        "target": server.name,
        "listeners": listeners,
        "listeners_connected": connected,
        "generator_processes": workers,
        "delivered_per_s": round(delivered, 1),
        "expected_per_s": connected * 1000 / CHUNK_MS,
        # Audio actually heard: under load the timer merges late intervals into fewer, larger chunks.
        "frames_delivered_per_s": round(sum(r["frames"] for r in results) / seconds, 1),
        "frames_expected_per_s": connected * 1000 / FRAME_MS,
        "server_cpu_cores": round(server_cores, 3),
        "delivered_per_core_s": round(delivered / server_cores, 1) if server_cores > 0 else None,
        "latency_p50_ms": latency.percentile_ms(0.50),
        "latency_p99_ms": latency.percentile_ms(0.99),
        "latency_samples": latency.count,
        "chunks_lost": sum(r["gaps"] for r in results),
        # How many chunks the room produced per second, as seen by its listeners' sequence numbers.
        "room_chunks_per_s": round(sum(spans) / len(spans) / seconds, 2) if spans else None,
        "stream_errors": sum(r["errors"] for r in results),
        "stream_error_kinds": _merge_counts(r["error_kinds"] for r in results),
        "first_audio_p50_ms": _round(percentile(first_audio, 0.50)),
        "first_audio_p99_ms": _round(percentile(first_audio, 0.99)),
        "server_rss_mb": round(rss / 2**20, 1),
        "generator_cpu_cores": round((cpu_end[1] - cpu_start[1]) / seconds, 3),
    }


def _merge_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for one in counts:
        for key, n in one.items():
            merged[key] = merged.get(key, 0) + n
    return merged


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def _run_all(
    relay: Server, ceiling: Server, listeners: list[int], seconds: float
) -> list[dict[str, Any]]:
    runs = []
    columns = (TextColumn("{task.description:<32}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        for n in listeners:
            for server in (relay, ceiling):
                task = progress.add_task(f"{server.name} {n}", total=seconds)
                runs.append(await _phase(server, n, seconds, progress, task))
                progress.update(task, description=f"{server.name} {n}: done")
    return runs


def _ratios(runs: list[dict[str, Any]]) -> None:
    """Adds the relay's delivered-per-core as a fraction of the ceiling's at the same N."""
    ceiling = {r["listeners"]: r for r in runs if r["target"] == "ceiling"}
    for run in runs:
        base = ceiling.get(run["listeners"])
        mine, theirs = run["delivered_per_core_s"], base and base["delivered_per_core_s"]
        run["vs_ceiling"] = round(mine / theirs, 2) if mine and theirs else None


def _table(runs: list[dict[str, Any]]) -> Table:
    title = f"Relay fan-out: 1 speaker at 50 frames/s, {CHUNK_MS} ms chunks, {os.cpu_count()} CPUs"
    table = Table(title=title)
    headings = [
        ("target", "target"),
        ("listeners", "listeners_connected"),
        ("delivered/s", "delivered_per_s"),
        ("server cores", "server_cpu_cores"),
        ("per core/s", "delivered_per_core_s"),
        ("vs ceiling", "vs_ceiling"),
        ("p50 ms", "latency_p50_ms"),
        ("p99 ms", "latency_p99_ms"),
        ("lost", "chunks_lost"),
        ("1st audio p50 ms", "first_audio_p50_ms"),
        ("RSS MB", "server_rss_mb"),
        ("gen cores", "generator_cpu_cores"),
    ]
    for heading, _ in headings:
        table.add_column(heading, justify="left" if heading == "target" else "right")
    for run in runs:
        table.add_row(*("-" if run.get(key) is None else str(run[key]) for _, key in headings))
    return table


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """Turns SIGTERM into KeyboardInterrupt, so the cleanup that kills the children runs."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(out_dir: Path, listeners: list[int], seconds: float) -> dict[str, Any]:
    """Runs the benchmark for each listener count, prints a table, writes out_dir/relay.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with _interrupt_on_sigterm(), _servers(out_dir) as (relay, ceiling):
        runs = asyncio.run(_run_all(relay, ceiling, listeners, seconds))
    _ratios(runs)
    report = {
        "benchmark": "relay",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "platform": platform.platform(),
        },
        "parameters": {
            "seconds": seconds,
            "warmup_s": WARMUP_S,
            "chunk_ms": CHUNK_MS,
            "frame_ms": FRAME_MS,
            "payload_bytes": PAYLOAD_BYTES,
            "speakers": 1,
        },
        "runs": runs,
    }
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped or logged: do not squeeze the table to 80 columns
    console.print(_table(runs))
    (out_dir / "relay.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m townhall_tools.bench.relay", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".townhall/bench"))
    parser.add_argument("--listeners", type=int, nargs="+", default=[100, 500, 1000, 2000])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    run(args.out, args.listeners, args.seconds)


if __name__ == "__main__":
    main()
