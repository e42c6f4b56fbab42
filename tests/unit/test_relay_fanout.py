"""Relay fan-out logic without a network: chunking, drop-oldest, ring buffer, stuck cut-off, idle rooms."""

from __future__ import annotations

import asyncio

from townhall.relay.fanout import DROPPED, QUEUED, STUCK, FanoutSettings, ListenerQueue, Ring, Room
from townhall.relay.hub import RelayRooms
from townhall.v1.relay_pb2 import AudioFrame, Chunk


def frame(speaker: int, sequence: int, capture_ts_us: int = 1_000_000) -> AudioFrame:
    return AudioFrame(
        speaker_id=speaker, sequence=sequence, capture_ts_us=capture_ts_us, payload=b"\x01" * 60
    )


def sequences(subscriber: ListenerQueue) -> list[int]:
    """Drains a subscriber and returns the chunk sequence numbers it would have written."""
    out = []
    while (data := subscriber.take()) is not None:
        out.append(Chunk.FromString(data).sequence)
    return out


def test_frames_of_several_speakers_form_one_chunk_in_arrival_order() -> None:
    room = Room("r", FanoutSettings())
    listener = room.subscribe(0, now=0.0)
    for seq in range(5):
        room.add_frame(frame(7, seq))
        room.add_frame(frame(9, seq))

    emitted = room.emit(now=0.1, now_us=123)

    assert emitted is not None
    chunk = Chunk.FromString(emitted.data)
    assert chunk.sequence == 1
    assert chunk.emitted_ts_us == 123
    assert [(f.speaker_id, f.sequence) for f in chunk.frames] == [(s, q) for q in range(5) for s in (7, 9)]
    assert listener.take() is emitted.data


def test_an_interval_without_frames_emits_nothing_and_sequences_stay_contiguous() -> None:
    room = Room("r", FanoutSettings())
    listener = room.subscribe(0, now=0.0)
    room.add_frame(frame(1, 0))
    assert room.emit(0.1, 1) is not None
    assert room.emit(0.2, 2) is None
    room.add_frame(frame(1, 1))
    assert room.emit(0.3, 3) is not None
    assert sequences(listener) == [1, 2]


def test_every_subscriber_gets_the_same_bytes_object() -> None:
    room = Room("r", FanoutSettings())
    listeners = [room.subscribe(0, now=0.0) for _ in range(3)]
    room.add_frame(frame(1, 0))
    emitted = room.emit(0.1, 1)
    assert emitted is not None
    assert all(listener.take() is emitted.data for listener in listeners)


def test_overflow_drops_the_oldest_chunk_and_the_listener_sees_the_jump() -> None:
    subscriber = ListenerQueue(limit=3, cutoff_s=10.0)
    results = [subscriber.push(Chunk(sequence=s).SerializeToString(), now=s * 0.1) for s in range(1, 6)]
    assert results == [QUEUED, QUEUED, QUEUED, DROPPED, DROPPED]
    assert subscriber.dropped == 2
    assert sequences(subscriber) == [3, 4, 5]


def test_a_slow_subscriber_does_not_affect_the_others() -> None:
    room = Room("r", FanoutSettings(subscriber_queue=2, stuck_cutoff_s=100.0))
    slow = room.subscribe(0, now=0.0)
    fast = room.subscribe(0, now=0.0)
    got = []
    for seq in range(10):
        room.add_frame(frame(1, seq))
        emitted = room.emit(now=seq * 0.1, now_us=seq)
        assert emitted is not None
        assert emitted.dropped == (1 if seq >= 2 else 0)
        got += sequences(fast)
    assert got == list(range(1, 11))
    assert sequences(slow) == [9, 10]


def test_a_subscriber_overflowing_for_the_cutoff_is_cut_and_leaves_the_room() -> None:
    room = Room("r", FanoutSettings(subscriber_queue=2, stuck_cutoff_s=1.0))
    stuck = room.subscribe(0, now=0.0)
    healthy = room.subscribe(0, now=0.0)
    cut_at = None
    for step in range(30):
        now = step * 0.1
        room.add_frame(frame(1, step))
        emitted = room.emit(now, step)
        assert emitted is not None
        sequences(healthy)
        if emitted.cut:
            assert emitted.cut == [stuck]
            cut_at = now
            break
    # First drop at t=0.2 (third chunk), so the cut comes a cut-off later.
    assert cut_at is not None and abs(cut_at - 1.2) < 1e-9
    assert stuck.reason == "stuck"
    assert room.subscribers == {healthy}


def test_catching_up_resets_the_stuck_clock() -> None:
    subscriber = ListenerQueue(limit=1, cutoff_s=1.0)
    subscriber.push(b"a", now=0.0)
    assert subscriber.push(b"b", now=0.5) == DROPPED  # overflowing since 0.5
    assert subscriber.take() == b"b"  # caught up: queue empty
    subscriber.push(b"c", now=1.4)
    assert subscriber.push(b"d", now=1.6) == DROPPED  # a new overflow period starts at 1.6
    assert subscriber.push(b"e", now=2.5) == DROPPED
    assert subscriber.push(b"f", now=2.6) == STUCK


def _ring_with_chunks(count: int, size: int = 100) -> Ring:
    ring = Ring(size)
    for seq in range(1, count + 1):
        ring.add(seq, at=seq * 0.1, data=Chunk(sequence=seq).SerializeToString())
    return ring


def _seqs(chunks: list[bytes]) -> list[int]:
    return [Chunk.FromString(c).sequence for c in chunks]


def test_late_joiner_gets_the_last_late_join_window_at_once() -> None:
    ring = _ring_with_chunks(20)
    # Chunks at 1.8, 1.9 and 2.0 lie within the last 0.25 s.
    assert _seqs(ring.replay(0, now=2.0, late_join_s=0.25)) == [18, 19, 20]
    assert ring.replay(0, now=100.0, late_join_s=0.3) == []


def test_resume_gets_every_chunk_after_the_last_one_received() -> None:
    ring = _ring_with_chunks(20)
    assert _seqs(ring.replay(15, now=2.0, late_join_s=0.3)) == [16, 17, 18, 19, 20]
    assert ring.replay(20, now=2.0, late_join_s=0.3) == []


def test_resume_from_a_forgotten_chunk_starts_at_the_oldest_buffered() -> None:
    ring = _ring_with_chunks(20, size=5)
    assert _seqs(ring.replay(3, now=2.0, late_join_s=0.3)) == [16, 17, 18, 19, 20]


def test_resume_beyond_the_newest_chunk_is_a_fresh_join() -> None:
    ring = _ring_with_chunks(20)
    assert _seqs(ring.replay(500, now=2.0, late_join_s=0.25)) == [18, 19, 20]


def test_replayed_chunks_come_first_and_are_not_dropped_by_the_queue_limit() -> None:
    room = Room("r", FanoutSettings(subscriber_queue=2, ring_chunks=10))
    for seq in range(6):
        room.add_frame(frame(1, seq))
        room.emit(now=seq * 0.1, now_us=seq)
    resumed = room.subscribe(1, now=0.6)
    room.add_frame(frame(1, 6))
    room.emit(now=0.7, now_us=7)
    assert sequences(resumed) == [2, 3, 4, 5, 6, 7]


async def test_a_waiting_writer_wakes_on_a_chunk_and_on_close() -> None:
    subscriber = ListenerQueue(limit=2, cutoff_s=1.0)
    waiting = asyncio.ensure_future(subscriber.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    subscriber.push(b"x", now=0.0)
    await asyncio.wait_for(waiting, 1)
    assert subscriber.take() == b"x"

    waiting = asyncio.ensure_future(subscriber.wait())
    await asyncio.sleep(0)
    subscriber.close("draining")
    await asyncio.wait_for(waiting, 1)
    assert subscriber.reason == "draining"


async def test_hub_emits_on_its_timer_and_forgets_idle_rooms() -> None:
    clock = [0.0]
    hub = RelayRooms(FanoutSettings(), chunk_s=0.02, idle_s=60.0, clock=lambda: clock[0])
    room = hub.join_publisher("r")
    _, listener = hub.subscribe("r", 0)
    room.add_frame(frame(1, 0))
    await asyncio.wait_for(listener.wait(), 1)
    assert sequences(listener) == [1]

    hub.unsubscribe(room, listener)
    hub.leave_publisher(room)
    for _ in range(50):  # the timer stops within a tick once nobody is left
        if room.idle_since is not None:
            break
        await asyncio.sleep(0.02)
    assert room.idle_since == 0.0
    clock[0] = 59.0
    assert hub.sweep() == 0  # a reconnecting listener can still resume
    clock[0] = 61.0
    assert hub.sweep() == 1
    assert hub.room("r") is None
    await hub.close()
