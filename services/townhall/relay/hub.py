"""The rooms of one relay process: creation on first use, one chunk timer per active room, idle sweep."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import grpc

from townhall.core import logging
from townhall.core.errors import Reason, Unavailable
from townhall.core.errors import reason as error_reason
from townhall.core.tasks import cancel, spawn, supervise
from townhall.core.validation import MAX_LOST_ROOMS
from townhall.relay import metrics
from townhall.relay.fanout import Emitted, FanoutSettings, ListenerQueue, Room, chunk_position

log = logging.get(__name__)

# Reasons a subscriber is closed by the relay (ListenerQueue.reason).
STUCK = "stuck"
DRAINING = "draining"
UPSTREAM_LOST = "upstream-lost"
# Why a pull failed when its upstream sent nothing, not even a heartbeat, for upstream_lost_s.
SILENT = "silent"
# Response header of a Pull that sends heartbeats (relay/servicer.py answers it).
HEARTBEAT_KEY = "townhall-heartbeat-ms"


class PullSource(Protocol):
    """Where an edge pulls a room's chunks from (Upstreams; a fake in unit tests)."""

    def pull(
        self,
        room_id: str,
        path: tuple[str, ...],
        resume_after: int,
        resume_epoch: int = 0,
        heartbeat_ms: int = 0,
    ) -> AsyncIterator[bytes]:
        """The room's serialised chunks from path[-1], after (resume_epoch, resume_after), and an
        empty message (a heartbeat) after each heartbeat_ms without one if the upstream sends them."""
        ...

    async def forget(self, address: str) -> None:
        """Drops the connection to a relay that went silent (the next pull dials again)."""
        ...


class Silence:
    """Cancels a pull call after `after_s` without a message (fired: it did); `cancel` None: never."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, after_s: float, cancel: Callable[[], object] | None
    ) -> None:
        self.fired = False
        self._loop = loop
        self._after_s = after_s
        self._cancel = cancel
        self._timer = loop.call_later(after_s, self._fire) if cancel is not None else None

    def feed(self) -> None:
        """A message came: the wait starts again (once per chunk per room, not per listener)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._loop.call_later(self._after_s, self._fire)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self.fired = True
        assert self._cancel is not None
        self._cancel()


def wall_us() -> int:
    """Unix microseconds, the unit of capture and emission timestamps."""
    return time.time_ns() // 1_000


class RelayRooms:
    """All rooms of this relay, their chunk timers and the sweep that forgets idle rooms."""

    def __init__(
        self,
        settings: FanoutSettings,
        chunk_s: float,
        idle_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_us: Callable[[], int] = wall_us,
        upstreams: PullSource | None = None,
        pull_linger_s: float = 5.0,
        large_chunk_s: float = 0.0,
        large_downstream: int = 0,
        upstream_lost_s: float = 1.0,
        lost_report_s: float = 30.0,
    ) -> None:
        self.settings = settings
        # A pull failing this long means the upstream is gone: listeners are sent to join again.
        self.upstream_lost_s = upstream_lost_s
        # Rooms whose upstream was lost here -> when last (self._clock), oldest first, at most
        # MAX_LOST_ROOMS: the load report names them so admission sends their listeners elsewhere.
        self._lost: dict[str, float] = {}
        self._lost_report_s = lost_report_s
        # Told of a room newly lost (the load reporter: a report at once); listeners are sent away once
        # it returns, so that admission knows of the loss when they join again. It bounds its own wait.
        self.announce: Callable[[], Awaitable[object]] | None = None
        self._upstreams = upstreams
        # An edge keeps pulling this long after its last listener left, so one who reconnects resumes.
        self.pull_linger_s = pull_linger_s
        # A room pulled by this many relays has a large audience: longer chunks cost its edges less.
        self._large_chunk_s = large_chunk_s
        self._large_downstream = large_downstream
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._chunk_s = chunk_s
        self._idle_s = idle_s
        self._clock = clock
        self._wall_us = wall_clock_us
        self._rooms: dict[str, Room] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._draining = False
        # Subscribe streams open here (audience and stage; relay pulls are not listeners).
        self.listeners = 0

    def room(self, room_id: str) -> Room | None:
        """The room if this relay holds it."""
        return self._rooms.get(room_id)

    @property
    def draining(self) -> bool:
        """Whether the relay is shutting down (new streams are refused, open ones end)."""
        return self._draining

    @property
    def rooms(self) -> int:
        """How many rooms this relay holds."""
        return len(self._rooms)

    def join_publisher(self, room_id: str) -> Room:
        """Counts a new Publish stream into the room, creating the room and its timer as needed."""
        self._refuse_if_draining()
        room = self._room(room_id)
        if room.upstream:
            # Speakers publish to the origin: if they come here, this relay has become the origin.
            self._become_origin(room)
        room.publishers += 1
        room.idle_since = None
        metrics.PUBLISHERS.inc()
        self._activate(room)
        return room

    def leave_publisher(self, room: Room) -> None:
        """A Publish stream ended; the timer flushes its last frames and stops if nobody is left."""
        room.publishers -= 1
        metrics.PUBLISHERS.dec()

    def subscribe(
        self,
        room_id: str,
        resume_after: int,
        upstream: tuple[str, ...] = (),
        downstream: bool = False,
        resume_epoch: int = 0,
    ) -> tuple[Room, ListenerQueue]:
        """A new subscriber of the room, primed from the ring buffer.

        With `upstream` (origin first) this relay is an edge for the room: its chunks come from one
        pull to upstream[-1] instead of a local chunk timer. `downstream` marks another relay's pull.
        A ticket is admission's latest word on the room's tree: while the room's pull is failing, a
        new path in it replaces the old one, and a ticket naming no upstream makes this relay the
        room's origin. A pull that works is kept, whatever a ticket says.
        """
        self._refuse_if_draining()
        room = self._room(room_id)
        if not room.publishers and room_id not in self._timers:
            if upstream and not room.upstream:
                room.upstream = upstream
            elif upstream and upstream != room.upstream and not room.pull_ok:
                log.info("upstream replaced", room=room_id, was=room.upstream[-1], now=upstream[-1])
                self._stop_pull(room)
                room.upstream = upstream
            elif not upstream and room.upstream and not room.pull_ok:
                self._become_origin(room)
        # A downstream relay serves many listeners: it gets the whole ring's worth of queue.
        limit = self.settings.ring_chunks if downstream else 0
        subscriber = room.subscribe(resume_after, self._clock(), limit, resume_epoch)
        if downstream:
            room.downstream += 1
            metrics.PULLS_SERVED.inc()
        else:
            self.listeners += 1
            metrics.LISTENERS.inc()
        if room.upstream:
            self._start_pull(room, resume_after, resume_epoch)
        else:
            self._activate(room)
        return room, subscriber

    def lost(self) -> list[str]:
        """Rooms whose upstream this relay lost within lost_report_s and has not reached since (for the
        load report), at most MAX_LOST_ROOMS."""
        expired = self._clock() - self._lost_report_s
        for room_id in [room_id for room_id, at in self._lost.items() if at <= expired]:
            del self._lost[room_id]
        return list(self._lost)

    def origins(self) -> list[str]:
        """Rooms this relay is the origin of now: it emits their chunks (for the load report)."""
        return [room_id for room_id, room in self._rooms.items() if not room.upstream and room.active]

    def _become_origin(self, room: Room) -> None:
        """This relay was pulling the room and takes it over as its origin, in a new epoch."""
        log.info("edge room became origin", room=room.room_id, upstream=room.upstream[-1])
        self._stop_pull(room)
        self._lost.pop(room.room_id, None)
        room.upstream = ()
        room.begin_epoch(self._wall_us() // 1000)
        metrics.ORIGIN_TAKEOVERS.inc()

    def _stop_pull(self, room: Room) -> None:
        pull = self._pulls.pop(room.room_id, None)
        if pull is not None:
            pull.cancel()
        room.pull_ok = False
        room.pull_failing_since = None

    def subscribe_stage(self, room_id: str) -> tuple[Room, ListenerQueue]:
        """A stage subscriber (host, co-host, speaker): every frame as it arrives, at the origin."""
        self._refuse_if_draining()
        room = self._room(room_id)
        subscriber = room.subscribe_stage()
        self.listeners += 1
        metrics.LISTENERS.inc()
        self._activate(room)
        return room, subscriber

    def unsubscribe(self, room: Room, subscriber: ListenerQueue, downstream: bool = False) -> None:
        """A Subscribe or Pull stream ended (for whatever reason)."""
        room.unsubscribe(subscriber)
        if downstream:
            room.downstream -= 1
            metrics.PULLS_SERVED.dec()
        else:
            self.listeners -= 1
            metrics.LISTENERS.dec()
        if not room.active and room.room_id not in self._timers:
            room.idle_since = self._clock()

    def load(self) -> dict[str, int]:
        """Listener streams per room (relay pulls excluded), for the load report."""
        loads = {}
        for room_id, room in self._rooms.items():
            listeners = len(room.subscribers) - room.downstream + len(room.stage)
            if listeners > 0:
                loads[room_id] = listeners
        return loads

    async def start(self) -> None:
        """Starts the idle-room sweep."""
        self._sweeper = supervise(self._sweep(), "relay-sweep")

    def stop_publishing(self) -> None:
        """Refuses new streams and ends every Publish stream at its next frame (speakers move)."""
        self._draining = True

    def drain(self) -> None:
        """Ends every subscriber stream (their writers stop at once) and refuses new streams."""
        self._draining = True
        closed = 0
        for room in self._rooms.values():
            for subscriber in [*room.subscribers, *room.stage]:
                subscriber.close(DRAINING)
                closed += 1
        log.info("relay draining", rooms=len(self._rooms), subscribers=closed)

    async def close(self) -> None:
        """Stops the timers and the sweep."""
        tasks = [*self._timers.values(), *self._pulls.values(), *([self._sweeper] if self._sweeper else [])]
        await cancel(*tasks)
        self._timers.clear()
        self._pulls.clear()
        self._sweeper = None

    def _refuse_if_draining(self) -> None:
        if self._draining:
            raise Unavailable("relay is shutting down; reconnect to continue", reason=Reason.DRAINING)

    def _room(self, room_id: str) -> Room:
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = Room(room_id, self.settings)
            metrics.ROOMS.set(len(self._rooms))
            log.info("room opened", room=room_id)
        return room

    def _activate(self, room: Room) -> None:
        if room.epoch == 0:
            # A room new to this relay, which is its origin: its first epoch.
            room.begin_epoch(self._wall_us() // 1000)
        if room.room_id not in self._timers:
            task = spawn(self._tick(room), "relay-chunks")
            self._timers[room.room_id] = task

    def _start_pull(self, room: Room, resume_after: int, resume_epoch: int = 0) -> None:
        if room.room_id in self._pulls:
            return
        if self._upstreams is None:
            raise Unavailable("this relay cannot pull from upstream relays")
        task = spawn(self._pull(room, resume_after, resume_epoch), "relay-pull")
        self._pulls[room.room_id] = task

    async def _pull(self, room: Room, resume_after: int, resume_epoch: int) -> None:
        """Forwards the room's chunks from upstream as they come, reconnecting (with resume) on errors."""
        assert self._upstreams is not None
        backoff = 0.05
        loop = asyncio.get_running_loop()
        lost_s = self.upstream_lost_s
        # Heartbeats several times per upstream_lost_s: one late message is not a lost upstream.
        heartbeat_ms = max(1, round(1000 * lost_s / 4))
        try:
            for attempt in itertools.count():
                if attempt:
                    metrics.PULL_RECONNECTS.inc()
                    await asyncio.sleep(backoff)
                    # Short enough that a dead upstream is given up soon after upstream_lost_s.
                    backoff = min(1.0, self.upstream_lost_s / 4, backoff * 2)
                # After the first chunk, resume from the last one forwarded: no gap if still buffered.
                epoch, sequence = room.position if room.sequence else (resume_epoch, resume_after)
                path = room.upstream
                reason = ""
                opened_here = False
                stream = self._upstreams.pull(room.room_id, path, sequence, epoch, heartbeat_ms)
                # The upstream must open the pull within upstream_lost_s and, if it sends heartbeats,
                # send something every upstream_lost_s: a connection cut without a reset (packets
                # dropped) or a stuck upstream ends no call by itself. The call itself is cancelled:
                # a task awaiting a call that is still connecting is not woken by its own cancellation.
                silence = Silence(loop, lost_s, getattr(stream, "cancel", None))
                try:
                    # A real pull says it is open before any chunk (an idle room may send none).
                    opened = getattr(stream, "initial_metadata", None)
                    headers = None
                    if opened is not None:
                        headers = await opened()
                        # A call that failed to connect also "returns" its (empty) metadata.
                        if not stream.done():  # type: ignore[attr-defined]
                            opened_here = True
                            self._pull_opened(room)
                    # An upstream without heartbeats (an older relay) may be silent for long.
                    if not headers or HEARTBEAT_KEY not in headers:
                        silence.stop()
                    else:
                        silence.feed()  # heartbeats count from the opening
                    async for data in stream:
                        silence.feed()
                        if not data:
                            continue  # a heartbeat: the room is silent, the upstream alive
                        if not room.pull_ok:
                            self._pull_opened(room)
                        epoch, sequence = chunk_position(data)
                        emitted = room.forward(sequence, data, self._clock(), epoch)
                        self._observe(room, emitted, 0)
                        backoff = 0.05
                    log.info("pull ended by upstream", room=room.room_id, upstream=path[-1])
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # this pull is being stopped
                    if not silence.fired:
                        # The call was cancelled under it: its channel closed (another room's pull
                        # found the connection silent). It is dialled again.
                        log.info("pull cancelled with its channel", room=room.room_id, upstream=path[-1])
                        await self._pull_failed(room, "")
                        continue
                    reason = SILENT
                    metrics.PULLS_SILENT.inc()
                    log.warning(
                        "upstream silent",
                        room=room.room_id,
                        upstream=path[-1],
                        after_s=self.upstream_lost_s,
                        opened=opened_here,
                    )
                    if opened_here:
                        # Its connection went quiet (packets dropped without a reset): dial a new one.
                        # One still being set up is left to finish.
                        await self._upstreams.forget(path[-1])
                except grpc.aio.AioRpcError as exc:
                    reason = error_reason(exc)
                    log.warning(
                        "pull from upstream failed",
                        room=room.room_id,
                        upstream=path[-1],
                        code=exc.code().name,
                        details=exc.details(),
                        reason=reason,
                    )
                finally:
                    silence.stop()
                await self._pull_failed(room, reason)
        finally:
            if self._pulls.get(room.room_id) is asyncio.current_task():
                del self._pulls[room.room_id]

    def _pull_opened(self, room: Room) -> None:
        room.pull_ok = True
        room.pull_failing_since = None
        self._lost.pop(room.room_id, None)

    async def _pull_failed(self, room: Room, reason: str) -> None:
        """The pull ended; after upstream_lost_s of failures (or of silence, or with a draining upstream)
        listeners move."""
        now = self._clock()
        room.pull_ok = False
        if room.pull_failing_since is None:
            room.pull_failing_since = now
        if (
            reason in (Reason.DRAINING, Reason.UPSTREAM_LOST, SILENT)
            or now - room.pull_failing_since >= self.upstream_lost_s
        ):
            room.pull_failing_since = now
            await self._lose_upstream(room)

    async def _lose_upstream(self, room: Room) -> None:
        """Ends the room's streams here so its listeners (and relays below) join again on a live path,
        once admission has been told (the load report names the room) not to send them back here."""
        new = self._lost.pop(room.room_id, None) is None
        self._lost[room.room_id] = self._clock()
        if len(self._lost) > MAX_LOST_ROOMS:
            del self._lost[next(iter(self._lost))]
        if new and self.announce is not None:
            await self.announce()
        closed = 0
        for subscriber in list(room.subscribers):
            subscriber.close(UPSTREAM_LOST)
            closed += 1
        metrics.UPSTREAM_LOST.inc()
        log.warning("upstream lost", room=room.room_id, upstream=room.upstream[-1], streams=closed)

    async def _tick(self, room: Room) -> None:
        """Emits the room's chunk every chunk_s while it has publishers or subscribers."""
        loop = asyncio.get_running_loop()
        interval = self._interval(room)
        due = loop.time() + interval
        try:
            while True:
                await asyncio.sleep(max(0.0, due - loop.time()))
                now_us = self._wall_us()
                emitted = room.emit(self._clock(), now_us)
                if emitted is not None:
                    self._observe(room, emitted, now_us)
                if not room.active:
                    break
                interval = self._interval(room)
                due += interval
                late = loop.time() - due
                if late > 0:
                    # The loop was busy: skip the missed ticks instead of emitting a burst; the
                    # frames of the skipped intervals simply go into the next chunk.
                    due += math.ceil(late / interval) * interval
        finally:
            self._timers.pop(room.room_id, None)
            if not room.active:
                room.idle_since = self._clock()

    def _interval(self, room: Room) -> float:
        """The room's chunk interval: longer once enough relays pull it (when configured)."""
        if self._large_chunk_s and room.downstream >= self._large_downstream:
            return self._large_chunk_s
        return self._chunk_s

    def _observe(self, room: Room, emitted: Emitted, now_us: int) -> None:
        if emitted.frames:
            metrics.CHUNKS_EMITTED.inc()
            metrics.CHUNK_BYTES.observe(len(emitted.data))
        else:
            metrics.CHUNKS_PULLED.inc()
        if emitted.subscribers:
            metrics.CHUNKS_OUT.inc(emitted.subscribers)
        if emitted.dropped:
            metrics.CHUNKS_DROPPED.inc(emitted.dropped)
        for frame in emitted.frames:
            metrics.FRAME_DELAY.observe(max(0, now_us - frame.capture_ts_us) / 1e6)
        if emitted.cut:
            metrics.SUBSCRIBERS_CUT.inc(len(emitted.cut))
            for subscriber in emitted.cut:
                log.info("subscriber cut off", room=room.room_id, dropped=subscriber.dropped)

    async def _sweep(self) -> None:
        """Forgets rooms that have been idle for idle_s (their ring is kept until then for resumes)."""
        period = min(5.0, self._idle_s / 2)
        while True:
            await asyncio.sleep(period)
            self.sweep()

    def sweep(self) -> int:
        """Drops the rooms idle for longer than idle_s, ends lingering pulls; returns rooms dropped."""
        now = self._clock()
        for room_id, pull in list(self._pulls.items()):
            room = self._rooms[room_id]
            if (
                room.idle_since is not None
                and not room.active
                and now - room.idle_since >= self.pull_linger_s
            ):
                log.info("pull stopped", room=room_id, reason="no listeners")
                del self._pulls[room_id]
                pull.cancel()
        idle = [
            room_id
            for room_id, room in self._rooms.items()
            if room.idle_since is not None
            and not room.active
            and room_id not in self._timers
            and room_id not in self._pulls
            and now - room.idle_since >= self._idle_s
        ]
        for room_id in idle:
            del self._rooms[room_id]
            log.info("room closed", room=room_id, reason="idle")
        if idle:
            metrics.ROOMS.set(len(self._rooms))
        return len(idle)
