"""The notifications record format, and Inbox delivery and de-duplication."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from townhall.core.errors import InvalidArgument
from townhall.internal.v1 import events_pb2
from townhall.notifier.inbox import Deduper, InboxDelivery, InboxStream
from townhall.notifier.records import decode_batch, encode_batch, room_started, shard_key
from townhall.v1 import common_pb2, inbox_pb2

ROOM_STARTED = inbox_pb2.NOTIFICATION_KIND_ROOM_STARTED


def _ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def _notification(room: str = "r1") -> inbox_pb2.Notification:
    return inbox_pb2.Notification(kind=ROOM_STARTED, room_id=room, host_id=7, title="t")


def test_shard_key_is_decimal_text() -> None:
    assert shard_key(0) == b"0"
    assert shard_key(63) == b"63"


def test_encoded_batch_is_a_notification_batch_protobuf() -> None:
    ids = _ids(1, 300, 2**63 - 1)
    notification = _notification()
    value = encode_batch(notification.SerializeToString(), ids)

    parsed = events_pb2.NotificationBatch.FromString(value)
    assert parsed.notification == notification
    assert list(parsed.user_ids) == ids.tolist()
    assert (
        value
        == events_pb2.NotificationBatch(notification=notification, user_ids=ids.tolist()).SerializeToString()
    )

    decoded, decoded_ids = decode_batch(value)
    assert decoded == notification
    assert decoded_ids.dtype == np.uint64 and decoded_ids.tolist() == ids.tolist()


def test_large_batches_encode_with_multi_byte_lengths() -> None:
    ids = np.arange(1, 5001, dtype=np.uint64)
    _, decoded = decode_batch(encode_batch(_notification().SerializeToString(), ids))
    assert decoded.tolist() == ids.tolist()


def test_room_started_event_becomes_a_notification_or_is_rejected() -> None:
    room = common_pb2.Room(room_id="abc", host_id=9, title="Hi", started_at_ms=1234, version=3)
    n = room_started(events_pb2.RoomStarted(room=room))
    assert (n.kind, n.room_id, n.host_id, n.title, n.started_at_ms) == (ROOM_STARTED, "abc", 9, "Hi", 1234)
    assert n.room_version == 3  # a follower's join asks for at least this version
    with pytest.raises(InvalidArgument, match=r"room\.room_id"):
        room_started(events_pb2.RoomStarted(room=common_pb2.Room(host_id=9)))
    with pytest.raises(InvalidArgument, match=r"room\.host_id"):
        room_started(events_pb2.RoomStarted(room=common_pb2.Room(room_id="abc")))


def test_deduper_lets_each_user_through_once_per_room_and_kind() -> None:
    dedup = Deduper(max_keys=2)
    assert dedup.fresh("a", ROOM_STARTED, [1, 2]) == [1, 2]
    assert dedup.fresh("a", ROOM_STARTED, [2, 3]) == [3]
    assert dedup.fresh("a", 99, [1]) == [1]  # another kind is another notification
    # A third key evicts the least recently used one ("a", ROOM_STARTED was used before ("a", 99)).
    assert dedup.fresh("b", ROOM_STARTED, [1]) == [1]
    assert dedup.fresh("a", 99, [1]) == []
    assert dedup.fresh("a", ROOM_STARTED, [1]) == [1]


def test_hub_delivers_once_to_connected_users_only() -> None:
    hub = InboxDelivery()
    phone, laptop, other = hub.connect(5), hub.connect(5), hub.connect(64 + 5)
    notification = _notification("room-x")

    assert hub.deliver(notification, _ids(1, 5, 7, 69)) == 2
    assert hub.deliver(notification, _ids(5, 69)) == 0  # the replayed record
    assert [len(s._queue) for s in (phone, laptop, other)] == [1, 1, 1]

    hub.disconnect(laptop)
    hub.disconnect(laptop)
    assert sorted(hub.present(_ids(5, 69))) == [5, 69]
    hub.disconnect(phone)
    assert hub.present(_ids(5, 69)) == [69]


def test_hub_finds_few_connected_users_in_a_big_batch() -> None:
    hub = InboxDelivery()
    hub.connect(123_457)
    batch = np.arange(100_000, 200_000, dtype=np.uint64)
    assert hub.present(batch) == [123_457]
    assert hub.present(_ids(1, 2)) == []


async def test_subscriber_drops_oldest_when_full_and_ends_after_close() -> None:
    sub = InboxStream(1, capacity=2)
    for room in ("a", "b", "c"):
        sub.put(_notification(room))
    assert sub.dropped == 1
    sub.close()
    got = [await asyncio.wait_for(sub.get(), 1) for _ in range(3)]
    assert [n.room_id if n else None for n in got] == ["b", "c", None]


async def test_subscriber_wakes_a_waiting_reader() -> None:
    sub = InboxStream(1)
    waiting = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    sub.put(_notification("late"))
    got = await asyncio.wait_for(waiting, 1)
    assert got is not None and got.room_id == "late"
