"""Join load generator: one process offering joins at fixed arrival rates (open loop), whatever the answers.

Runs in a child process (multiprocessing, spawn) so its CPU is its own. Arrivals are started on
schedule as tasks; a slow server makes calls pile up in flight, not arrivals slow down. Past
`max_inflight` an arrival is counted as unsent (the generator, not the server, is then the limit).
Which arrivals a run sends, and which of them are measured, is the schedule's (`Schedule`), not the
clock's when the loop gets to them: a generator that starts late or is descheduled on a busy machine
sends what fell due meanwhile at once, each counted in the part of the run it was due in.
Protocol on the pipe: child sends ("progress", counts) twice a second, then ("result", dict).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc

from townhall.core.auth import AUTHORIZATION, SUBSCRIBE, Tokens
from townhall.core.channels import channel
from townhall.core.config import DEV_AUTH, AuthConfig, TlsConfig
from townhall.v1.admission_pb2 import JoinRequest
from townhall_tools.bench.stats import LatencyHistogram, PerSecond

METHOD = "/townhall.v1.Admission/Join"
TICK_S = 0.002
CALL_TIMEOUT_S = 10.0
CHANNELS_PER_ADDRESS = 4
_GRANT_TAG = b"\x0a"  # JoinResponse field 1 (grant), length-delimited: cheaper than parsing


@dataclass(frozen=True)
class Spec:
    """What one generator process offers."""

    addresses: tuple[str, ...]
    hot_room: str | None
    hot_rate: float
    cold_rooms: tuple[str, ...]
    cold_rate: float
    start_at: float  # Unix seconds
    warmup_s: float
    seconds: float
    first_user: int
    auth: AuthConfig = DEV_AUTH
    tls: TlsConfig = field(default_factory=TlsConfig)
    max_inflight: int = 4000
    # Where the hot room's joins go (admission's crowd lane); empty: `addresses`, like the cold rooms.
    hot_addresses: tuple[str, ...] = ()


class Schedule:
    """The arrivals of one class of rooms: arrival k (0, 1, ...) is due k/rate seconds after the start.
    A run sends those due before warmup_s + seconds, and measures those due from warmup_s on."""

    def __init__(self, rate: float, warmup_s: float, seconds: float) -> None:
        self.rate = rate
        self.sent = 0
        self._measured_from = math.ceil(warmup_s * rate)
        self._end = math.ceil((warmup_s + seconds) * rate)

    def due(self, elapsed_s: float) -> range:
        """The arrivals due by `elapsed_s` seconds after the start that were not handed out before."""
        upto = min(math.floor(elapsed_s * self.rate) + 1, self._end)
        arrivals = range(self.sent, upto)
        self.sent = max(self.sent, upto)
        return arrivals

    def measured_at(self, arrival: int) -> float | None:
        """Seconds after the start `arrival` is due if that is in the measured window; None in the warmup."""
        return arrival / self.rate if arrival >= self._measured_from else None


@dataclass
class _Class:
    """Counts for one class of rooms (hot or cold), inside the measured window."""

    # Outcomes by the second the schedule had their call for (when it was due), for the storm's plot.
    per_second: PerSecond
    sent: int = 0
    unsent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def result(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "unsent": self.unsent,
            "outcomes": self.outcomes,
            "latency": self.latency.counts,
            "per_second": self.per_second.counts,
        }


class _Generator:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.tokens = Tokens(spec.auth)
        self.channels: list[grpc.aio.Channel] = []
        # Raw bytes in and out, per room class: the hot room may be joined on the crowd lane.
        self.calls = {
            "cold": self._calls(spec.addresses),
            "hot": self._calls(spec.hot_addresses or spec.addresses),
        }
        self.measure_from = spec.start_at + spec.warmup_s
        self.classes = {kind: _Class(PerSecond(self.measure_from, spec.seconds)) for kind in ("hot", "cold")}
        self.inflight = 0
        self.user = spec.first_user
        self.tasks: set[asyncio.Task[None]] = set()

    def _calls(self, addresses: tuple[str, ...]) -> list[Any]:
        channels = [
            channel(address, self.spec.tls, [("grpc.use_local_subchannel_pool", 1)])
            for address in addresses
            for _ in range(CHANNELS_PER_ADDRESS)
        ]
        self.channels += channels
        return [ch.unary_unary(METHOD) for ch in channels]

    async def call(self, kind: str, request: bytes, due: float | None) -> None:
        """One join; counted if `due` (the Unix time the schedule had it for) is in the measured window."""
        self.user += 1
        # Every arrival is a new user with a token of its own, as in a real storm: the server verifies
        # each one (no cache hit), which is the join's full cost.
        metadata = ((AUTHORIZATION, f"Bearer {self.tokens.mint(self.user, (SUBSCRIBE,))}"),)
        calls = self.calls[kind]
        call = calls[self.user % len(calls)]
        counts = self.classes[kind]
        if due is not None:
            counts.sent += 1
        start = time.perf_counter()
        self.inflight += 1
        try:
            reply = await call(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            outcome = "granted" if reply[:1] == _GRANT_TAG else "waiting"
        except grpc.aio.AioRpcError as error:
            outcome = "shed" if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else error.code().name
        finally:
            self.inflight -= 1
        if due is not None:
            elapsed_us = int((time.perf_counter() - start) * 1e6)
            counts.outcomes[outcome] = counts.outcomes.get(outcome, 0) + 1
            counts.latency.add_us(elapsed_us)
            counts.per_second.add(due, outcome)  # in the second the schedule had it for

    def launch(self, kind: str, request: bytes, at: float | None) -> None:
        """Starts an arrival's join; `at`: seconds after the start it is due, None in the warmup."""
        due = None if at is None else self.spec.start_at + at
        if self.inflight >= self.spec.max_inflight:
            if due is not None:
                self.classes[kind].unsent += 1
            return
        task = asyncio.get_running_loop().create_task(self.call(kind, request, due))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, conn: Connection) -> None:
        spec = self.spec
        hot = JoinRequest(room_id=spec.hot_room).SerializeToString() if spec.hot_room else b""
        colds = [JoinRequest(room_id=r).SerializeToString() for r in spec.cold_rooms]
        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        end = spec.start_at + spec.warmup_s + spec.seconds
        hot_arrivals = Schedule(spec.hot_rate, spec.warmup_s, spec.seconds)
        cold_arrivals = Schedule(spec.cold_rate, spec.warmup_s, spec.seconds)
        next_progress = time.time()
        while True:
            now = time.time()
            elapsed = now - spec.start_at
            # Open loop: everything due by now is started now, however the earlier calls went; a last
            # turn at or past the end starts what fell due before it.
            for arrival in hot_arrivals.due(elapsed):
                self.launch("hot", hot, hot_arrivals.measured_at(arrival))
            for arrival in cold_arrivals.due(elapsed):
                self.launch("cold", colds[arrival % len(colds)], cold_arrivals.measured_at(arrival))
            if now >= end:
                break
            if now >= next_progress:
                next_progress = now + 0.5
                conn.send(("progress", self.progress()))
            await asyncio.sleep(TICK_S)
        # Calls still in flight at the end are answered (or time out) before the result is sent.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), CALL_TIMEOUT_S + 1)
        conn.send(("result", {kind: c.result() for kind, c in self.classes.items()}))

    def progress(self) -> dict[str, Any]:
        return {kind: {"sent": c.sent, **c.outcomes} for kind, c in self.classes.items()}

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for ch in self.channels:
            await ch.close()


async def _main(spec: Spec, conn: Connection) -> None:
    generator = _Generator(spec)
    try:
        await generator.run(conn)
    finally:
        await generator.close()


def main(spec: Spec, conn: Connection) -> None:
    """The child process's entry point."""
    asyncio.run(_main(spec, conn))
