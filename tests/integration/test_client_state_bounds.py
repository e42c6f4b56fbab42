"""State that clients create is bounded and released: admission (and a relay) on the real broker.

Room ids a client makes up, rooms a host keeps creating, rooms that ended long ago and a host who
starts a live room again must not grow memory, the room-state topic or the followers' notifications.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.helpers import client, config_for, metadata, serving
from tests.integration.test_relay_tree import tree
from townhall.admission.app import AdmissionApp
from townhall.client import Client
from townhall.core.config import KafkaConfig
from townhall.core.kafka import Topics, read_to_end
from townhall.core.records import Record
from townhall.internal.v1.events_pb2 import RoomStarted
from townhall.notifier.app import NotifierApp
from townhall.v1 import graph_pb2, graph_pb2_grpc, moderation_pb2, rooms_pb2
from townhall.v1.common_pb2 import RoomState

pytestmark = pytest.mark.kafka
WITHIN_S = 20.0


@asynccontextmanager
async def admission(
    kafka: KafkaConfig, ticket_ttl_s: int = 2, **own: Any
) -> AsyncIterator[tuple[AdmissionApp, str]]:
    """One admission process (rate limits off: the tests count what each call leaves behind).

    Tickets live `ticket_ttl_s`, so rooms that ended are released that soon (plus as long again).
    """
    config = config_for(kafka, admission=own, limits={"enabled": False}, tickets={"ttl_s": ticket_ttl_s})
    app = AdmissionApp(config)
    async with serving(app, config) as address:
        yield app, address


def host_at(address: str) -> Client:
    return client(address, secrets.randbelow(2**40) + 1)


async def until(check: Callable[[], Awaitable[bool]], within_s: float = WITHIN_S) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_room_changes_to_made_up_room_ids_leave_no_lock_behind(kafka: KafkaConfig) -> None:
    # Tickets of an hour: no room of earlier tests is released (with a lock held) while this one counts.
    async with admission(kafka, ticket_ttl_s=3600) as (app, address):
        host = host_at(address)
        try:
            store: Any = app.store
            locks = store.locks if hasattr(store, "locks") else store._locks  # before: a dict of locks
            assert len(locks) == 0
            calls = [
                lambda r: host.rooms.StartRoom(rooms_pb2.StartRoomRequest(room_id=r), metadata=host.metadata),
                lambda r: host.rooms.EndRoom(rooms_pb2.EndRoomRequest(room_id=r), metadata=host.metadata),
                lambda r: host.moderation.Mute(
                    moderation_pb2.MuteRequest(room_id=r, user_id=5, muted=True), metadata=host.metadata
                ),
            ]
            codes = set()
            for i in range(60):
                try:
                    await calls[i % 3](secrets.token_urlsafe(12))
                except grpc.aio.AioRpcError as exc:
                    codes.add(exc.code())
            room = await host.create_room("real")
            await host.start_room(room.room_id)
            await host.end_room(room.room_id)
            held = len(locks)
        finally:
            await host.close()
    assert codes == {grpc.StatusCode.NOT_FOUND}
    assert held == 0, f"{held} locks left behind by 60 calls on room ids that never existed"


async def test_starting_a_live_room_again_answers_the_room_and_notifies_no_follower_again(
    kafka: KafkaConfig,
) -> None:
    async with admission(kafka) as (_, address):
        host = host_at(address)
        try:
            room = await host.create_room("Started once")
            first = await host.start_room(room.room_id)
            again = [await host.start_room(room.room_id) for _ in range(5)]
        finally:
            await host.close()
    assert all(r.state == RoomState.ROOM_STATE_LIVE and r.version == first.version for r in again)
    started: list[str] = []

    def count(record: Record) -> None:
        if record.value and RoomStarted.FromString(record.value).room.room_id == room.room_id:
            started.append(room.room_id)

    # Each StartRoom answered after its room-started record (if any) was acknowledged.
    await read_to_end(kafka, Topics(kafka.topic_prefix).room_started, count)
    assert len(started) == 1, f"the followers were told {len(started)} times that the room started"


async def test_a_host_creates_at_most_rooms_per_host_per_hour(kafka: KafkaConfig) -> None:
    async with admission(kafka, rooms_per_host_per_hour=3) as (_, address):
        host, other = host_at(address), host_at(address)
        try:
            keys = [secrets.token_hex(8) for _ in range(3)]
            made = [await host.create_room(f"room {i}", request_id=key) for i, key in enumerate(keys)]
            refused = []
            for _ in range(20):
                try:
                    await host.rooms.CreateRoom(
                        rooms_pb2.CreateRoomRequest(title="one more", request_id=secrets.token_hex(8)),
                        metadata=host.metadata,
                    )
                except grpc.aio.AioRpcError as exc:
                    refused.append(exc)
            # A repeated create (its answer was lost) still gets its room; another host is not limited.
            replayed = await host.create_room("room 0", request_id=keys[0])
            others = await other.create_room("another host's room")
        finally:
            await host.close()
            await other.close()
    assert len(refused) == 20
    for exc in refused:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 3 per hour" in (exc.details() or "")
        retry = dict(exc.trailing_metadata() or ()).get("retry-after-ms")
        assert retry is not None and 3_000_000 < int(retry) <= 3_600_000
    assert replayed.room_id == made[0].room_id and others.room_id


async def test_ended_and_never_started_rooms_are_released_by_every_process_once_their_tickets_expired(
    kafka: KafkaConfig,
) -> None:
    async with (
        tree(1, kafka_bootstrap=kafka.bootstrap, follow_room_state="true") as relays,
        # Tickets of 4 s: ended rooms are released ~8 s after they end, time enough on a loaded machine
        # for the relay to learn them and the book to be counted first (with 2 s a loaded run could
        # release a room before either; the count is now taken before any room exists).
        admission(kafka, ticket_ttl_s=4, relays=tuple(relays.addresses), unstarted_room_ttl_s=1) as (
            app,
            address,
        ),
    ):
        host = host_at(address)
        try:
            before = len(app.store.book)
            ended = []
            for i in range(10):
                room = await host.create_room(f"short {i}")
                await host.start_room(room.room_id)
                ended.append((await host.end_room(room.room_id)).room_id)
            idle = (await host.create_room("never started")).room_id
            guard = relays.apps[0].guard
            await until(lambda: _true(all(guard.rules(r) is not None for r in ended)))

            async def released() -> bool:
                return all(app.store.book.find(r) is None and guard.rules(r) is None for r in [*ended, idle])

            await until(released)
            missing = [await _code(host.get_room(r)) for r in [*ended, idle]]
            left = len(app.store.book)
        finally:
            await host.close()
    last: dict[str, bytes | None] = {}

    def keep(record: Record) -> None:
        if record.key:
            last[record.key.decode()] = record.value

    await read_to_end(kafka, Topics(kafka.topic_prefix).room_state, keep)
    assert missing == [grpc.StatusCode.NOT_FOUND] * 11
    assert left <= before  # this test's 11 rooms are all gone from the book
    # Deleted from the compacted topic too (tombstones): a process that starts later never loads them.
    assert all(last[r] is None for r in [*ended, idle])


async def _true(value: bool) -> bool:
    return value


async def _code(call: Awaitable[Any]) -> grpc.StatusCode | None:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return None


@asynccontextmanager
async def notifier_at(
    kafka: KafkaConfig, data_dir: Path, **own: Any
) -> AsyncIterator[tuple[NotifierApp, graph_pb2_grpc.GraphStub]]:
    config = config_for(
        kafka,
        notifier={"data_dir": str(data_dir), "group_id": f"g-{secrets.token_hex(4)}", **own},
        limits={"enabled": False},
    )
    app = NotifierApp(config)
    async with serving(app, config) as address, grpc.aio.insecure_channel(address) as channel:
        yield app, graph_pb2_grpc.GraphStub(channel)


async def _remind(graph: graph_pb2_grpc.GraphStub, user: int, room_id: str) -> grpc.StatusCode:
    try:
        await graph.RemindMe(graph_pb2.RemindMeRequest(room_id=room_id), metadata=metadata(user))
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_reminders_are_taken_only_for_rooms_that_exist_and_have_not_started(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    async with admission(kafka) as (_, address), notifier_at(kafka, tmp_path) as (notifier, graph):
        host, asker = host_at(address), secrets.randbelow(2**40) + 1
        try:
            made_up = [await _remind(graph, asker, secrets.token_urlsafe(12)) for _ in range(20)]
            later = (await host.create_room("later")).room_id
            live = await host.start_room((await host.create_room("now")).room_id)
            asked = await _remind(graph, asker, later)
            on_live = await _remind(graph, asker, live.room_id)
            kept = await notifier.store.reminded(later).__anext__()
        finally:
            await host.close()
    assert made_up == [grpc.StatusCode.NOT_FOUND] * 20
    assert asked == grpc.StatusCode.OK and kept.tolist() == [asker]
    assert on_live == grpc.StatusCode.FAILED_PRECONDITION


async def test_reminders_are_bounded_per_user_and_released_when_their_room_ends(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    async with (
        admission(kafka) as (_, address),
        notifier_at(kafka, tmp_path, reminders_per_user=3) as (notifier, graph),
    ):
        host, asker = host_at(address), secrets.randbelow(2**40) + 1
        try:
            rooms = [(await host.create_room(f"later {i}")).room_id for i in range(4)]
            asked = [await _remind(graph, asker, room_id) for room_id in rooms]
            kept = set(await notifier.store.reminder_rooms())
            await host.end_room(rooms[0])
            await until(lambda: _true(notifier.rooms.state(rooms[0]) == RoomState.ROOM_STATE_ENDED))
            await notifier.reminders.tick()  # the minutely release, now
            after_end = set(await notifier.store.reminder_rooms())
            again = await _remind(graph, asker, rooms[3])  # the ended room's reminder went: one more fits
        finally:
            await host.close()
    assert asked == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert kept == set(rooms[:3]) and after_end == set(rooms[1:3])
    assert again == grpc.StatusCode.OK
