"""Pure fan-out logic: a room's chunker, its ring buffer and bounded subscriber queues (no I/O).

Time is always passed in (`now`: monotonic seconds, `now_us`: Unix microseconds), so the
logic is tested with an injected clock.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from townhall.v1.relay_pb2 import AudioFrame, Chunk

# What Subscriber.push reports; ints so the hot loop compares cheaply.
QUEUED = 0
DROPPED = 1
STUCK = 2


@dataclass(frozen=True)
class FanoutSettings:
    """The knobs of the fan-out, taken from RelayConfig."""

    subscriber_queue: int = 50
    stuck_cutoff_s: float = 10.0
    ring_chunks: int = 100
    late_join_s: float = 0.3


class Subscriber:
    """One listener's bounded queue of serialised chunks; on overflow its oldest chunk is dropped."""

    __slots__ = (
        "_cutoff_s",
        "_limit",
        "_loop",
        "_overflow_since",
        "_queue",
        "_replay",
        "_waiter",
        "dropped",
        "reason",
    )

    def __init__(self, limit: int, cutoff_s: float, replay: Iterable[bytes] = ()) -> None:
        self._limit = limit
        self._cutoff_s = cutoff_s
        self._queue: deque[bytes] = deque()
        # Buffered chunks for a late join or a resume are sent first and are not subject to the
        # queue limit: they were chosen for this listener, dropping them would make a gap.
        self._replay: deque[bytes] = deque(replay)
        self._overflow_since: float | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dropped = 0
        # Why the subscriber was closed (None while open); the stream ends with it.
        self.reason: str | None = None

    def push(self, data: bytes, now: float) -> int:
        """Queues one chunk: QUEUED, DROPPED (oldest dropped) or STUCK (overflowing too long)."""
        queue = self._queue
        result = QUEUED
        if len(queue) >= self._limit:
            queue.popleft()
            self.dropped += 1
            result = DROPPED
            if self._overflow_since is None:
                self._overflow_since = now
            elif now - self._overflow_since >= self._cutoff_s:
                result = STUCK
        queue.append(data)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        return result

    def take(self) -> bytes | None:
        """The next chunk to write, or None when the queue is empty."""
        if self._replay:
            return self._replay.popleft()
        queue = self._queue
        if not queue:
            return None
        data = queue.popleft()
        if not queue:
            # Caught up with live audio: a later overflow starts a new stuck period.
            self._overflow_since = None
        return data

    @property
    def queued(self) -> int:
        """Chunks waiting to be written."""
        return len(self._replay) + len(self._queue)

    def waiter(self) -> asyncio.Future[None] | None:
        """A future that resolves when a chunk is queued or the subscriber closes (None: ready now).

        A plain future rather than a coroutine: the writer awaits one per chunk, per listener.
        """
        if self._replay or self._queue or self.reason is not None:
            return None
        loop = self._loop
        if loop is None:
            # Cached: asking asyncio for the running loop costs a getpid() system call on 3.11.
            loop = self._loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        return waiter

    async def wait(self) -> None:
        """Returns once a chunk is queued or the subscriber is closed."""
        waiter = self.waiter()
        if waiter is not None:
            await waiter

    def close(self, reason: str) -> None:
        """Ends the subscription: the writer stops after it sees `reason`."""
        if self.reason is not None:
            return
        self.reason = reason
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Ring:
    """A room's most recent chunks, for late joiners and listeners that resume."""

    def __init__(self, size: int) -> None:
        # (sequence, emitted at in monotonic seconds, serialised chunk); sequences are contiguous.
        self._items: deque[tuple[int, float, bytes]] = deque(maxlen=size)

    def add(self, sequence: int, at: float, data: bytes) -> None:
        """Remembers a chunk, forgetting the oldest when full."""
        self._items.append((sequence, at, data))

    def __len__(self) -> int:
        return len(self._items)

    def replay(self, resume_after: int, now: float, late_join_s: float) -> list[bytes]:
        """The chunks a new subscriber gets first.

        resume_after=0: those emitted in the last `late_join_s`. N>0: those after N; if N is no
        longer buffered, all of them (the sequence jump shows the gap). N beyond the newest chunk
        (a client resuming from before a relay restart) is treated as a fresh join.
        """
        items = self._items
        if not items:
            return []
        last = items[-1][0]
        if resume_after == 0 or resume_after > last:
            since = now - late_join_s
            return [data for _, at, data in items if at >= since]
        # By sequence, not position: an edge's ring has gaps where its pull from upstream had them.
        return [data for sequence, _, data in items if sequence > resume_after]


def chunk_sequence(data: bytes) -> int:
    """A serialised Chunk's sequence, read from its first field without parsing the frames."""
    # Field 1 (varint) is written first; an edge reads it from every chunk it forwards.
    if data[:1] == b"\x08":
        result = shift = 0
        for byte in data[1:11]:
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7
    return Chunk.FromString(data).sequence


@dataclass
class Emitted:
    """What one chunk interval produced, for metrics."""

    sequence: int
    data: bytes
    frames: list[AudioFrame]
    subscribers: int
    dropped: int
    cut: list[Subscriber] = field(default_factory=list)


class Room:
    """One room on this relay: frames waiting for the next chunk, the ring and the subscribers."""

    def __init__(self, room_id: str, settings: FanoutSettings) -> None:
        self.room_id = room_id
        self.settings = settings
        self.sequence = 0
        self.ring = Ring(settings.ring_chunks)
        self.subscribers: set[Subscriber] = set()
        # On-stage subscribers get every frame as it arrives (conversation latency), not chunks.
        self.stage: set[Subscriber] = set()
        self.stage_sequence = 0
        # Relays above this one, origin first; empty when this relay is the room's origin.
        self.upstream: tuple[str, ...] = ()
        # How many of the subscribers are other relays pulling the room (not listeners).
        self.downstream = 0
        self.publishers = 0
        self._pending: list[AudioFrame] = []
        # Monotonic time since which the room has had no publishers and no subscribers.
        self.idle_since: float | None = None

    @property
    def active(self) -> bool:
        """Whether anyone publishes to or listens in this room."""
        return self.publishers > 0 or bool(self.subscribers) or bool(self.stage)

    @property
    def pending(self) -> int:
        """Frames waiting for the next chunk."""
        return len(self._pending)

    def add_frame(self, frame: AudioFrame, now: float = 0.0, now_us: int = 0) -> None:
        """Adds a validated frame (speaker_id already set) to the next chunk, and sends it to the stage."""
        self._pending.append(frame)
        if self.stage:
            self.stage_sequence += 1
            data = Chunk(
                sequence=self.stage_sequence, emitted_ts_us=now_us, frames=[frame]
            ).SerializeToString()
            cut = [subscriber for subscriber in self.stage if subscriber.push(data, now) == STUCK]
            for subscriber in cut:
                self.stage.discard(subscriber)
                subscriber.close("stuck")

    def emit(self, now: float, now_us: int) -> Emitted | None:
        """Builds the chunk of all waiting frames, serialises it once and queues it to everyone.

        Returns None when no frame arrived in the interval (nothing is sent).
        """
        if not self._pending:
            return None
        frames, self._pending = self._pending, []
        self.sequence += 1
        data = Chunk(sequence=self.sequence, emitted_ts_us=now_us, frames=frames).SerializeToString()
        return self._fan(self.sequence, data, frames, now)

    def forward(self, sequence: int, data: bytes, now: float) -> Emitted:
        """Queues a chunk pulled from upstream to everyone, as is (an edge never re-serialises)."""
        self.sequence = sequence
        return self._fan(sequence, data, [], now)

    def _fan(self, sequence: int, data: bytes, frames: list[AudioFrame], now: float) -> Emitted:
        self.ring.add(sequence, now, data)
        dropped = 0
        cut: list[Subscriber] = []
        for subscriber in self.subscribers:
            result = subscriber.push(data, now)
            if result:
                dropped += 1
                if result == STUCK:
                    cut.append(subscriber)
        for subscriber in cut:
            self.subscribers.discard(subscriber)
            subscriber.close("stuck")
        return Emitted(sequence, data, frames, len(self.subscribers) + len(cut), dropped, cut)

    def subscribe(self, resume_after: int, now: float, limit: int = 0) -> Subscriber:
        """A new subscriber, primed with the late-join or resume chunks from the ring."""
        settings = self.settings
        replay = self.ring.replay(resume_after, now, settings.late_join_s)
        subscriber = Subscriber(limit or settings.subscriber_queue, settings.stuck_cutoff_s, replay)
        self.subscribers.add(subscriber)
        self.idle_since = None
        return subscriber

    def subscribe_stage(self) -> Subscriber:
        """A stage subscriber: each frame as it arrives, no replay (the stage is live)."""
        subscriber = Subscriber(self.settings.subscriber_queue, self.settings.stuck_cutoff_s)
        self.stage.add(subscriber)
        self.idle_since = None
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Forgets a subscriber (its stream ended)."""
        self.subscribers.discard(subscriber)
        self.stage.discard(subscriber)
