"""Every long-lived stream has an owner and a bound: real relays (and admission on the real broker).

A ticket, a user or a crowd of users must not hold more streams than the design gives them: a user's
streams per room on a relay, a relay's listeners, and the listener seats a Leave gives back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.helpers import join_outcome, metadata
from tests.integration.test_moderation import ended_with, figures, site
from tests.integration.test_notifier import start_notifier
from tests.integration.test_relay import ROOM, frames, relay, wait_for
from townhall.core.config import KafkaConfig
from townhall.v1 import inbox_pb2
from townhall.v1.common_pb2 import Role
from townhall.v1.relay_pb2 import AudioFrame, SubscribeRequest

WITHIN_S = 10.0


async def opened(call: Any) -> Any:
    """The call once the relay has sent its headers (the stream is registered there)."""
    await asyncio.wait_for(call.initial_metadata(), WITHIN_S)
    return call


async def test_one_ticket_holds_at_most_two_subscribe_streams_each_new_one_ends_the_oldest() -> None:
    async with relay() as r:
        ticket = r.ticket(100, Role.ROLE_LISTENER)
        calls = []
        for _ in range(10):  # ten opens from one ticket (within the per-user open rate)
            calls.append(await opened(r.stub().Subscribe(SubscribeRequest(room_id=ROOM), metadata=ticket)))
        await wait_for(lambda: r.app.hub.listeners == 2)
        ended = [await ended_with(call, WITHIN_S) for call in calls[:8]]
        room = r.app.hub.room(ROOM)
        assert room is not None and len(room.subscribers) == 2
        # The two newest still stream: a speaker's frames reach them.
        speaker = r.stub().Publish(frames(10), metadata=r.ticket(1, Role.ROLE_SPEAKER))
        for call in calls[8:]:
            chunk = await asyncio.wait_for(call.read(), WITHIN_S)
            assert chunk is not grpc.aio.EOF
        await asyncio.wait_for(speaker, WITHIN_S)
    for error, _ in ended:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "newer Subscribe stream" in (error.details() or "")


async def test_a_speaker_holds_at_most_two_publish_streams_of_a_room() -> None:
    async with relay() as r:
        ticket = r.ticket(1, Role.ROLE_SPEAKER)
        stop = asyncio.Event()

        async def talk_then_wait() -> AsyncIterator[AudioFrame]:
            async for frame in frames(5):
                yield frame
            # Then no write in flight when the relay ends the stream (grpc.aio would report one as
            # INTERNAL, grpc/grpc#36066).
            await stop.wait()

        calls = [await opened(r.stub().Publish(talk_then_wait(), metadata=ticket)) for _ in range(5)]
        errors = [await asyncio.wait_for(_error(call), WITHIN_S) for call in calls[:3]]
        await wait_for(lambda: (room := r.app.hub.room(ROOM)) is not None and room.publishers == 2)
        stop.set()
        for call in calls[3:]:
            assert (await asyncio.wait_for(call, WITHIN_S)).frames_accepted > 0
    for error in errors:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "newer Publish stream" in (error.details() or "")


async def _error(call: Any) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the stream ended without an error")


def _listen(r: Any, user: int, role: int = Role.ROLE_LISTENER, resume_after: int = 0) -> Any:
    request = SubscribeRequest(room_id=ROOM, resume_after=resume_after)
    return r.stub().Subscribe(request, metadata=r.ticket(user, role))


async def test_a_full_relay_refuses_listeners_with_unavailable_but_not_the_stage_or_a_reconnect() -> None:
    async with relay(listener_capacity="3") as r:
        listeners = [await opened(_listen(r, 100 + i)) for i in range(3)]
        refused = [await ended_with(_listen(r, 200 + i), WITHIN_S) for i in range(20)]
        assert r.app.hub.listeners == 3
        # The host on the stage is never refused (at most 15 users a room, at the origin).
        host = await opened(_listen(r, 1, Role.ROLE_HOST))
        # A listener reconnecting (its old stream not yet seen gone) takes its old stream's place.
        again = await opened(_listen(r, 100, resume_after=1))
        await wait_for(lambda: r.app.hub.listeners == 4)
        for call in listeners[1:]:
            call.cancel()
        await wait_for(lambda: r.app.hub.listeners == 2)
        late = await opened(_listen(r, 300))
        for name, call in (("host", host), ("again", again), ("late", late)):
            assert not call.done(), (name, r.app.hub.listeners)
    for error, _ in refused:
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "relay is full (3 listeners)" in (error.details() or "")


@pytest.mark.kafka
async def test_join_leave_and_join_again_with_other_users_cannot_stream_past_the_listener_limit(
    kafka: KafkaConfig,
) -> None:
    async with site(kafka, relays=1) as s:
        host = s.user()
        room = await host.start_room((await host.create_room("One seat", listener_limit=1)).room_id)
        relay_app = s.relays.apps[0]
        held, watching, left_at = [], [], []
        for user in [s.user() for _ in range(5)]:  # one seat, five users taking turns
            grant = await user.join(room.room_id, give_up_after_s=WITHIN_S)
            call = await opened(user.subscribe(grant, room.room_id))
            held.append((user, grant, call))
            watching.append(asyncio.create_task(ended_with(call, WITHIN_S)))
            await user.leave(room.room_id)
            left_at.append(time.monotonic())
        cut = [await task for task in watching]
        await wait_for(lambda: relay_app.hub.listeners == 0, WITHIN_S)
        # Their tickets stay void, also to resume with.
        again = [
            await ended_with(user.subscribe(grant, room.room_id, resume_after=1), WITHIN_S)
            for user, grant, _ in held
        ]
        # The seat is there for whoever joins now, and it holds: the one before waits or is shed.
        last = s.user()
        grant = await last.join(room.room_id, give_up_after_s=WITHIN_S)
        listening = await opened(last.subscribe(grant, room.room_id))
        earlier = held[0][0]
        outcome, _ = await join_outcome(earlier.admission, room.room_id, earlier.metadata)
        # A listener whose stream broke (a relay or network failure) resumes on the same ticket.
        listening.cancel()
        back = await opened(last.subscribe(grant, room.room_id, resume_after=1))
        await asyncio.sleep(0.5)
        assert not back.done() and relay_app.hub.listeners == 1
    for error, _ in cut + again:
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "left room" in (error.details() or "")
    assert outcome in ("waiting", "RESOURCE_EXHAUSTED")
    delays = sorted(round(1000 * (at - left), 1) for (_, at), left in zip(cut, left_at, strict=True))
    figures("leave-revocation", {"leave_returned_to_stream_cut_ms": delays})


@pytest.mark.kafka
async def test_one_user_holds_at_most_four_inbox_streams_each_new_one_ends_the_oldest(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    notifier = await start_notifier(kafka, tmp_path)
    try:
        request = inbox_pb2.InboxSubscribeRequest()
        calls = [await opened(notifier.inbox.Subscribe(request, metadata=metadata(7))) for _ in range(10)]
        ended = [await ended_with(call, WITHIN_S) for call in calls[:6]]
        other = await opened(notifier.inbox.Subscribe(request, metadata=metadata(8)))
        assert notifier.app.hub.streams == 5
        assert not any(call.done() for call in [*calls[6:], other])
    finally:
        await notifier.stop()
    for error, _ in ended:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "newer Inbox stream" in (error.details() or "")
