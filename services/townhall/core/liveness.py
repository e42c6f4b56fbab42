"""Liveness of peer processes: gRPC health probes and the pure rules that turn them into up or down.

Static membership names every process, dead or alive; rooms must only be owned (and listeners
only placed) where a process answers. A member is down after `failures` probes in a row that got
no answer (a refused connection fails at once, so a killed process is out within about two probe
intervals), and at once when it answers NOT_SERVING (a process draining on SIGTERM says so
first). A member that answers but refuses the probe (RESOURCE_EXHAUSTED, or CANCELLED by a full
gRPC queue) is busy: alive, so a moment of overload moves nothing, but not serving, since probes
have room of their own on every server (core/bounds.py) and it is refusing even those; after
`busy_failures` such answers (or misses) in a row it is down too. Any other answer means it is alive.
A member is up only once it has answered SERVING: one not probed yet (a pod that just appeared in its
Service's EndpointSlices, a relay just discovered) owns no rooms and gets no listeners until a probe
finds it serving. A process never probes itself, so memberships count their own process apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from townhall.core import logging
from townhall.core.config import TlsConfig
from townhall.core.forwarding import peer_channel
from townhall.core.metrics import PEER_PROBES, from_zero
from townhall.core.tasks import cancel, supervise

log = logging.get(__name__)


class Probe(enum.Enum):
    """What one health probe found."""

    SERVING = "serving"
    NOT_SERVING = "not_serving"  # answered, and said it is shutting down
    BUSY = "busy"  # answered, but refused the probe (RESOURCE_EXHAUSTED, CANCELLED)
    NO_ANSWER = "no_answer"  # refused, reset or timed out


from_zero(PEER_PROBES, *(probe.value for probe in Probe))
_PROBE_ERRORS = {
    grpc.StatusCode.UNAVAILABLE: Probe.NO_ANSWER,
    grpc.StatusCode.DEADLINE_EXCEEDED: Probe.NO_ANSWER,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Probe.BUSY,
    grpc.StatusCode.CANCELLED: Probe.BUSY,
}


class Liveness:
    """Which members are up, from a stream of probe results (pure: no I/O, no clock)."""

    def __init__(self, failures: int = 2, busy_failures: int | None = None) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        self._failures = failures
        self._busy_failures = max(failures, busy_failures or 5 * failures)
        self._missed: dict[str, int] = {}
        # Probes in a row that were not SERVING (busy or missed).
        self._unwell: dict[str, int] = {}
        self._up: dict[str, bool] = {}
        # Bumped whenever a member goes up or down, so readers can cache what they derive.
        self.version = 0

    def record(self, member: str, probe: Probe) -> bool:
        """Takes one probe result; True if the member went up or down because of it."""
        was = self._up.get(member, False)
        if probe is Probe.SERVING:
            self._missed[member] = self._unwell[member] = 0
            up = True
        elif probe is Probe.NOT_SERVING:
            up = False
        elif probe is Probe.BUSY:
            self._missed[member] = 0  # it answered
            unwell = self._unwell[member] = self._unwell.get(member, 0) + 1
            # Alive: up until busy for too long; a member that is down (or never served) stays down.
            up = was and unwell < self._busy_failures
        else:
            missed = self._missed[member] = self._missed.get(member, 0) + 1
            unwell = self._unwell[member] = self._unwell.get(member, 0) + 1
            # A member never seen up stays down: nothing says it ever started.
            up = was and missed < self._failures and unwell < self._busy_failures
        self._up[member] = up
        if was != up:
            self.version += 1
            return True
        return False

    def is_up(self, member: str) -> bool:
        """Whether the member answered SERVING to its last probe (or missed fewer than `failures` since);
        a member not probed yet is not up."""
        return self._up.get(member, False)

    def up(self, members: Iterable[str]) -> list[str]:
        """The members that are up, in the given order."""
        return [m for m in members if self.is_up(m)]

    def down(self) -> set[str]:
        """Every probed member that is not up (members never probed are not up either, but not listed)."""
        return {m for m, up in self._up.items() if not up}


class Prober:
    """Probes addresses every `interval_s` with gRPC health and keeps a Liveness of them.

    `targets` is asked before every round (Kubernetes members come and go); `on_round` callbacks
    run on the event loop after every round, so readers can compare what they derive from it.
    `address` says where to dial a target (a relay's internal address: admission/relays.py); the
    Liveness stays keyed by the target.
    """

    def __init__(
        self,
        targets: Callable[[], Iterable[str]],
        interval_s: float,
        timeout_s: float,
        failures: int,
        skip: Iterable[str] = (),
        tls: TlsConfig | None = None,
        busy_failures: int | None = None,
        address: Callable[[str], str] | None = None,
    ) -> None:
        self.liveness = Liveness(failures, busy_failures)
        self._targets = targets
        self._address = address or (lambda target: target)
        self._skip = set(skip)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._on_round: list[Callable[[], None]] = []
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._last: dict[str, Probe] = {}
        self._tls = tls or TlsConfig()
        self._task: asyncio.Task[None] | None = None

    def on_round(self, callback: Callable[[], None]) -> None:
        """Adds a callback run after every probe round."""
        self._on_round.append(callback)

    async def probe(self, target: str) -> Probe:
        """One health check of `target`, at its address."""
        address = self._address(target)
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = peer_channel(address, self._tls)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return _PROBE_ERRORS.get(exc.code(), Probe.SERVING)  # any other answer: alive
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return Probe.SERVING
        return Probe.NOT_SERVING

    async def round(self) -> bool:
        """Probes every target once, concurrently; True if any went up or down."""
        targets = sorted(set(self._targets()) - self._skip)
        await self._close_unused({self._address(t) for t in targets})
        results = await asyncio.gather(*(self.probe(t) for t in targets))
        changed = False
        for target, result in zip(targets, results, strict=True):
            PEER_PROBES.labels(result.value).inc()
            if result is Probe.BUSY and self._last.get(target) is not Probe.BUSY:
                log.info("peer busy", peer=target)
            self._last[target] = result
            if self.liveness.record(target, result):
                changed = True
                log.info("peer " + ("up" if self.liveness.is_up(target) else "down"), peer=target)
        for callback in self._on_round:
            callback()
        return changed

    async def _close_unused(self, addresses: set[str]) -> None:
        """Closes the channels of addresses no target has any more (gone, or moved to a new address)."""
        for address in [a for a in self._channels if a not in addresses]:
            with contextlib.suppress(Exception):
                await self._channels.pop(address).close()

    def start(self) -> None:
        """Probes in the background until close()."""
        self._task = supervise(self._run(), "liveness-prober")

    async def close(self) -> None:
        """Stops probing and closes the channels."""
        await cancel(self._task)
        self._task = None
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.round()
            except Exception as exc:  # a probe round must never end the loop
                log.warning("probe round failed", error=repr(exc))
            await asyncio.sleep(max(0.0, self._interval_s - (loop.time() - started)))
