"""Pure fan-out logic: a room's chunker, its ring buffer and bounded subscriber queues (no I/O).

Time is always passed in (`now`: monotonic seconds, `now_us`: Unix microseconds), so the
logic is tested with an injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from townhall.core.wire import read_varint, varint
from townhall.v1.relay_pb2 import AudioFrame, Chunk

# What ListenerQueue.push reports; ints so the hot loop compares cheaply.
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


class ListenerQueue:
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
        # (epoch, sequence, emitted at in monotonic seconds, serialised chunk), in arrival order.
        self._items: deque[tuple[int, int, float, bytes]] = deque(maxlen=size)

    def add(self, sequence: int, at: float, data: bytes, epoch: int = 0) -> None:
        """Remembers a chunk, forgetting the oldest when full."""
        self._items.append((epoch, sequence, at, data))

    def __len__(self) -> int:
        return len(self._items)

    def replay(self, resume_after: int, now: float, late_join_s: float, resume_epoch: int = 0) -> list[bytes]:
        """The chunks a new subscriber gets first.

        resume_after=0: those emitted in the last `late_join_s`. N>0: those after (epoch, N), where
        epoch 0 means the newest chunk's; if it is no longer buffered, all of them (the sequence
        jump shows the gap). After an origin change the ring holds a newer epoch: every chunk of it
        is after the listener's place, so a listener resuming from the old origin misses nothing
        still buffered. A place beyond the newest chunk (a client resuming from before a relay
        restart, or from an edge that was ahead) is treated as a fresh join.
        """
        items = self._items
        if not items:
            return []
        newest = (items[-1][0], items[-1][1])
        after = (resume_epoch or newest[0], resume_after)
        if resume_after == 0 or after > newest:
            since = now - late_join_s
            return [data for _, _, at, data in items if at >= since]
        # By place, not position: an edge's ring has gaps where its pull from upstream had them.
        return [data for epoch, sequence, _, data in items if (epoch, sequence) > after]


def encode_chunk(sequence: int, epoch: int, emitted_ts_us: int, frames: list[AudioFrame]) -> bytes:
    """A serialised Chunk with `sequence` then `epoch` first, so relays read both from the front.

    Protobuf parsers accept fields in any order; the concatenation is one valid Chunk.
    """
    head = b"\x08" + varint(sequence) + b"\x20" + varint(epoch)
    return head + Chunk(emitted_ts_us=emitted_ts_us, frames=frames).SerializeToString()


def chunk_position(data: bytes) -> tuple[int, int]:
    """A serialised Chunk's (epoch, sequence), read from its first two fields without the frames."""
    # The origin writes field 1 (sequence) then field 4 (epoch) first; an edge reads them from
    # every chunk it forwards. Anything else (an older origin) is parsed.
    if data[:1] == b"\x08":
        with contextlib.suppress(DecodeError):
            sequence, pos = read_varint(data, 1)
            if data[pos : pos + 1] == b"\x20":
                return read_varint(data, pos + 1)[0], sequence
    chunk = Chunk.FromString(data)
    return chunk.epoch, chunk.sequence


def chunk_sequence(data: bytes) -> int:
    """A serialised Chunk's sequence, read from its first field without parsing the frames."""
    if data[:1] == b"\x08":
        with contextlib.suppress(DecodeError):
            return read_varint(data, 1)[0]
    return Chunk.FromString(data).sequence


@dataclass
class Emitted:
    """What one chunk interval produced, for metrics."""

    sequence: int
    data: bytes
    frames: list[AudioFrame]
    subscribers: int
    dropped: int
    cut: list[ListenerQueue] = field(default_factory=list)


class Room:
    """One room on this relay: frames waiting for the next chunk, the ring and the subscribers."""

    def __init__(self, room_id: str, settings: FanoutSettings) -> None:
        self.room_id = room_id
        self.settings = settings
        # The room's place: (epoch, sequence) of the newest chunk (see relay.proto, Chunk).
        self.epoch = 0
        self.sequence = 0
        self.ring = Ring(settings.ring_chunks)
        self.subscribers: set[ListenerQueue] = set()
        # On-stage subscribers get every frame as it arrives (conversation latency), not chunks.
        self.stage: set[ListenerQueue] = set()
        self.stage_sequence = 0
        # Relays above this one, origin first; empty when this relay is the room's origin.
        self.upstream: tuple[str, ...] = ()
        # How many of the subscribers are other relays pulling the room (not listeners).
        self.downstream = 0
        # The pull from upstream (edges): open now, or failing since when (monotonic seconds).
        self.pull_ok = False
        self.pull_failing_since: float | None = None
        self.publishers = 0
        self._pending: list[AudioFrame] = []
        # Monotonic time since which the room has had no publishers and no subscribers.
        self.idle_since: float | None = None

    @property
    def active(self) -> bool:
        """Whether anyone publishes to or listens in this room."""
        return self.publishers > 0 or bool(self.subscribers) or bool(self.stage)

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, sequence) of the newest chunk: where a pull from upstream resumes."""
        return self.epoch, self.sequence

    def begin_epoch(self, now_ms: int) -> None:
        """This relay becomes the room's origin: a new epoch, later than any seen, from sequence 1."""
        self.epoch = max(now_ms, self.epoch + 1)
        self.sequence = 0

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
        data = encode_chunk(self.sequence, self.epoch, now_us, frames)
        return self._fan(self.sequence, data, frames, now)

    def forward(self, sequence: int, data: bytes, now: float, epoch: int = 0) -> Emitted:
        """Queues a chunk pulled from upstream to everyone, as is (an edge never re-serialises)."""
        self.sequence = sequence
        self.epoch = epoch
        return self._fan(sequence, data, [], now)

    def _fan(self, sequence: int, data: bytes, frames: list[AudioFrame], now: float) -> Emitted:
        self.ring.add(sequence, now, data, self.epoch)
        dropped = 0
        cut: list[ListenerQueue] = []
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

    def subscribe(
        self, resume_after: int, now: float, limit: int = 0, resume_epoch: int = 0
    ) -> ListenerQueue:
        """A new subscriber, primed with the late-join or resume chunks from the ring."""
        settings = self.settings
        replay = self.ring.replay(resume_after, now, settings.late_join_s, resume_epoch)
        subscriber = ListenerQueue(limit or settings.subscriber_queue, settings.stuck_cutoff_s, replay)
        self.subscribers.add(subscriber)
        self.idle_since = None
        return subscriber

    def subscribe_stage(self) -> ListenerQueue:
        """A stage subscriber: each frame as it arrives, no replay (the stage is live)."""
        subscriber = ListenerQueue(self.settings.subscriber_queue, self.settings.stuck_cutoff_s)
        self.stage.add(subscriber)
        self.idle_since = None
        return subscriber

    def unsubscribe(self, subscriber: ListenerQueue) -> None:
        """Forgets a subscriber (its stream ended)."""
        self.subscribers.discard(subscriber)
        self.stage.discard(subscriber)
