"""Audio streams that survive relay failures: a listener that resumes, a speaker that re-sends.

A relay can die, drain on SIGTERM, or lose its upstream. Both classes react the same way to
any of these: join the room again (admission places the user on a live relay, and names the
room's new origin when the old one is gone), reconnect there, and carry on from where they were.

- `Listener` resumes from its last chunk (epoch and sequence, see relay.proto): the relay's ring
  buffer sends what was missed, so an edge failure costs no audio, only the time to reconnect.
- `Speaker` keeps the frames it has captured but not yet published (up to `backlog_s`) and
  re-sends the last `resend_s` of frames after a move, since the dead relay may not have passed
  them on. A listener therefore drops frames it already has, by speaker and capture time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass, field

import grpc

from townhall.client import Client, now_us
from townhall.core.errors import sent_away as sent_away_by
from townhall.core.tasks import cancel
from townhall.v1.admission_pb2 import Grant
from townhall.v1.common_pb2 import Role
from townhall.v1.relay_pb2 import AudioFrame, Chunk, PublishSummary

# A stream that ends with one of these cannot be fixed by joining again.
FATAL = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
)
STAGE = (Role.ROLE_HOST, Role.ROLE_COHOST, Role.ROLE_SPEAKER)


@dataclass
class Move:
    """One interruption: the stream broke (or was ended by the relay) and was re-established."""

    broke_at: float  # monotonic seconds
    reason: str  # the status code that ended the stream, or "ended"
    relay_before: str
    resumed_at: float = 0.0  # when the first chunk (listener) or frame (speaker) went through again
    relay_after: str = ""

    @property
    def seconds(self) -> float:
        """How long the interruption lasted (0 while it lasts)."""
        return max(0.0, self.resumed_at - self.broke_at) if self.resumed_at else 0.0


@dataclass
class _Heard:
    """Per speaker: the newest frame delivered (sequence, capture time)."""

    last: dict[int, tuple[int, int]] = field(default_factory=dict)

    def fresh(self, frame: AudioFrame) -> bool:
        last = self.last.get(frame.speaker_id)
        if last is not None and frame.sequence <= last[0] and frame.capture_ts_us <= last[1]:
            return False  # sent again by a speaker that moved: already heard
        self.last[frame.speaker_id] = (frame.sequence, frame.capture_ts_us)
        return True


def _jitter(seconds: float) -> float:
    return seconds * random.uniform(0.5, 1.0)


class Listener:
    """A room's audio for one user, moving to another relay (and resuming) whenever a stream ends."""

    def __init__(self, client: Client, room_id: str, give_up_after_s: float = 30.0) -> None:
        self._client = client
        self.room_id = room_id
        self._give_up_after_s = give_up_after_s
        self.relay = ""
        # (epoch, sequence) of the last chunk delivered: where the next stream resumes.
        self.position = (0, 0)
        self.moves: list[Move] = []
        self.epochs: list[int] = []
        self.duplicates = 0  # chunks or frames received twice (after a resume or a speaker move)
        self._heard = _Heard()

    async def chunks(self) -> AsyncGenerator[Chunk, None]:
        """The room's chunks in order, each once, without frames already heard; ends only by error."""
        move: Move | None = None
        delay = 0.05
        while True:
            grant = await self._client.join(self.room_id, self._give_up_after_s)
            stage = grant.role in STAGE
            if move is not None and not move.relay_after:
                move.relay_after = grant.relay_address
            self.relay = grant.relay_address
            epoch, sequence = self.position
            # The stage gets live frames with a sequence of its own: nothing to resume.
            call = self._client.subscribe(
                grant, self.room_id, resume_after=0 if stage else sequence, resume_epoch=0 if stage else epoch
            )
            reason, sent_away = "ended", False
            try:
                async for chunk in call:
                    if move is not None:
                        move.resumed_at = time.monotonic()
                        move.relay_after = grant.relay_address
                        move, delay = None, 0.05
                    out = self._take(chunk, stage)
                    if out is not None:
                        yield out
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL:
                    raise
                reason, sent_away = exc.code().name, sent_away_by(exc)
            finally:
                call.cancel()
            if move is None:
                move = Move(time.monotonic(), reason, grant.relay_address)
                self.moves.append(move)
            elif time.monotonic() - move.broke_at > self._give_up_after_s:
                raise TimeoutError(f"no relay carried room {self.room_id} for {self._give_up_after_s:.0f} s")
            # Sent away on purpose (draining, upstream lost): join again at once; else back off a
            # little, while admission notices that the relay is gone.
            await asyncio.sleep(_jitter(0.05 if sent_away else delay))
            delay = min(1.0, delay * 2)

    def _take(self, chunk: Chunk, stage: bool) -> Chunk | None:
        if not stage:
            epoch, sequence = self.position
            if chunk.epoch == epoch and chunk.sequence <= sequence:
                self.duplicates += 1  # resumed from a relay that had already sent it
                return None
            if chunk.epoch != epoch:
                # A new origin (relays only send an older epoch's chunks before a newer one's).
                self.epochs.append(chunk.epoch)
            self.position = (chunk.epoch, chunk.sequence)
        frames = [frame for frame in chunk.frames if self._heard.fresh(frame)]
        if len(frames) == len(chunk.frames):
            return chunk
        self.duplicates += len(chunk.frames) - len(frames)
        kept = Chunk(sequence=chunk.sequence, emitted_ts_us=chunk.emitted_ts_us, epoch=chunk.epoch)
        kept.frames.extend(frames)
        return kept


class Speaker:
    """Publishes frames at real-time pace into a room, re-joining and re-sending when a stream ends."""

    def __init__(
        self,
        client: Client,
        room_id: str,
        frame_ms: int = 20,
        backlog_s: float = 3.0,
        resend_s: float = 0.3,
        give_up_after_s: float = 30.0,
    ) -> None:
        self._client = client
        self.room_id = room_id
        self._frame_s = frame_ms / 1000
        self._backlog = max(1, int(backlog_s / self._frame_s))
        self._resend_s = resend_s
        self._give_up_after_s = give_up_after_s
        self.relay = ""
        self.captured = 0
        self.sent = 0  # frames written to a stream (re-sent ones count again)
        self.lost = 0  # captured frames dropped because no relay took them within backlog_s
        self.accepted = 0  # frames the relays acknowledged in their summaries
        self.moves: list[Move] = []
        self._pending: deque[AudioFrame] = deque()
        self._recent: deque[tuple[float, AudioFrame]] = deque()
        self._wake = asyncio.Event()
        self._captured_all = False
        self._sent_away = False
        self._move: Move | None = None

    async def speak(self, payloads: Iterable[bytes], first_sequence: int = 0) -> int:
        """Speaks every payload (one frame each); returns how many frames were captured."""
        capturing = asyncio.create_task(self._capture(payloads, first_sequence), name="speaker-capture")
        delay = 0.05
        try:
            while True:
                grant = await self._client.join(self.room_id, self._give_up_after_s)
                reason = await self._publish(grant)
                if reason is None:
                    return self.captured
                now = time.monotonic()
                if self._move is None:
                    delay = 0.05
                    self._move = Move(now, reason, grant.relay_address)
                    self.moves.append(self._move)
                elif now - self._move.broke_at > self._give_up_after_s:
                    raise TimeoutError(f"no relay took room {self.room_id} for {self._give_up_after_s:.0f} s")
                # What went out just before the break may have died with the relay: send it again.
                again = [frame for at, frame in self._recent if at >= now - self._resend_s]
                self._recent.clear()
                self._pending.extendleft(reversed(again))
                await asyncio.sleep(_jitter(0.05 if self._sent_away else delay))
                delay = min(1.0, delay * 2)
        finally:
            await cancel(capturing)

    async def _publish(self, grant: Grant) -> str | None:
        """One Publish stream; None once every frame went out, else why the stream ended."""
        self.relay = grant.relay_address
        stub, metadata = self._client.relay(grant)
        call = stub.Publish(self._frames(), metadata=metadata)
        try:
            await call.initial_metadata()
            if self._move is not None and not call.done():
                # The relay takes frames again: the move is over.
                self._move.resumed_at, self._move.relay_after = time.monotonic(), grant.relay_address
                self._move = None
            summary: PublishSummary = await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() in FATAL:
                raise
            self._sent_away = sent_away_by(exc)
            return exc.code().name
        self.accepted += summary.frames_accepted
        return None if self._captured_all and not self._pending else "ended"

    async def _frames(self) -> AsyncIterator[AudioFrame]:
        while True:
            while self._pending:
                frame = self._pending.popleft()
                now = time.monotonic()
                self._recent.append((now, frame))
                while self._recent and self._recent[0][0] < now - self._resend_s:
                    self._recent.popleft()
                self.sent += 1
                yield frame
            if self._captured_all:
                return
            self._wake.clear()
            await self._wake.wait()

    async def _capture(self, payloads: Iterable[bytes], first_sequence: int) -> None:
        start = time.monotonic()
        for index, payload in enumerate(payloads):
            # Paced against the start time, so scheduling hiccups do not accumulate as drift.
            delay = start + index * self._frame_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sequence = (first_sequence + index) % 2**32
            self._pending.append(AudioFrame(sequence=sequence, capture_ts_us=now_us(), payload=payload))
            self.captured += 1
            while len(self._pending) > self._backlog:
                self._pending.popleft()
                self.lost += 1
            self._wake.set()
        self._captured_all = True
        self._wake.set()
