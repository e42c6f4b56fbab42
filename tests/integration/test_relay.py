"""One relay process in-process on loopback, real gRPC clients: what speakers and listeners notice."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from townhall.core import config as config_module
from townhall.core import server
from townhall.core.config import DEV_SERVICE_KEY
from townhall.core.errors import REASON_KEY, Reason, reason, sent_away
from townhall.core.tickets import TICKET_KEY, TicketSigner
from townhall.relay import app as relay_app
from townhall.relay.app import RelayApp
from townhall.v1 import relay_pb2_grpc
from townhall.v1.common_pb2 import Role
from townhall.v1.relay_pb2 import AudioFrame, Chunk, SubscribeRequest

ADVERTISE = "relay-under-test:7000"
SERVING = health_pb2.HealthCheckResponse.SERVING
ROOM = "room-1"
TIMEOUT = 5.0


def ticket_keys(kid: str, name: str) -> tuple[TicketSigner, str]:
    """A ticket signer with a P-256 key `kid` (made from `name`), and its tickets.public_keys entry."""
    signer = TicketSigner(kid, hashlib.sha256(name.encode()).digest(), 600)
    return signer, signer.public_key()


# What admission would sign the test relays' tickets with (as tickets.private_key, and as a signer),
# and the public key the relays verify with.
TICKET_PRIVATE_KEY = "test=" + base64.urlsafe_b64encode(hashlib.sha256(b"integration-test").digest()).decode()
SIGNER, TICKET_KEYS = ticket_keys("test", "integration-test")


@dataclasses.dataclass
class Relay:
    """A running relay and the means to talk to it."""

    app: RelayApp
    port: int
    signer: TicketSigner
    channels: list[grpc.aio.Channel]

    def stub(self, **options: Any) -> relay_pb2_grpc.RelayStub:
        """A stub on a new channel (its own connection, so flow control is per listener)."""
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=list(options.items()))
        self.channels.append(channel)
        return relay_pb2_grpc.RelayStub(channel)

    def ticket(self, user: int, role: int, room: str = ROOM, **issue: Any) -> tuple[tuple[str, str], ...]:
        """Metadata carrying a valid ticket for this relay."""
        return ((TICKET_KEY, self.signer.sign(self.signer.issue(room, user, role, ADVERTISE, **issue))),)


@contextlib.asynccontextmanager
async def relay(ticket_keys: str = TICKET_KEYS, **overrides: str) -> AsyncIterator[Relay]:
    """A relay server on a free loopback port (verifying tickets with the public keys `ticket_keys`),
    drained on exit."""
    env = {
        "TOWNHALL_AUTH_SERVICE_KEYS": DEV_SERVICE_KEY,
        "TOWNHALL_RELAY_LISTEN": "127.0.0.1:0",
        "TOWNHALL_RELAY_ADVERTISE": ADVERTISE,
        "TOWNHALL_RELAY_METRICS_PORT": "0",
        # No Kafka: tickets alone decide, and no load reports (else it waits for their topic at start).
        "TOWNHALL_RELAY_FOLLOW_ROOM_STATE": "false",
        "TOWNHALL_RELAY_LOAD_REPORT_S": "0",
        "TOWNHALL_TICKETS_PUBLIC_KEYS": ticket_keys,
        **{f"TOWNHALL_RELAY_{key.upper()}": value for key, value in overrides.items()},
    }
    config = config_module.load(env=env)
    app = RelayApp(config)
    running = await server.start(app, config, "127.0.0.1:0")
    handle = Relay(app, running.port, SIGNER, [])
    try:
        yield handle
    finally:
        await server.stop(app, running, grace_s=1.0)
        for channel in handle.channels:
            await channel.close()


def now_us() -> int:
    return time.time_ns() // 1_000


async def frames(
    count: int, interval_s: float = 0.02, size: int = 60, stop: asyncio.Event | None = None
) -> AsyncIterator[AudioFrame]:
    """A speaker's frames at real-time pace (count bounds the stream even if never stopped)."""
    start = time.monotonic()
    for seq in range(count):
        if stop is not None and stop.is_set():
            return
        delay = start + seq * interval_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield AudioFrame(sequence=seq, capture_ts_us=now_us(), payload=bytes([seq % 256]) * size)


async def read_until(
    call: Any, done: Callable[[list[Chunk]], bool], within_s: float = TIMEOUT
) -> list[tuple[float, Chunk]]:
    """Reads chunks (with their receipt time) until `done` holds; fails after `within_s`."""
    got: list[tuple[float, Chunk]] = []
    deadline = time.monotonic() + within_s
    while not done([chunk for _, chunk in got]):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out after {len(got)} chunks"
        chunk = await asyncio.wait_for(call.read(), remaining)
        assert chunk is not grpc.aio.EOF, "stream ended early"
        got.append((time.time(), chunk))
    return got


def frame_ids(chunks: list[Chunk]) -> list[tuple[int, int]]:
    return [(f.speaker_id, f.sequence) for chunk in chunks for f in chunk.frames]


def gaps(chunks: list[Chunk]) -> int:
    seqs = [chunk.sequence for chunk in chunks]
    return sum(b - a - 1 for a, b in itertools.pairwise(seqs))


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def wait_for(predicate: Callable[[], bool], within_s: float = TIMEOUT) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_two_speakers_three_listeners_hear_the_same_frames_in_the_same_order() -> None:
    async with relay() as r:
        listeners = [
            r.stub().Subscribe(SubscribeRequest(room_id=ROOM), metadata=r.ticket(100 + i, Role.ROLE_LISTENER))
            for i in range(3)
        ]
        await wait_for(lambda: (room := r.app.hub.room(ROOM)) is not None and len(room.subscribers) == 3)
        speakers = [
            r.stub().Publish(frames(25), metadata=r.ticket(user, Role.ROLE_SPEAKER)) for user in (1, 2)
        ]

        def all_frames(chunks: list[Chunk]) -> bool:
            return len(frame_ids(chunks)) >= 50

        received = await asyncio.gather(*(read_until(call, all_frames) for call in listeners))
        summaries = await asyncio.wait_for(asyncio.gather(*speakers), TIMEOUT)

    assert [s.frames_accepted for s in summaries] == [25, 25]
    heard = [frame_ids([chunk for _, chunk in got]) for got in received]
    assert heard[0] == heard[1] == heard[2]
    assert sorted(heard[0]) == sorted((user, seq) for user in (1, 2) for seq in range(25))
    for user in (1, 2):  # each speaker's frames in the order spoken
        assert [seq for speaker, seq in heard[0] if speaker == user] == list(range(25))
    assert [chunk.sequence for _, chunk in received[0]] == list(range(1, len(received[0]) + 1))


async def test_a_listener_that_stops_reading_does_not_delay_the_others() -> None:
    dropped_before = _metric("townhall_relay_chunks_dropped_total")
    async with relay(chunk_s="0.02", subscriber_queue="5", stuck_cutoff_s="60") as r:
        # The slow listener has its own connection with a fixed, small flow-control window, so its
        # relay-side queue overflows quickly once it stops reading.
        slow = r.stub(**{"grpc.http2.bdp_probe": 0}).Subscribe(
            SubscribeRequest(room_id=ROOM), metadata=r.ticket(100, Role.ROLE_LISTENER)
        )
        fast = r.stub().Subscribe(SubscribeRequest(room_id=ROOM), metadata=r.ticket(101, Role.ROLE_LISTENER))
        await wait_for(lambda: (room := r.app.hub.room(ROOM)) is not None and len(room.subscribers) == 2)
        # ~5.6 KB chunks every 20 ms: the slow listener's window is full within a few chunks.
        stop = asyncio.Event()
        speaker = r.stub().Publish(
            frames(1000, interval_s=0.005, size=1400, stop=stop), metadata=r.ticket(1, Role.ROLE_SPEAKER)
        )

        def slow_overflowed() -> bool:
            room = r.app.hub.room(ROOM)
            return room is not None and any(s.dropped > 0 for s in room.subscribers)

        got = await read_until(fast, lambda chunks: slow_overflowed() and len(chunks) >= 30)
        got += await read_until(fast, lambda chunks: len(chunks) >= 10)
        stop.set()
        await asyncio.wait_for(speaker, TIMEOUT)
        last = got[-1][1].sequence

        fast_chunks = [chunk for _, chunk in got]
        assert gaps(fast_chunks) == 0
        assert [c.sequence for c in fast_chunks] == list(range(1, len(fast_chunks) + 1))
        worst = max(received - f.capture_ts_us / 1e6 for received, chunk in got for f in chunk.frames)
        assert worst < 1.0, f"healthy listener heard audio {worst:.3f} s late"

        assert _metric("townhall_relay_chunks_dropped_total") > dropped_before

        # The slow listener, reading again, sees the jump where its oldest chunks were dropped.
        behind = await read_until(slow, lambda chunks: bool(chunks) and chunks[-1].sequence >= last)
        assert gaps([chunk for _, chunk in behind]) > 0


async def test_a_listener_that_never_reads_is_cut_off_and_told_why() -> None:
    cut_before = _metric("townhall_relay_subscribers_cut_total")
    async with relay(chunk_s="0.02", subscriber_queue="2", stuck_cutoff_s="0.3") as r:
        stuck = r.stub(**{"grpc.http2.bdp_probe": 0}).Subscribe(
            SubscribeRequest(room_id=ROOM), metadata=r.ticket(100, Role.ROLE_LISTENER)
        )
        await wait_for(lambda: r.app.hub.room(ROOM) is not None)
        speaker = r.stub().Publish(
            frames(200, interval_s=0.005, size=1400), metadata=r.ticket(1, Role.ROLE_SPEAKER)
        )
        await wait_for(lambda: not r.app.hub.room(ROOM).subscribers)  # type: ignore[union-attr]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await read_until(stuck, lambda chunks: False)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too slowly" in (error.value.details() or "")
        assert _metric("townhall_relay_subscribers_cut_total") == cut_before + 1
        await asyncio.wait_for(speaker, TIMEOUT)


async def test_late_joiner_gets_the_last_300_ms_at_once_and_a_resume_has_no_gap() -> None:
    async with relay(chunk_s="0.05", late_join_s="0.3") as r:
        stop = asyncio.Event()
        speaker = r.stub().Publish(frames(500, stop=stop), metadata=r.ticket(1, Role.ROLE_SPEAKER))
        await wait_for(lambda: (room := r.app.hub.room(ROOM)) is not None and room.sequence >= 12)

        # The join's moment is the relay's, not the client's: on a busy machine the call can take
        # 100 ms to arrive, and the chunks emitted meanwhile are still the last 300 ms at that moment.
        room = r.app.hub.room(ROOM)
        assert room is not None
        joined: list[int] = []
        subscribe = room.subscribe

        def noting_the_moment(*args: Any, **kwargs: Any) -> Any:
            joined.append(now_us())
            return subscribe(*args, **kwargs)

        room.subscribe = noting_the_moment  # type: ignore[method-assign]
        late = r.stub().Subscribe(SubscribeRequest(room_id=ROOM), metadata=r.ticket(100, Role.ROLE_LISTENER))
        got = [
            chunk
            for _, chunk in await read_until(
                late, lambda c: bool(c) and bool(joined) and c[-1].emitted_ts_us > joined[0]
            )
        ]
        joined_us = joined[0]
        replayed = got[:-1]
        # 300 ms of 50 ms chunks, buffered before the join, delivered before the next live chunk.
        assert 5 <= len(replayed) <= 7, [c.sequence for c in got]
        assert min(f.capture_ts_us for c in replayed for f in c.frames) <= joined_us - 250_000
        assert gaps(got) == 0

        # Leave, miss a few chunks, come back with resume_after: no gap.
        last = got[-1].sequence
        late.cancel()
        await wait_for(lambda: r.app.hub.room(ROOM).sequence >= last + 4)  # type: ignore[union-attr]
        resumed = r.stub().Subscribe(
            SubscribeRequest(room_id=ROOM, resume_after=last), metadata=r.ticket(100, Role.ROLE_LISTENER)
        )
        after = [chunk for _, chunk in await read_until(resumed, lambda c: len(c) >= 6)]
        assert [c.sequence for c in after] == list(range(last + 1, last + 7))
        stop.set()
        await asyncio.wait_for(speaker, TIMEOUT)


async def test_draining_ends_streams_promptly_with_unavailable() -> None:
    async with relay() as r:
        listener = r.stub().Subscribe(
            SubscribeRequest(room_id=ROOM), metadata=r.ticket(100, Role.ROLE_LISTENER)
        )
        speaker = r.stub().Publish(frames(500), metadata=r.ticket(1, Role.ROLE_SPEAKER))
        await read_until(listener, lambda chunks: len(chunks) >= 1)
        started = time.monotonic()
        await r.app.drain()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await read_until(listener, lambda chunks: False)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (error.value.details() or "")
        # ErrorInfo DRAINING, and the deprecated trailer for clients older than it: move on at once.
        assert reason(error.value) == Reason.DRAINING and sent_away(error.value)
        assert (REASON_KEY, "draining") in tuple(error.value.trailing_metadata() or ())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(speaker, TIMEOUT)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason(error.value) == Reason.DRAINING
        assert time.monotonic() - started < 2.0  # generous: both end within a frame or two


def _signed_by(kid: str, name: str, role: int = Role.ROLE_SPEAKER) -> Callable[[Relay], Any]:
    """A ticket for this relay and room, signed with a key the relay may not have."""

    def metadata(r: Relay) -> tuple[tuple[str, str], ...]:
        other, _ = ticket_keys(kid, name)
        return ((TICKET_KEY, other.sign(other.issue(ROOM, 1, role, ADVERTISE))),)

    return metadata


_forged = _signed_by("test", "some-other-key")


def _hs256(secret: str | bytes, role: int, **headers: str) -> tuple[tuple[str, str], ...]:
    """An HS256 ticket for this relay and room, signed with `secret`."""
    claims = {"sub": "1", "room": ROOM, "role": role, "aud": ADVERTISE, "exp": int(time.time()) + 60}
    return ((TICKET_KEY, jwt.encode(claims, secret, algorithm="HS256", headers=headers or None)),)


def _hs256_with_the_public_key(r: Relay) -> tuple[tuple[str, str], ...]:
    """The old trick on asymmetric keys: an HS256 ticket whose HMAC secret is the relay's public key."""
    return _hs256(TICKET_KEYS.partition("=")[2].encode(), Role.ROLE_HOST, kid="test")


def _swap_claims(claims_from: str, signature_from: str) -> str:
    """A ticket with one ticket's header and claims and another's signature (claims edited by hand)."""
    return claims_from.rpartition(".")[0] + "." + signature_from.rpartition(".")[2]


def _without_kid(r: Relay) -> tuple[tuple[str, str], ...]:
    return _hs256("a-secret-the-relay-never-had-0123456789", Role.ROLE_LISTENER)


SUBSCRIBE_ERRORS = [
    ("missing ticket", lambda r: (), ROOM, grpc.StatusCode.UNAUTHENTICATED, "townhall-ticket"),
    (
        "garbled ticket",
        lambda r: ((TICKET_KEY, "not.a-jwt"),),
        ROOM,
        grpc.StatusCode.UNAUTHENTICATED,
        "not a JWT",
    ),
    ("forged ticket", _forged, ROOM, grpc.StatusCode.UNAUTHENTICATED, "does not verify with key 'test'"),
    (
        "unknown key id",
        _signed_by("gone", "integration-test"),
        ROOM,
        grpc.StatusCode.UNAUTHENTICATED,
        "key id 'gone' is not known",
    ),
    ("no key id", _without_kid, ROOM, grpc.StatusCode.UNAUTHENTICATED, "no kid"),
    (
        "tampered claims",
        lambda r: (
            (
                TICKET_KEY,
                _swap_claims(r.ticket(100, Role.ROLE_LISTENER)[0][1], r.ticket(100, Role.ROLE_SPEAKER)[0][1]),
            ),
        ),
        ROOM,
        grpc.StatusCode.UNAUTHENTICATED,
        "does not verify",
    ),
    (
        "HS256 keyed with the public key",
        _hs256_with_the_public_key,
        ROOM,
        grpc.StatusCode.UNAUTHENTICATED,
        "says alg 'HS256', but key 'test' is for ES256",
    ),
    (
        "expired ticket",
        lambda r: r.ticket(100, Role.ROLE_LISTENER, now=time.time() - 3600),
        ROOM,
        grpc.StatusCode.UNAUTHENTICATED,
        "expired",
    ),
    (
        "another room",
        lambda r: r.ticket(100, Role.ROLE_LISTENER, room="room-2"),
        ROOM,
        grpc.StatusCode.PERMISSION_DENIED,
        "room-2",
    ),
    (
        "bad room id",
        lambda r: r.ticket(100, Role.ROLE_LISTENER),
        "no spaces allowed",
        grpc.StatusCode.INVALID_ARGUMENT,
        "room_id",
    ),
]


async def test_bad_subscribe_requests_get_a_clear_status() -> None:
    async with relay() as r:
        for name, metadata, room_id, code, needle in SUBSCRIBE_ERRORS:
            call = r.stub().Subscribe(SubscribeRequest(room_id=room_id), metadata=metadata(r))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await asyncio.wait_for(call.read(), TIMEOUT)
            assert error.value.code() == code, name
            assert needle in (error.value.details() or ""), (name, error.value.details())


def _one(**fields: Any) -> Callable[[], AsyncIterator[AudioFrame]]:
    async def gen() -> AsyncIterator[AudioFrame]:
        yield AudioFrame(**{"capture_ts_us": now_us(), "payload": b"\x01" * 60, **fields})

    return gen


PUBLISH_ERRORS = [
    ("missing ticket", lambda r: (), _one(), grpc.StatusCode.UNAUTHENTICATED, ["townhall-ticket"]),
    ("forged ticket", _forged, _one(), grpc.StatusCode.UNAUTHENTICATED, ["does not verify"]),
    (
        "unknown key id",
        _signed_by("gone", "integration-test"),
        _one(),
        grpc.StatusCode.UNAUTHENTICATED,
        ["'gone'", "rotated out"],
    ),
    (
        "expired ticket",
        lambda r: r.ticket(1, Role.ROLE_SPEAKER, now=time.time() - 3600),
        _one(),
        grpc.StatusCode.UNAUTHENTICATED,
        ["expired"],
    ),
    (
        "listener publishing",
        lambda r: r.ticket(100, Role.ROLE_LISTENER),
        _one(),
        grpc.StatusCode.PERMISSION_DENIED,
        ["listener", "may not publish"],
    ),
    (
        "payload too large",
        lambda r: r.ticket(1, Role.ROLE_SPEAKER),
        _one(payload=b"\x01" * 1501),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["1501 bytes", "1500"],
    ),
    (
        "empty payload",
        lambda r: r.ticket(1, Role.ROLE_SPEAKER),
        _one(payload=b""),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["empty"],
    ),
    (
        "stale capture time",
        lambda r: r.ticket(1, Role.ROLE_SPEAKER),
        _one(capture_ts_us=now_us() - 120_000_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["capture_ts_us", "60 s"],
    ),
    (
        "someone else's speaker id",
        lambda r: r.ticket(1, Role.ROLE_SPEAKER),
        _one(speaker_id=2),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["speaker_id 2"],
    ),
]


async def test_bad_publish_requests_get_a_clear_status() -> None:
    async with relay() as r:
        for name, metadata, gen, code, needles in PUBLISH_ERRORS:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await asyncio.wait_for(r.stub().Publish(gen(), metadata=metadata(r)), TIMEOUT)
            assert error.value.code() == code, name
            for needle in needles:
                assert needle in (error.value.details() or ""), (name, error.value.details())


class HeldClock:
    """time.monotonic, except while held: then the instant it was held at."""

    def __init__(self) -> None:
        self.held: float | None = None

    def __call__(self) -> float:
        return time.monotonic() if self.held is None else self.held


async def test_a_speaker_flooding_frames_is_cut_and_the_other_speakers_go_on() -> None:
    # 50 frames/s in bursts of 25: a speaker at real-time pace never comes near it.
    async with relay(max_frames_per_s="50", frame_burst_s="0.5") as r:
        # The frame budgets' clock is held while the flood arrives, so its frames count as arriving at
        # once however the machine schedules their reads (a refill every 20 ms would otherwise let a
        # 26th frame through when the reads spread over more than that).
        clock = HeldClock()
        r.app.servicer.clock = clock
        listener = r.stub().Subscribe(
            SubscribeRequest(room_id=ROOM), metadata=r.ticket(100, Role.ROLE_LISTENER)
        )
        await wait_for(lambda: r.app.hub.room(ROOM) is not None)
        speaking, stop = asyncio.Event(), asyncio.Event()
        speaking.set()

        async def real_time() -> AsyncIterator[AudioFrame]:
            """A speaker's frames, 20 ms apart or more (it pauses while `speaking` is clear)."""
            for seq in range(500):
                await speaking.wait()
                if stop.is_set():
                    return
                yield AudioFrame(sequence=seq, capture_ts_us=now_us(), payload=bytes([seq % 256]) * 60)
                await asyncio.sleep(0.02)

        steady = r.stub().Publish(real_time(), metadata=r.ticket(1, Role.ROLE_SPEAKER))
        heard = await read_until(listener, lambda c: any(f.speaker_id == 1 for x in c for f in x.frames))

        async def flooding() -> AsyncIterator[AudioFrame]:
            async for frame in frames(26, interval_s=0.0):  # the burst and one more
                yield frame
            # Then no write in flight when the status comes (grpc.aio would report one as INTERNAL,
            # grpc/grpc#36066, as `townhall.client.publish_status` explains).
            await asyncio.sleep(TIMEOUT)

        speaking.clear()  # the steady speaker's frames are not read on the held clock
        clock.held = time.monotonic()
        flood = r.stub().Publish(flooding(), metadata=r.ticket(2, Role.ROLE_SPEAKER))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(flood, TIMEOUT)
        clock.held = None
        speaking.set()
        cut_at = now_us()
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 50 frames/s in bursts of 25" in (error.value.details() or "")
        # The steady speaker is heard after the flood was cut, every frame in order.
        heard += await read_until(
            listener,
            lambda c: any(f.speaker_id == 1 and f.capture_ts_us > cut_at for x in c for f in x.frames),
        )
        stop.set()
        summary = await asyncio.wait_for(steady, TIMEOUT)
    steady_ids = [seq for speaker, seq in frame_ids([c for _, c in heard]) if speaker == 1]
    assert steady_ids == list(range(len(steady_ids)))
    flooded = [seq for speaker, seq in frame_ids([c for _, c in heard]) if speaker == 2]
    assert flooded == list(range(25)), "the burst got through, the frame past it did not"
    assert summary.frames_accepted >= len(steady_ids)


async def test_a_ticket_for_another_relay_is_refused() -> None:
    async with relay() as r:
        token = r.signer.sign(r.signer.issue(ROOM, 100, Role.ROLE_LISTENER, "elsewhere:7000"))
        call = r.stub().Subscribe(SubscribeRequest(room_id=ROOM), metadata=((TICKET_KEY, token),))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(call.read(), TIMEOUT)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "another relay" in (error.value.details() or "")


async def test_ticket_keys_rotate_two_live_keys_and_a_removed_key_is_refused() -> None:
    (by_old, old), (by_new, new) = ticket_keys("old", "old-ticket-key"), ticket_keys("new", "new-ticket-key")

    def ticket(signer: TicketSigner, user: int, role: int) -> tuple[tuple[str, str], ...]:
        return ((TICKET_KEY, signer.sign(signer.issue(ROOM, user, role, ADVERTISE))),)

    # During a rotation relays know both keys: admission may sign with either and both tickets work.
    async with relay(ticket_keys=f"{new},{old}") as r:
        listener = r.stub().Subscribe(
            SubscribeRequest(room_id=ROOM), metadata=ticket(by_old, 100, Role.ROLE_LISTENER)
        )
        speaker = r.stub().Publish(frames(20), metadata=ticket(by_new, 1, Role.ROLE_SPEAKER))
        heard = await read_until(listener, lambda chunks: len(frame_ids(chunks)) >= 20)
        assert frame_ids([c for _, c in heard])[:20] == [(1, seq) for seq in range(20)]
        assert (await asyncio.wait_for(speaker, TIMEOUT)).frames_accepted == 20
    # Once the old key is removed, its tickets are refused and say why.
    async with relay(ticket_keys=new) as r:
        call = r.stub().Subscribe(
            SubscribeRequest(room_id=ROOM), metadata=ticket(by_old, 100, Role.ROLE_LISTENER)
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(call.read(), TIMEOUT)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "key id 'old' is not known" in (error.value.details() or "")


def _expiry_fails(app: RelayApp) -> None:
    def fails(_now_ms: int) -> int:
        raise RuntimeError("expiry broke")

    app.guard.expire = fails  # type: ignore[method-assign]


async def test_a_background_loop_that_dies_turns_health_not_serving_and_is_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_app, "EXPIRE_EVERY_S", 0.05)
    before = REGISTRY.get_sample_value("townhall_task_failures_total", {"task": "relay-expiry"}) or 0.0
    async with relay(load_report_s="0") as handle:  # no Kafka
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
        handle.channels.append(channel)
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING
        _expiry_fails(handle.app)
        deadline = time.monotonic() + 5.0
        while (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING:
            assert time.monotonic() < deadline, "health still SERVING after its expiry loop died"
            await asyncio.sleep(0.05)
        for service in ("", "townhall.v1.Relay"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    after = REGISTRY.get_sample_value("townhall_task_failures_total", {"task": "relay-expiry"})
    assert after == before + 1


async def test_a_served_process_whose_loop_died_drains_and_stops_with_task_died(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_app, "EXPIRE_EVERY_S", 0.05)
    env = {
        "TOWNHALL_AUTH_SERVICE_KEYS": DEV_SERVICE_KEY,
        "TOWNHALL_RELAY_ADVERTISE": ADVERTISE,
        "TOWNHALL_RELAY_FOLLOW_ROOM_STATE": "false",
        "TOWNHALL_TICKETS_PUBLIC_KEYS": TICKET_KEYS,
        "TOWNHALL_RELAY_LOAD_REPORT_S": "0",  # no Kafka
        "TOWNHALL_SERVER_DRAIN_NOTICE_S": "0",
    }
    config = config_module.load(env=env)
    app = RelayApp(config)
    _expiry_fails(app)
    with pytest.raises(server.TaskDied, match="relay-expiry"):
        await asyncio.wait_for(server.serve(app, config, "relay", "127.0.0.1:0", 0), 20.0)
