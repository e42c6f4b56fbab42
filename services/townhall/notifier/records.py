"""The notifications topic record format: user-shard keys and NotificationBatch values."""

from __future__ import annotations

import numpy as np

from townhall.core import validation
from townhall.v1 import events_pb2, inbox_pb2

SHARDS = 64

# Wire tags of NotificationBatch: field 1 (notification) and field 2 (packed user_ids), both
# length-delimited. See encode_batch for why the value is assembled by hand.
_TAG_NOTIFICATION = b"\x0a"
_TAG_USER_IDS = b"\x12"


def shard_of(user_id: int) -> int:
    """The user shard (0..63) that keys a user's notification records."""
    return user_id % SHARDS


def shard_key(shard: int) -> bytes:
    """The record key for a user shard: the shard number as decimal text."""
    return str(shard).encode("ascii")


def room_started(event: events_pb2.RoomStarted) -> inbox_pb2.Notification:
    """The notification followers get for a started room; InvalidArgument if the event is unusable."""
    room = event.room
    validation.room_id(room.room_id, "room.room_id")
    validation.user_id(room.host_id, "room.host_id")
    return inbox_pb2.Notification(
        kind=inbox_pb2.NOTIFICATION_KIND_ROOM_STARTED,
        room_id=room.room_id,
        host_id=room.host_id,
        title=room.title,
        started_at_ms=room.started_at_ms,
    )


def encode_batch(notification: bytes, user_ids: np.ndarray) -> bytes:
    """A serialised NotificationBatch for already-serialised `notification` and uint64 `user_ids`.

    Packed fixed64 is exactly the ids' little-endian bytes, so the array is copied in one go
    instead of becoming a Python int per follower; protobuf parses the result as usual.
    """
    out = [_TAG_NOTIFICATION, _varint(len(notification)), notification]
    if len(user_ids):
        payload = np.ascontiguousarray(user_ids, dtype="<u8").tobytes()
        out += [_TAG_USER_IDS, _varint(len(payload)), payload]
    return b"".join(out)


def decode_batch(value: bytes) -> tuple[inbox_pb2.Notification, np.ndarray]:
    """The notification and uint64 user ids of a record; DecodeError if it is not a NotificationBatch."""
    batch = events_pb2.NotificationBatch.FromString(value)
    ids = np.fromiter(batch.user_ids, dtype=np.uint64, count=len(batch.user_ids))
    return batch.notification, ids


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
