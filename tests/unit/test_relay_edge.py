"""Edge-side pure logic: forwarding origin bytes, rings with gaps, stage frames, ticket paths (no network)."""

from __future__ import annotations

from townhall.bench.loadgen import first_capture_us
from townhall.core.tickets import ROLE_RELAY, TicketSigner
from townhall.relay.fanout import FanoutSettings, Room, chunk_sequence
from townhall.v1.common_pb2 import Role
from townhall.v1.relay_pb2 import AudioFrame, Chunk

SECRET = "unit-test-secret-0123456789abcdefghijkl"


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


def test_a_listener_ticket_carries_its_path_and_a_pull_credential_names_the_rest() -> None:
    signer = TicketSigner([("unit", SECRET)], 60)
    ticket = signer.issue("r", 5, Role.ROLE_LISTENER, "edge:1", upstream=("origin:1", "mid:1"))
    assert signer.verify(signer.sign(ticket), "edge:1").upstream == ("origin:1", "mid:1")
    pull = signer.verify(signer.pull_token("r", ("origin:1", "mid:1")), "mid:1")
    assert (pull.role, pull.upstream, pull.on_stage) == (ROLE_RELAY, ("origin:1",), False)
    assert signer.verify(signer.pull_token("r", ("origin:1",)), "origin:1").upstream == ()
