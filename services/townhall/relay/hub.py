"""The rooms of one relay process: creation on first use, one chunk timer per active room, idle sweep."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable

from townhall.core import logging
from townhall.core.errors import Unavailable
from townhall.relay import metrics
from townhall.relay.fanout import Emitted, FanoutSettings, Room, Subscriber

log = logging.get(__name__)

# Reasons a subscriber is closed by the relay (Subscriber.reason).
STUCK = "stuck"
DRAINING = "draining"


def wall_us() -> int:
    """Unix microseconds, the unit of capture and emission timestamps."""
    return time.time_ns() // 1_000


class Hub:
    """All rooms of this relay, their chunk timers and the sweep that forgets idle rooms."""

    def __init__(
        self,
        settings: FanoutSettings,
        chunk_s: float,
        idle_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_us: Callable[[], int] = wall_us,
    ) -> None:
        self.settings = settings
        self._chunk_s = chunk_s
        self._idle_s = idle_s
        self._clock = clock
        self._wall_us = wall_clock_us
        self._rooms: dict[str, Room] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._draining = False

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
        room.publishers += 1
        room.idle_since = None
        metrics.PUBLISHERS.inc()
        self._activate(room)
        return room

    def leave_publisher(self, room: Room) -> None:
        """A Publish stream ended; the timer flushes its last frames and stops if nobody is left."""
        room.publishers -= 1
        metrics.PUBLISHERS.dec()

    def subscribe(self, room_id: str, resume_after: int) -> tuple[Room, Subscriber]:
        """A new subscriber of the room, primed from the ring buffer."""
        self._refuse_if_draining()
        room = self._room(room_id)
        subscriber = room.subscribe(resume_after, self._clock())
        metrics.LISTENERS.inc()
        self._activate(room)
        return room, subscriber

    def unsubscribe(self, room: Room, subscriber: Subscriber) -> None:
        """A Subscribe stream ended (for whatever reason)."""
        room.unsubscribe(subscriber)
        metrics.LISTENERS.dec()

    async def start(self) -> None:
        """Starts the idle-room sweep."""
        self._sweeper = asyncio.create_task(self._sweep(), name="relay-sweep")

    def drain(self) -> None:
        """Ends every subscriber stream (their writers stop at once) and refuses new streams."""
        self._draining = True
        closed = 0
        for room in self._rooms.values():
            for subscriber in list(room.subscribers):
                subscriber.close(DRAINING)
                closed += 1
        log.info("relay draining", rooms=len(self._rooms), subscribers=closed)

    async def close(self) -> None:
        """Stops the timers and the sweep."""
        tasks = [*self._timers.values(), *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._timers.clear()
        self._sweeper = None

    def _refuse_if_draining(self) -> None:
        if self._draining:
            raise Unavailable("relay is shutting down; reconnect to continue")

    def _room(self, room_id: str) -> Room:
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = Room(room_id, self.settings)
            metrics.ROOMS.set(len(self._rooms))
            log.info("room opened", room=room_id)
        return room

    def _activate(self, room: Room) -> None:
        if room.room_id not in self._timers:
            task = asyncio.create_task(self._tick(room), name=f"relay-chunks-{room.room_id}")
            self._timers[room.room_id] = task

    async def _tick(self, room: Room) -> None:
        """Emits the room's chunk every chunk_s while it has publishers or subscribers."""
        loop = asyncio.get_running_loop()
        interval = self._chunk_s
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

    def _observe(self, room: Room, emitted: Emitted, now_us: int) -> None:
        metrics.CHUNKS_EMITTED.inc()
        metrics.CHUNK_BYTES.observe(len(emitted.data))
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
        """Drops the rooms idle for longer than idle_s; returns how many."""
        now = self._clock()
        idle = [
            room_id
            for room_id, room in self._rooms.items()
            if room.idle_since is not None
            and not room.active
            and room_id not in self._timers
            and now - room.idle_since >= self._idle_s
        ]
        for room_id in idle:
            del self._rooms[room_id]
            log.info("room closed", room=room_id, reason="idle")
        if idle:
            metrics.ROOMS.set(len(self._rooms))
        return len(idle)
