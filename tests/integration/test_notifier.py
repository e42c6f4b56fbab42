"""Single notifier process on loopback with the real Kafka broker: follow, room started, Inbox."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import REGISTRY

from tests.integration.helpers import metadata
from townhall.core import server
from townhall.core.config import DEV_ENV, KafkaConfig, load
from townhall.core.kafka import Topics, end_offsets, producer
from townhall.notifier.app import NotifierApp, build_app
from townhall.notifier.records import decode_batch
from townhall.v1 import graph_pb2, graph_pb2_grpc, inbox_pb2, inbox_pb2_grpc
from townhall_tools.devtools.events import publish_room_started

pytestmark = pytest.mark.kafka

WAIT_S = 20.0
ROOM_STARTED = inbox_pb2.NOTIFICATION_KIND_ROOM_STARTED


@dataclass
class Notifier:
    """A running notifier and a client channel to it."""

    app: NotifierApp
    running: server.Running
    channel: grpc.aio.Channel

    @property
    def graph(self) -> graph_pb2_grpc.GraphStub:
        return graph_pb2_grpc.GraphStub(self.channel)

    @property
    def inbox(self) -> inbox_pb2_grpc.InboxStub:
        return inbox_pb2_grpc.InboxStub(self.channel)

    async def stop(self) -> None:
        await self.channel.close()
        await server.stop(self.app, self.running, 1.0)


async def start_notifier(kafka: KafkaConfig, data_dir: Path, group: str = "") -> Notifier:
    """A notifier with its own store folder and (unless given) its own consumer group, on a free port."""
    config = load(
        env={
            **DEV_ENV,
            "TOWNHALL_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "TOWNHALL_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
            "TOWNHALL_NOTIFIER_DATA_DIR": str(data_dir),
            "TOWNHALL_NOTIFIER_GROUP_ID": group or f"test-notifier-{uuid.uuid4().hex[:8]}",
            "TOWNHALL_NOTIFIER_METRICS_PORT": "0",
            "TOWNHALL_NOTIFIER_BATCH_USERS": "2",
        }
    )
    app = build_app(config)
    try:
        running = await asyncio.wait_for(server.start(app, config, "127.0.0.1:0"), WAIT_S)
    except BaseException:
        await app.close()
        raise
    return Notifier(app, running, grpc.aio.insecure_channel(f"127.0.0.1:{running.port}"))


@pytest.fixture(scope="module")
async def notifier(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Notifier]:
    n = await start_notifier(kafka, tmp_path_factory.mktemp("notifier"))
    try:
        yield n
    finally:
        await n.stop()


@pytest.fixture(scope="module")
async def kafka_producer(kafka: KafkaConfig) -> AsyncIterator[AIOKafkaProducer]:
    p = producer(kafka, "test-notifier")
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


def users(n: int) -> list[int]:
    """`n` fresh user ids, so tests sharing the broker's topics never see each other's users."""
    base = random.randrange(1, 2**62)
    return [base + i for i in range(n)]


def new_room() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@dataclass
class Inbox:
    """One connected Inbox stream and what it has received so far."""

    call: grpc.aio.UnaryStreamCall[inbox_pb2.InboxSubscribeRequest, inbox_pb2.Notification]
    got: list[inbox_pb2.Notification] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def for_room(self, room: str) -> list[inbox_pb2.Notification]:
        return [n for n in self.got if n.room_id == room]


@contextlib.asynccontextmanager
async def connected(n: Notifier, *user_ids: int) -> AsyncIterator[list[Inbox]]:
    """Inbox streams for `user_ids`, each registered by the server before this yields."""
    inboxes = [
        Inbox(n.inbox.Subscribe(inbox_pb2.InboxSubscribeRequest(), metadata=metadata(u))) for u in user_ids
    ]

    async def collect(inbox: Inbox) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for notification in inbox.call:
                inbox.got.append(notification)

    try:
        for inbox in inboxes:
            await asyncio.wait_for(inbox.call.initial_metadata(), WAIT_S)
            inbox.task = asyncio.create_task(collect(inbox))
        yield inboxes
    finally:
        for inbox in inboxes:
            inbox.call.cancel()
            if inbox.task is not None:
                await asyncio.wait_for(inbox.task, WAIT_S)


@contextlib.asynccontextmanager
async def notifications_topic(kafka: KafkaConfig) -> AsyncIterator[AIOKafkaConsumer]:
    """A group-less reader of the notifications topic, positioned at its current end."""
    topic = Topics(kafka.topic_prefix).notifications
    positions = await end_offsets(kafka, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(positions))
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        yield consumer
    finally:
        await consumer.stop()


async def read_room_records(
    consumer: AIOKafkaConsumer, room: str, done: Callable[[list[tuple[bytes, np.ndarray]]], bool]
) -> list[tuple[bytes, np.ndarray]]:
    """(key, user ids) of the room's notification records, read until `done` holds."""
    seen: list[tuple[bytes, np.ndarray]] = []

    async def read() -> None:
        while not done(seen):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    notification, ids = decode_batch(record.value or b"")
                    if notification.room_id == room:
                        seen.append((record.key or b"", ids))

    await asyncio.wait_for(read(), WAIT_S)
    return seen


def covered(records: list[tuple[bytes, np.ndarray]]) -> list[int]:
    return sorted(int(u) for _, ids in records for u in ids)


async def follow(n: Notifier, follower: int, followee: int) -> bool:
    request = graph_pb2.FollowRequest(followee_id=followee)
    response = await n.graph.Follow(request, metadata=metadata(follower), timeout=WAIT_S)
    return response.created


async def count(n: Notifier, user: int) -> int:
    request = graph_pb2.CountFollowersRequest(user_id=user)
    response = await n.graph.CountFollowers(request, metadata=metadata(user), timeout=WAIT_S)
    return response.count


def duplicates_dropped() -> float:
    return REGISTRY.get_sample_value("townhall_notifier_duplicates_dropped_total") or 0.0


async def until(condition: Callable[[], bool]) -> None:
    """Polls `condition` (state with no event to wait on) until it holds, within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {WAIT_S} s")
        await asyncio.sleep(0.05)


async def test_connected_followers_get_one_notification_and_the_topic_covers_all(
    notifier: Notifier, kafka: KafkaConfig, kafka_producer: AIOKafkaProducer
) -> None:
    host, a, b, c = users(4)
    for follower in (a, b, c):
        assert await follow(notifier, follower, host) is True
    room = new_room()

    async with notifications_topic(kafka) as topic, connected(notifier, a, b) as (inbox_a, inbox_b):
        await publish_room_started(kafka_producer, kafka, room, host, "Friday AMA")
        records = await read_room_records(topic, room, lambda seen: len(covered(seen)) >= 3)
        await until(lambda: bool(inbox_a.for_room(room) and inbox_b.for_room(room)))
        await asyncio.sleep(0.3)  # room for a wrong second delivery to show up

    assert covered(records) == sorted([a, b, c])
    for key, ids in records:
        assert {int(u) % 64 for u in ids} == {int(key)}, "a record holds users of the shard in its key"
        assert len(ids) <= 2  # notifier.batch_users
    for inbox in (inbox_a, inbox_b):
        [notification] = inbox.for_room(room)
        assert notification.kind == ROOM_STARTED
        assert (notification.room_id, notification.host_id, notification.title) == (room, host, "Friday AMA")
        assert notification.started_at_ms > 0


async def test_a_replayed_room_started_notifies_each_connected_user_once(
    notifier: Notifier, kafka: KafkaConfig, kafka_producer: AIOKafkaProducer
) -> None:
    host, a, b = users(3)
    for follower in (a, b):
        await follow(notifier, follower, host)
    room = new_room()
    before = duplicates_dropped()

    async with notifications_topic(kafka) as topic, connected(notifier, a, b) as inboxes:
        await publish_room_started(kafka_producer, kafka, room, host, "twice")
        await publish_room_started(kafka_producer, kafka, room, host, "twice")
        # Both events fanned out: every follower appears in the topic twice.
        records = await read_room_records(topic, room, lambda seen: len(covered(seen)) >= 4)
        await until(lambda: duplicates_dropped() - before >= 2)

    assert covered(records) == sorted([a, a, b, b])
    assert [len(inbox.for_room(room)) for inbox in inboxes] == [1, 1]


async def test_follower_graph_survives_a_restart(kafka: KafkaConfig, tmp_path: Path) -> None:
    host, a, b, c = users(4)
    first = await start_notifier(kafka, tmp_path)
    try:
        for follower in (a, b, c):
            await follow(first, follower, host)
        await first.graph.Unfollow(
            graph_pb2.UnfollowRequest(followee_id=host), metadata=metadata(c), timeout=WAIT_S
        )
        assert await count(first, host) == 2
        stream = first.inbox.Subscribe(inbox_pb2.InboxSubscribeRequest(), metadata=metadata(a))
        await asyncio.wait_for(stream.initial_metadata(), WAIT_S)
        await first.app.drain()  # what SIGTERM does first: connected streams end cleanly
        assert await asyncio.wait_for(stream.code(), WAIT_S) == grpc.StatusCode.OK
    finally:
        await first.stop()

    second = await start_notifier(kafka, tmp_path)
    try:
        assert await count(second, host) == 2
        assert await follow(second, a, host) is False, "the edge is still there"
    finally:
        await second.stop()


async def test_a_room_started_while_the_notifier_is_down_is_fanned_out_when_it_is_back(
    kafka: KafkaConfig, kafka_producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    host, a, b = users(3)
    group = f"test-notifier-{uuid.uuid4().hex[:8]}"
    first = await start_notifier(kafka, tmp_path, group)
    try:
        for follower in (a, b):
            await follow(first, follower, host)
    finally:
        await first.stop()
    room = new_room()

    async with notifications_topic(kafka) as topic:
        await publish_room_started(kafka_producer, kafka, room, host, "while you were away")
        second = await start_notifier(kafka, tmp_path, group)
        try:
            records = await read_room_records(topic, room, lambda seen: len(covered(seen)) >= 2)
        finally:
            await second.stop()

    # At-least-once: a task replayed across a consumer rebalance may repeat records on the topic
    # (gateways and the Inbox de-duplicate by room, kind and user); every follower must be covered.
    assert sorted(set(covered(records))) == sorted([a, b])


@pytest.mark.parametrize(
    ("followee", "caller_meta", "code", "words"),
    [
        (0, "self", grpc.StatusCode.INVALID_ARGUMENT, "followee_id"),
        (2**63, "self", grpc.StatusCode.INVALID_ARGUMENT, "followee_id"),
        (2**64 - 1, "self", grpc.StatusCode.INVALID_ARGUMENT, "followee_id"),
        ("self", "self", grpc.StatusCode.INVALID_ARGUMENT, "themselves"),
        (5, None, grpc.StatusCode.UNAUTHENTICATED, "authorization is required"),
        (5, "Bearer abc", grpc.StatusCode.UNAUTHENTICATED, "not a JWT"),
        (5, "user 7", grpc.StatusCode.UNAUTHENTICATED, "must be 'Bearer <JWT>'"),
    ],
)
async def test_bad_follow_requests_are_refused_with_a_clear_status(
    notifier: Notifier, followee: int | str, caller_meta: str | None, code: grpc.StatusCode, words: str
) -> None:
    [me] = users(1)
    followee_id = me if followee == "self" else int(followee)
    meta: tuple[tuple[str, str], ...] = ()
    if caller_meta == "self":
        meta = metadata(me)
    elif caller_meta is not None:
        meta = (("authorization", caller_meta),)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await notifier.graph.Follow(
            graph_pb2.FollowRequest(followee_id=followee_id), metadata=meta, timeout=WAIT_S
        )

    assert info.value.code() == code
    assert words in (info.value.details() or "")


async def test_bad_ids_on_count_and_inbox(notifier: Notifier) -> None:
    [me] = users(1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await notifier.graph.CountFollowers(
            graph_pb2.CountFollowersRequest(user_id=0), metadata=metadata(me), timeout=WAIT_S
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id" in (info.value.details() or "")

    call = notifier.inbox.Subscribe(inbox_pb2.InboxSubscribeRequest(), timeout=WAIT_S)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
