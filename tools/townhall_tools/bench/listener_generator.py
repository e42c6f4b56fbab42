"""Listener load generator: one process holding many Subscribe streams, measuring what they hear.

Runs in a child process (multiprocessing, spawn) so the generator's CPU is its own. Protocol on
the pipe: child sends ("ready", ok, failed); parent sends ("window", start_at, end_at) in Unix
seconds; child counts only chunks received inside the window, then sends ("result", dict).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import grpc
import psutil
from rich.progress import Progress

from townhall.core.channels import channel
from townhall.core.config import DEV_ENV, TicketConfig, TlsConfig, load
from townhall.core.tasks import cancel
from townhall.core.tickets import TICKET_KEY, TicketSigner
from townhall.core.wire import read_varint
from townhall.relay.fanout import chunk_sequence
from townhall.v1 import relay_pb2_grpc
from townhall.v1.common_pb2 import Role
from townhall.v1.relay_pb2 import AudioFrame, SubscribeRequest
from townhall_tools.bench.stats import LatencyHistogram, gap

STREAMS_PER_CHANNEL = 100
SUBSCRIBE = "/townhall.v1.Relay/Subscribe"
WAVE = 250


@dataclass(frozen=True)
class Spec:
    """What one generator process does."""

    address: str
    room_id: str
    listeners: int
    first_user: int
    relay_claim: str
    ready_timeout_s: float
    result_timeout_s: float
    # Relays above `address` in the room's tree (origin first): listeners on an edge.
    upstream: tuple[str, ...] = ()
    # Read chunks as bytes: sequence and the oldest frame's capture time only, not every frame
    # (10 speakers make 50 frames a chunk; parsing them all would make the generator the bottleneck).
    light: bool = False
    # tickets.private_key of the deployment under test; empty: the development key (`townhall dev`, benches).
    ticket_key: str = ""


class _Counters:
    """What the listeners of this process heard inside the measurement window."""

    def __init__(self) -> None:
        self.start_at = float("inf")
        self.end_at = float("inf")
        self.chunks = 0
        self.frames = 0
        self.gaps = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.latency = LatencyHistogram()
        self.first_audio_ms: list[float] = []
        self.ready = 0
        # Per listener, [first, last] sequence received in the window: how far the room advanced.
        self.spans: list[list[int]] = []


async def _listen(
    stub: relay_pb2_grpc.RelayStub, request: SubscribeRequest, metadata: Any, c: _Counters
) -> None:
    opened = time.monotonic()
    call = stub.Subscribe(request, metadata=metadata)
    previous = 0
    add = c.latency.add_us
    span = [0, 0]
    c.spans.append(span)
    try:
        async for chunk in call:
            now = time.time()
            if previous == 0:
                c.first_audio_ms.append((time.monotonic() - opened) * 1000)
                c.ready += 1
            elif c.start_at <= now < c.end_at:
                c.chunks += 1
                c.frames += len(chunk.frames)
                c.gaps += gap(previous, chunk.sequence)
                if not span[0]:
                    span[0] = chunk.sequence
                span[1] = chunk.sequence
                now_us = int(now * 1e6)
                for frame in chunk.frames:
                    add(now_us - frame.capture_ts_us)
            previous = chunk.sequence
    except grpc.aio.AioRpcError as error:
        c.errors += 1
        key = f"{error.code().name}: {error.details()}"[:120]
        c.error_kinds[key] = c.error_kinds.get(key, 0) + 1


def first_capture_us(data: bytes) -> int:
    """capture_ts_us of a serialised Chunk's first (oldest) frame, 0 if none, without parsing the rest."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = read_varint(data, pos)
        elif wire == 2:
            length, pos = read_varint(data, pos)
            if field == 3:
                return AudioFrame.FromString(data[pos : pos + length]).capture_ts_us
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            break
    return 0


async def _listen_light(call: Any, c: _Counters) -> None:
    opened = time.monotonic()
    previous = 0
    add = c.latency.add_us
    span = [0, 0]
    c.spans.append(span)
    try:
        async for data in call:
            now = time.time()
            sequence = chunk_sequence(data)
            if previous == 0:
                c.first_audio_ms.append((time.monotonic() - opened) * 1000)
                c.ready += 1
            elif c.start_at <= now < c.end_at:
                c.chunks += 1
                c.gaps += gap(previous, sequence)
                if not span[0]:
                    span[0] = sequence
                span[1] = sequence
                add(int(now * 1e6) - first_capture_us(data))
            previous = sequence
    except grpc.aio.AioRpcError as error:
        c.errors += 1
        key = f"{error.code().name}: {error.details()}"[:120]
        c.error_kinds[key] = c.error_kinds.get(key, 0) + 1


def bench_signer(private_key: str = "") -> TicketSigner:
    """Tickets for the relays under test: signed with `private_key` (tickets.private_key of a deployment,
    e.g. the multi-host topology's), or the development key the relays a benchmark starts run with."""
    if private_key:
        return TicketSigner.from_config(TicketConfig(private_key=private_key))
    return TicketSigner.from_config(load(env=DEV_ENV).tickets)


def _identity(data: bytes) -> bytes:
    return data


async def _run(spec: Spec, conn: Connection) -> None:
    signer = bench_signer(spec.ticket_key)
    counters = _Counters()
    channels = [
        # A local subchannel pool gives each channel its own TCP connection (else they share one).
        channel(spec.address, TlsConfig(), [("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, -(-spec.listeners // STREAMS_PER_CHANNEL)))
    ]
    request = SubscribeRequest(room_id=spec.room_id)
    tasks: list[asyncio.Task[None]] = []
    try:
        deadline = time.monotonic() + spec.ready_timeout_s
        # Listeners arrive in waves: a burst of thousands of new streams at once overflows the
        # gRPC server's queue of not-yet-accepted calls, which then cancels some at random.
        for first in range(0, spec.listeners, WAVE):
            for i in range(first, min(first + WAVE, spec.listeners)):
                user = spec.first_user + i
                ticket = signer.issue(
                    spec.room_id, user, Role.ROLE_LISTENER, spec.relay_claim, upstream=spec.upstream
                )
                metadata = ((TICKET_KEY, signer.sign(ticket)),)
                on = channels[i % len(channels)]
                if spec.light:
                    subscribe = on.unary_stream(
                        SUBSCRIBE,
                        request_serializer=SubscribeRequest.SerializeToString,
                        response_deserializer=_identity,
                    )
                    listen = _listen_light(subscribe(request, metadata=metadata), counters)
                else:
                    listen = _listen(relay_pb2_grpc.RelayStub(on), request, metadata, counters)
                tasks.append(asyncio.create_task(listen))
            while counters.ready + counters.errors < len(tasks) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        conn.send(("ready", counters.ready, spec.listeners - counters.ready))
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, conn.poll, spec.result_timeout_s):
            return
        _, counters.start_at, counters.end_at = conn.recv()
        await asyncio.sleep(max(0.0, counters.end_at - time.time()) + 0.2)
        conn.send(
            (
                "result",
                {
                    "chunks": counters.chunks,
                    "frames": counters.frames,
                    "gaps": counters.gaps,
                    "errors": counters.errors,
                    "error_kinds": counters.error_kinds,
                    "latency": counters.latency.counts,
                    "first_audio_ms": counters.first_audio_ms,
                    "sequence_spans": [last - first + 1 for first, last in counters.spans if first],
                },
            )
        )
    finally:
        await cancel(*tasks)
        for open_channel in channels:
            await open_channel.close()


def main(spec: Spec, conn: Connection) -> None:
    """The child process's entry point."""
    asyncio.run(_run(spec, conn))


def cpu_s(process: psutil.Process) -> float:
    """CPU seconds (user + system) a process has used so far."""
    times = process.cpu_times()
    return float(times.user + times.system)


async def receive(pipe: Connection, kind: str, timeout_s: float) -> Any:
    """The next message of `kind` from a generator, polling so the event loop keeps running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pipe.poll():
            message = pipe.recv()
            if message[0] == kind:
                return message
        await asyncio.sleep(0.05)
    raise TimeoutError(f"load generator sent no {kind!r} within {timeout_s:.0f} s")


class Generators:
    """The listener generator processes of one benchmark step: spawn, ready, window, results, reap."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[BaseProcess] = []
        self._pipes: list[Connection] = []
        self._ps: list[psutil.Process] = []

    def spawn(self, spec: Spec) -> None:
        """Starts one generator process for `spec`."""
        parent, child = self._context.Pipe()
        process = self._context.Process(target=main, args=(spec, child), daemon=True)
        process.start()
        self._processes.append(process)
        self._pipes.append(parent)

    async def ready(self, timeout_s: float) -> int:
        """Waits until every generator has opened its streams; how many streams connected."""
        return sum([(await receive(pipe, "ready", timeout_s))[1] for pipe in self._pipes])

    def open_window(self, warmup_s: float, seconds: float) -> tuple[float, float]:
        """Tells every generator the measuring window (after a warm-up); returns its start and end."""
        start_at = time.time() + warmup_s
        end_at = start_at + seconds
        for pipe in self._pipes:
            pipe.send(("window", start_at, end_at))
        self._ps = [psutil.Process(p.pid) for p in self._processes if p.pid is not None]
        return start_at, end_at

    def cpu_s(self) -> float:
        """CPU seconds the generators have used so far (to show they are not the bottleneck)."""
        return sum(cpu_s(p) for p in self._ps)

    async def results(self, timeout_s: float = 30) -> list[dict[str, Any]]:
        """Every generator's result for the window."""
        return [(await receive(pipe, "result", timeout_s))[1] for pipe in self._pipes]

    def reap(self) -> None:
        """Waits briefly for the processes to exit, then kills what is left."""
        for process in self._processes:
            process.join(timeout=3)
            if process.is_alive():
                process.kill()
                process.join(timeout=3)


async def tick_through(progress: Progress, task: Any, seconds: float, end_at: float) -> None:
    """Advances a progress bar until the window ends; bounded to one step per 100 ms."""
    for _ in range(int(seconds * 10) + 1):
        remaining = end_at - time.time()
        if remaining <= 0:
            break
        progress.update(task, completed=seconds - remaining)
        await asyncio.sleep(min(0.1, remaining))
