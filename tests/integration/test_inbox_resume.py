"""Inbox resume on a real notifier and broker: a client that reconnects with its cursor gets what it missed,
each notification once, and is told when some were no longer kept."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.integration.fanout_helpers import RunningNotifier, fresh_users, serving_notifier, start_room, until
from tests.integration.helpers import client, refused_with
from townhall.client import Client, InboxCursor
from townhall.core.config import KafkaConfig
from townhall.notifier.records import SHARDS
from townhall.v1 import inbox_pb2
from townhall_tools.devtools.fanout import counting_inbox, import_followers

pytestmark = pytest.mark.kafka
# Notifications a resume answers with at most (notifier.inbox_resume_notifications), and records of the
# user's partition it reads back at most (notifier.inbox_resume_records): small for the test.
MOST = 4
SCAN = 50
READ_S = 30.0


@pytest.fixture(scope="module")
async def notifier(
    kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningNotifier]:
    # One user per record (notifier.batch_users), so a room with many followers is many records.
    async with serving_notifier(
        kafka,
        tmp_path_factory.mktemp("resume"),
        inbox_resume_notifications=MOST,
        inbox_resume_records=SCAN,
        batch_users=1,
    ) as running:
        yield running


@contextlib.asynccontextmanager
async def _following(notifier: RunningNotifier) -> AsyncIterator[tuple[int, Client]]:
    """A host, and a client of a user who follows them."""
    host, user_id = fresh_users(2)
    await import_followers(notifier.internal, host, [user_id])
    user = client(notifier.address, user_id)
    try:
        yield host, user
    finally:
        await user.close()


async def _seen(user: Client, notifier: RunningNotifier, host: int) -> InboxCursor:
    """The user connects, is notified of one room, and goes away: where it was."""
    stream = user.notifications()
    await stream.initial_metadata()  # registered: what is sent from now on reaches it
    await start_room(notifier.kafka, f"seen-{uuid.uuid4().hex[:6]}", host)
    cursor = InboxCursor()
    assert cursor.fresh(await asyncio.wait_for(stream.read(), READ_S))
    stream.cancel()
    return cursor


async def _sent_while_away(notifier: RunningNotifier, host: int, user: int, count: int) -> list[str]:
    """Rooms `host` starts while `user` is away, once their notifications are on the topic."""
    rooms = [f"away{i}-{uuid.uuid4().hex[:6]}" for i in range(count)]
    async with counting_inbox(notifier.kafka, [user]) as watch:
        for room in rooms:
            await start_room(notifier.kafka, room, host)
        await until(lambda: all(watch.delivered(room) for room in rooms), what="the notifications written")
    return rooms


async def _read(stream: grpc.aio.UnaryStreamCall, count: int) -> list[inbox_pb2.Notification]:
    return [await asyncio.wait_for(stream.read(), READ_S) for _ in range(count)]


async def _nothing_more(stream: grpc.aio.UnaryStreamCall, within_s: float = 1.5) -> None:
    with pytest.raises(TimeoutError):
        extra = await asyncio.wait_for(stream.read(), within_s)
        pytest.fail(f"one more notification: {extra}")


async def test_a_client_back_with_its_cursor_gets_exactly_the_three_it_missed(
    notifier: RunningNotifier,
) -> None:
    async with _following(notifier) as (host, user):
        cursor = await _seen(user, notifier, host)
        rooms = await _sent_while_away(notifier, host, user.user, 3)

        stream = user.notifications(cursor.cursor)
        missed = await _read(stream, 3)
        assert sorted(n.room_id for n in missed) == sorted(rooms)
        assert all(n.kind == inbox_pb2.NOTIFICATION_KIND_ROOM_STARTED and n.cursor for n in missed)
        assert all(cursor.fresh(n) for n in missed), "none of them seen before"
        # Then the live ones, once each (a room in both the backlog and the live feed is sent once).
        live = f"live-{uuid.uuid4().hex[:6]}"
        await start_room(notifier.kafka, live, host)
        [now] = await _read(stream, 1)
        assert (now.room_id, cursor.fresh(now)) == (live, True)
        await _nothing_more(stream)
        stream.cancel()

        # At-least-once: resuming from an older cursor again sends them again, with the same ids, and the
        # client's InboxCursor drops every one.
        again = user.notifications(missed[0].cursor)
        repeated = await _read(again, 3)
        assert {n.room_id for n in repeated} <= {*rooms, live}
        assert not any(cursor.fresh(n) for n in repeated)
        again.cancel()


async def test_a_client_that_saw_no_notification_resumes_from_where_its_stream_started(
    notifier: RunningNotifier,
) -> None:
    async with _following(notifier) as (host, user):
        stream = user.notifications(send_start=True)
        [start] = await _read(stream, 1)
        assert (start.kind, start.room_id, start.notification_id) == (
            inbox_pb2.NOTIFICATION_KIND_CONNECTED,
            "",
            "",
        )
        stream.cancel()
        rooms = await _sent_while_away(notifier, host, user.user, 3)

        stream = user.notifications(start.cursor, send_start=True)  # a cursor: no second marker
        assert sorted(n.room_id for n in await _read(stream, 3)) == sorted(rooms)
        await _nothing_more(stream)
        stream.cancel()


async def test_any_notifier_answers_a_resume(
    notifier: RunningNotifier, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Nothing is kept per user in a process: a client whose notifier went away resumes on another."""
    async with (
        _following(notifier) as (host, user),
        serving_notifier(
            notifier.kafka, tmp_path_factory.mktemp("inbox-only"), own=False, fanout=False
        ) as other,
    ):
        cursor = await _seen(user, notifier, host)
        rooms = await _sent_while_away(notifier, host, user.user, 3)
        elsewhere = client(other.address, user.user)
        try:
            stream = elsewhere.notifications(cursor.cursor)
            assert sorted(n.room_id for n in await _read(stream, 3)) == sorted(rooms)
            await _nothing_more(stream)
            stream.cancel()
        finally:
            await elsewhere.close()


async def test_a_client_away_past_the_bound_is_told_it_missed_some(notifier: RunningNotifier) -> None:
    async with _following(notifier) as (host, user):
        cursor = await _seen(user, notifier, host)
        rooms = await _sent_while_away(notifier, host, user.user, MOST + 2)

        stream = user.notifications(cursor.cursor)
        marker, *kept = await _read(stream, 1 + MOST)
        assert (marker.kind, marker.room_id, marker.notification_id) == (
            inbox_pb2.NOTIFICATION_KIND_MISSED,
            "",
            "",
        )
        assert len({n.room_id for n in kept}) == MOST and {n.room_id for n in kept} <= set(rooms)
        await _nothing_more(stream)
        stream.cancel()

        # The marker's cursor is where the kept ones begin: from it, they come again and no marker.
        stream = user.notifications(marker.cursor)
        assert [n.room_id for n in await _read(stream, MOST)] == [n.room_id for n in kept]
        await _nothing_more(stream)
        stream.cancel()


async def test_a_client_away_past_the_records_read_back_is_told_it_missed_some(
    notifier: RunningNotifier,
) -> None:
    async with _following(notifier) as (host, user):
        cursor = await _seen(user, notifier, host)
        [old] = await _sent_while_away(notifier, host, user.user, 1)
        # Then a crowd of the user's shard is notified: more records on the user's partition than a
        # resume reads back, so `old` is out of reach.
        crowd_host = fresh_users(1)[0]
        crowd = [user.user + SHARDS * (i + 1) for i in range(SCAN + 10)]
        await import_followers(notifier.internal, crowd_host, crowd)
        async with counting_inbox(notifier.kafka, crowd) as watch:
            room = f"crowd-{uuid.uuid4().hex[:6]}"
            await start_room(notifier.kafka, room, crowd_host)
            await until(lambda: watch.delivered(room) == len(crowd), what="the crowd notified")
        [new] = await _sent_while_away(notifier, host, user.user, 1)

        stream = user.notifications(cursor.cursor)
        marker, latest = await _read(stream, 2)
        assert (marker.kind, latest.room_id) == (inbox_pb2.NOTIFICATION_KIND_MISSED, new)
        await _nothing_more(stream)
        stream.cancel()
        assert old != new


async def test_a_cursor_that_is_not_the_users_is_refused_naming_resume_cursor(
    notifier: RunningNotifier,
) -> None:
    async with _following(notifier) as (host, user):
        cursor = await _seen(user, notifier, host)
        # A user of another shard: a cursor names a place in one shard's part of the topic.
        other = client(notifier.address, user.user + 1 if (user.user + 1) % SHARDS else user.user + 2)
        try:
            for who, bad, message in (
                (user, "garbage", "resume_cursor is not a token this service made"),
                (user, cursor.cursor[:-4], "resume_cursor is not a token this service made"),
                (other, cursor.cursor, "resume_cursor belongs to another request"),
            ):
                await refused_with(who.notifications(bad).read(), grpc.StatusCode.INVALID_ARGUMENT, message)
        finally:
            await other.close()
