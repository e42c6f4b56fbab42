"""Edge-side pure logic: forwarding origin bytes, rings with gaps, stage frames, ticket paths (no network)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from townhall.core.config import parse_ticket_keys
from townhall.core.tickets import TicketSigner, TicketVerifier
from townhall.relay.fanout import FanoutSettings, Ring, Room, chunk_position, chunk_sequence, encode_chunk
from townhall.relay.hub import HEARTBEAT_KEY, UPSTREAM_LOST, RelayRooms
from townhall.v1.common_pb2 import Role
from townhall.v1.relay_pb2 import AudioFrame, Chunk
from townhall_tools.bench.listener_generator import first_capture_us


def chunk(sequence: int, *captures: int) -> bytes:
    frames = [
        AudioFrame(speaker_id=7, sequence=i, capture_ts_us=c, payload=b"x") for i, c in enumerate(captures)
    ]
    return Chunk(sequence=sequence, emitted_ts_us=1, frames=frames).SerializeToString()


def test_the_sequence_is_read_from_the_bytes_without_parsing_the_frames() -> None:
    for sequence in (1, 127, 128, 300, 2**40 + 5):
        assert chunk_sequence(chunk(sequence, 10, 20)) == sequence


def test_the_oldest_capture_time_is_read_from_the_bytes() -> None:
    assert first_capture_us(chunk(9, 1_700_000_000_000_000, 1_700_000_000_020_000)) == 1_700_000_000_000_000
    assert first_capture_us(chunk(9)) == 0


def test_an_edge_forwards_the_origins_bytes_and_resumes_by_sequence_across_gaps() -> None:
    room = Room("r", FanoutSettings(ring_chunks=10))
    listener = room.subscribe(0, now=0.0)
    sent = {seq: chunk(seq, seq * 100) for seq in (5, 6, 8, 9)}  # 7 never reached this edge
    for seq, data in sent.items():
        room.forward(seq, data, now=float(seq))
    got = [listener.take() for _ in range(4)]
    assert got == list(sent.values())  # the same bytes, not re-serialised
    assert room.sequence == 9
    resumed = room.subscribe(6, now=9.0)
    assert [chunk_sequence(d) for d in iter(resumed.take, None)] == [8, 9]


def test_the_stage_gets_each_frame_at_once_and_the_audience_gets_chunks() -> None:
    room = Room("r", FanoutSettings())
    stage = room.subscribe_stage()
    audience = room.subscribe(0, now=0.0)
    for seq in range(3):
        room.add_frame(AudioFrame(speaker_id=1, sequence=seq, capture_ts_us=seq, payload=b"a"), 0.0, 1)
        assert stage.queued == seq + 1 and audience.queued == 0
    room.emit(0.1, 2)
    stage_chunks = [Chunk.FromString(d) for d in iter(stage.take, None)]
    assert [(c.sequence, len(c.frames)) for c in stage_chunks] == [(1, 1), (2, 1), (3, 1)]
    only = Chunk.FromString(audience.take() or b"")
    assert [f.sequence for f in only.frames] == [0, 1, 2]


def test_a_listener_ticket_carries_its_path() -> None:
    signer = TicketSigner("unit", b"\x05" * 32, 60)
    relay = TicketVerifier(parse_ticket_keys("tickets.public_keys", (signer.public_key(),), False))
    ticket = signer.issue("r", 5, Role.ROLE_LISTENER, "edge:1", upstream=("origin:1", "mid:1"))
    assert relay.verify(signer.sign(ticket), "edge:1").upstream == ("origin:1", "mid:1")


def test_an_origins_chunk_carries_its_epoch_where_an_edge_reads_it() -> None:
    data = encode_chunk(300, 1_700_000_000_123, 5, [AudioFrame(speaker_id=1, sequence=2, payload=b"a")])
    parsed = Chunk.FromString(data)
    assert (parsed.sequence, parsed.epoch, parsed.emitted_ts_us, len(parsed.frames)) == (
        300,
        1_700_000_000_123,
        5,
        1,
    )
    assert chunk_position(data) == (1_700_000_000_123, 300)
    assert chunk_sequence(data) == 300
    # A chunk serialised the plain way (epoch last) is parsed.
    plain = Chunk(sequence=4, epoch=9, frames=[AudioFrame(payload=b"b")]).SerializeToString()
    assert chunk_position(plain) == (9, 4)


def test_a_listener_resuming_from_the_old_origin_gets_everything_of_the_new_epoch() -> None:
    ring = Ring(20)
    for seq in range(1, 6):
        ring.add(seq, float(seq), b"old-%d" % seq, epoch=100)
    for seq in range(1, 4):
        ring.add(seq, 10.0 + seq, b"new-%d" % seq, epoch=200)
    assert ring.replay(3, now=14.0, late_join_s=0.3, resume_epoch=100) == [
        b"old-4",
        b"old-5",
        b"new-1",
        b"new-2",
        b"new-3",
    ]
    assert ring.replay(1, now=14.0, late_join_s=0.3, resume_epoch=200) == [b"new-2", b"new-3"]
    # Epoch 0 is "this relay's": sequence numbers of the newest epoch.
    assert ring.replay(2, now=14.0, late_join_s=0.3) == [b"new-3"]
    # Ahead of everything here (the listener came from an edge that was further on): a fresh join.
    assert ring.replay(9, now=14.0, late_join_s=1.5, resume_epoch=200) == [b"new-3"]


def test_a_room_taken_over_by_a_new_origin_starts_a_later_epoch_at_sequence_one() -> None:
    room = Room("r", FanoutSettings())
    listener = room.subscribe(0, now=0.0)
    room.forward(41, encode_chunk(41, 500, 1, []), now=1.0, epoch=500)
    assert room.position == (500, 41)
    room.begin_epoch(now_ms=400)  # the clock says earlier: the epoch still grows
    room.add_frame(AudioFrame(speaker_id=1, sequence=0, payload=b"a"))
    room.emit(2.0, 2)
    assert room.position == (501, 1)
    assert [chunk_position(d) for d in iter(listener.take, None)] == [(500, 41), (501, 1)]


class Upstreams:
    """A fake PullSource: each relay address either serves a fixed list of chunks or refuses."""

    def __init__(self, serving: dict[str, list[bytes]]) -> None:
        self.serving = serving
        self.pulls: list[tuple[str, int, int]] = []

    def pull(
        self,
        room_id: str,
        path: tuple[str, ...],
        resume_after: int,
        resume_epoch: int = 0,
        heartbeat_ms: int = 0,
    ) -> AsyncIterator[bytes]:
        self.pulls.append((path[-1], resume_epoch, resume_after))
        return self._stream(path[-1])

    async def forget(self, address: str) -> None:
        pass

    async def _stream(self, address: str) -> AsyncIterator[bytes]:
        if address not in self.serving:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
        for data in self.serving[address]:
            yield data
        await asyncio.Event().wait()  # then open and silent


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


async def test_an_edge_whose_upstream_is_gone_sends_its_listeners_to_join_again() -> None:
    upstreams = Upstreams({})
    hub = RelayRooms(FanoutSettings(), chunk_s=0.02, upstreams=upstreams, upstream_lost_s=0.1)
    _, listener = hub.subscribe("r", 0, upstream=("dead:1",))
    await until(lambda: listener.reason is not None)
    assert listener.reason == UPSTREAM_LOST
    await hub.close()


class HeartbeatCall:
    """A fake pull call that opens with the heartbeat header, beats `beats` times, then goes silent."""

    def __init__(self, beats: int) -> None:
        self.beats = beats
        self.cancelled = False
        self._cancel = asyncio.Event()

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata((HEARTBEAT_KEY, "25"))

    def done(self) -> bool:
        return self.cancelled

    def cancel(self) -> bool:
        self.cancelled = True
        self._cancel.set()
        return True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield encode_chunk(1, 900, 1, [])
        for _ in range(self.beats):
            await asyncio.sleep(0.025)
            yield b""
        # Silent; a gRPC call cancelled locally raises CancelledError in its reader.
        await self._cancel.wait()
        raise asyncio.CancelledError


class HeartbeatUpstreams(Upstreams):
    def __init__(self, beats: int) -> None:
        super().__init__({})
        self.calls: list[HeartbeatCall] = []
        self.forgotten: list[str] = []

    def pull(self, room_id: str, path: tuple[str, ...], *args: int, **kwargs: int) -> AsyncIterator[bytes]:
        self.pulls.append((path[-1], 0, 0))
        call = HeartbeatCall(12 if not self.calls else 0)
        self.calls.append(call)
        return call  # type: ignore[return-value]

    async def forget(self, address: str) -> None:
        self.forgotten.append(address)


async def test_an_edge_gives_up_a_pull_that_stops_beating_and_dials_again() -> None:
    upstreams = HeartbeatUpstreams(beats=12)
    hub = RelayRooms(FanoutSettings(), chunk_s=0.02, upstreams=upstreams, upstream_lost_s=0.1)
    room, listener = hub.subscribe("r", 0, upstream=("cut:1",))
    await asyncio.sleep(0.25)  # heartbeats only, 2.5 times upstream_lost_s: the pull is alive
    assert room.pull_ok and listener.reason is None and len(upstreams.calls) == 1
    await until(lambda: listener.reason is not None)
    assert listener.reason == UPSTREAM_LOST
    assert upstreams.calls[0].cancelled and upstreams.forgotten[:1] == ["cut:1"]
    await hub.close()


async def test_a_new_path_replaces_a_failing_upstream_and_resumes_from_the_rooms_place() -> None:
    upstreams = Upstreams({"live:1": [encode_chunk(1, 900, 1, [])]})
    hub = RelayRooms(FanoutSettings(), chunk_s=0.02, upstreams=upstreams, upstream_lost_s=5.0)
    room, first = hub.subscribe("r", 7, upstream=("dead:1",), resume_epoch=800)
    await until(lambda: len(upstreams.pulls) >= 2)  # failing, retrying
    hub.subscribe("r", 7, upstream=("live:1",), resume_epoch=800)
    await until(lambda: room.position == (900, 1))
    assert ("live:1", 800, 7) in upstreams.pulls
    assert chunk_position(first.take() or b"") == (900, 1)
    # A working pull is kept whatever a later ticket says.
    hub.subscribe("r", 0, upstream=("other:1",))
    await asyncio.sleep(0.05)
    assert room.upstream == ("live:1",) and all(p[0] != "other:1" for p in upstreams.pulls)
    await hub.close()


async def test_a_ticket_naming_no_upstream_makes_a_failing_edge_the_origin_in_a_new_epoch() -> None:
    upstreams = Upstreams({})
    hub = RelayRooms(FanoutSettings(), chunk_s=0.02, upstreams=upstreams, upstream_lost_s=5.0)
    room, _ = hub.subscribe("r", 0, upstream=("dead:1",))
    room.forward(12, encode_chunk(12, 1000, 1, []), now=0.0, epoch=1000)
    await until(lambda: len(upstreams.pulls) >= 2)
    _, listener = hub.subscribe("r", 12, resume_epoch=1000)
    assert room.upstream == () and room.epoch > 1000
    publisher = hub.join_publisher("r")
    publisher.add_frame(AudioFrame(speaker_id=1, sequence=0, payload=b"a"))
    await until(lambda: listener.queued > 0)
    assert chunk_position(listener.take() or b"") == (room.epoch, 1)
    assert hub.origins() == ["r"]
    await hub.close()


async def test_a_lost_room_is_announced_before_its_listeners_leave_and_listed_until_its_pull_works() -> None:
    upstreams = Upstreams({})
    hub = RelayRooms(
        FanoutSettings(), chunk_s=0.02, upstreams=upstreams, upstream_lost_s=0.1, lost_report_s=0.5
    )
    announced: list[tuple[list[str], list[str | None]]] = []

    async def announce() -> None:
        # What a report made now names, and whether the listeners are still there.
        announced.append((hub.lost(), [first.reason, other.reason]))

    hub.announce = announce
    room, first = hub.subscribe("r", 0, upstream=("dead:1",))
    _, other = hub.subscribe("q", 0, upstream=("dead:2",))
    await until(lambda: first.reason is not None and other.reason is not None)
    assert first.reason == other.reason == UPSTREAM_LOST
    # Each room announced once (not at each retry of its failing pull), before its listeners were sent away.
    assert sorted(rooms[-1] for rooms, _ in announced) == ["q", "r"]
    assert all(reasons.count(None) >= 1 for _, reasons in announced)
    await asyncio.sleep(0.3)
    assert len(announced) == 2 and sorted(hub.lost()) == ["q", "r"]
    # Room r's pull works again: no longer listed.
    upstreams.serving["dead:1"] = [encode_chunk(1, 900, 1, [])]
    hub.subscribe("r", 0, upstream=("dead:1",))
    await until(lambda: room.pull_ok)
    assert "r" not in hub.lost()
    # Room q, its listener gone and its pull stopped while still failing: listed until lost_report_s
    # after its last loss.
    hub.unsubscribe(hub.room("q"), other)  # type: ignore[arg-type]
    hub.pull_linger_s = 0.0
    hub.sweep()
    assert hub.lost() == ["q"]
    await until(lambda: not hub.lost())
    await hub.close()
