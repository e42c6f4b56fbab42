"""The notifier's record formats: room-started events in, FanoutTask and NotificationBatch records out,
and the checks each record passes before it is acted on (core/records.py's policy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from townhall.core import validation
from townhall.core.errors import InvalidArgument
from townhall.core.provenance import Writer
from townhall.core.records import INVALID, BadRecord, Record
from townhall.core.wire import read_varint, varint
from townhall.internal.v1 import events_pb2
from townhall.notifier.blocks import BLOCK_IDS
from townhall.v1 import inbox_pb2

SHARDS = 64
# Users one notification record may name (notifier.batch_users is at most this), and a task id's length.
MAX_BATCH_USERS = 100_000
MAX_TASK_ID = 128

# Wire tags of NotificationBatch: field 1 (notification) and field 2 (packed user_ids), both
# length-delimited. See encode_batch for why the value is assembled by hand.
_TAG_NOTIFICATION = b"\x0a"
_TAG_USER_IDS = b"\x12"
# The kinds a record may carry (MISSED is the Inbox's own marker, never sent through Kafka).
_RECORD_KINDS = frozenset({inbox_pb2.NOTIFICATION_KIND_ROOM_STARTED})


def shard_of(user_id: int) -> int:
    """The user shard (0..63) that keys a user's notification records."""
    return user_id % SHARDS


def shard_key(shard: int) -> bytes:
    """The record key for a user shard: the shard number as decimal text."""
    return str(shard).encode("ascii")


def key_shard(key: bytes | None) -> int:
    """The user shard a notifications record's key names (shard_key's text), or InvalidArgument."""
    text = (key or b"").decode("ascii", "replace")
    if not text.isdecimal() or len(text) > 2 or shard_key(int(text)) != key or int(text) >= SHARDS:
        raise InvalidArgument(f"record key {text[:20]!r} is not a user shard (0..{SHARDS - 1})", "key")
    return int(text)


def room_started(event: events_pb2.RoomStarted) -> inbox_pb2.Notification:
    """The notification followers get for a started room; InvalidArgument if the event is unusable."""
    room = event.room
    validation.room_id(room.room_id, "room.room_id")
    validation.user_id(room.host_id, "room.host_id")
    if len(room.title) > validation.TITLE_MAX:
        raise InvalidArgument(f"room.title is longer than {validation.TITLE_MAX} characters", "room.title")
    if room.started_at_ms < 0:
        raise InvalidArgument("room.started_at_ms must not be negative", "room.started_at_ms")
    return inbox_pb2.Notification(
        kind=inbox_pb2.NOTIFICATION_KIND_ROOM_STARTED,
        room_id=room.room_id,
        host_id=room.host_id,
        title=room.title,
        started_at_ms=room.started_at_ms,
        crowd=room.crowd,
        room_version=room.version,
    )


def encode_batch(notification: bytes, user_ids: np.ndarray) -> bytes:
    """A serialised NotificationBatch for already-serialised `notification` and uint64 `user_ids`.

    Packed fixed64 is exactly the ids' little-endian bytes, so the array is copied in one go
    instead of becoming a Python int per follower; protobuf parses the result as usual.
    """
    out = [_TAG_NOTIFICATION, varint(len(notification)), notification]
    if len(user_ids):
        payload = np.ascontiguousarray(user_ids, dtype="<u8").tobytes()
        out += [_TAG_USER_IDS, varint(len(payload)), payload]
    return b"".join(out)


def decode_batch(value: bytes) -> tuple[inbox_pb2.Notification, np.ndarray]:
    """The notification and uint64 user ids of a record; DecodeError if it is not a NotificationBatch."""
    fields = _parse(value, packed=2)
    notification = inbox_pb2.Notification.FromString(fields.get(1, b""))
    return notification, fields.get(2, _NO_IDS)


def encode_task(
    task_id: str, notification: bytes, index: int, part_users: int, ids: np.ndarray, at_ms: int
) -> bytes:
    """A serialised FanoutTask (assembled by hand for the same reason as encode_batch)."""
    tid = task_id.encode()
    out = [b"\x0a", varint(len(tid)), tid, b"\x12", varint(len(notification)), notification]
    out += [b"\x18", varint(index), b"\x20", varint(part_users)]
    if len(ids):
        payload = np.ascontiguousarray(ids, dtype="<u8").tobytes()
        out += [b"\x2a", varint(len(payload)), payload]
    out += [b"\x30", varint(at_ms)]
    return b"".join(out)


@dataclass(frozen=True)
class Task:
    """A decoded FanoutTask: the notification stays serialised (workers copy it into records)."""

    task_id: str
    notification: bytes
    user_ids: np.ndarray
    planned_at_ms: int


def decode_task(value: bytes) -> Task:
    """A FanoutTask record value; DecodeError if malformed."""
    fields = _parse(value, packed=5)
    tid = fields.get(1, b"")
    assert isinstance(tid, bytes)
    note = fields.get(2, b"")
    assert isinstance(note, bytes)
    at = fields.get(6, 0)
    return Task(tid.decode(errors="replace"), note, fields.get(5, _NO_IDS), int(at))


_NO_IDS = np.empty(0, dtype=np.uint64)


def room_started_record(record: Record, _writer: Writer | None) -> events_pb2.RoomStarted:
    """A room-started record's event, checked: keyed by its host, a room a notification can be made of."""
    event = events_pb2.RoomStarted.FromString(record.value or b"")
    room_started(event)
    if record.key != str(event.room.host_id).encode():
        raise BadRecord(INVALID, f"the record's key is not the room's host ({event.room.host_id})")
    return event


def task_record(record: Record, _writer: Writer | None) -> Task:
    """A fan-out task record, checked: keyed by its id, a valid notification, at most a block of users."""
    task = decode_task(record.value or b"")
    if not 0 < len(task.task_id) <= MAX_TASK_ID or record.key != task.task_id.encode():
        raise BadRecord(INVALID, "the task id is empty, too long, or not the record's key")
    notification(inbox_pb2.Notification.FromString(task.notification))
    user_ids(task.user_ids, "user_ids", BLOCK_IDS)
    return task


def batch_record(record: Record, _writer: Writer | None) -> tuple[inbox_pb2.Notification, np.ndarray]:
    """A notifications record, checked (checked_batch, and its key a user shard)."""
    key_shard(record.key)
    return checked_batch(*decode_batch(record.value or b""))


def checked_batch(note: inbox_pb2.Notification, ids: np.ndarray) -> tuple[inbox_pb2.Notification, np.ndarray]:
    """A decoded notifications record that may be delivered: a valid notification, valid user ids."""
    return notification(note), user_ids(ids, "user_ids", MAX_BATCH_USERS)


def notification(note: inbox_pb2.Notification) -> inbox_pb2.Notification:
    """A notification as a record carries it: a known kind, a room id, a host, a title of bounded length."""
    if note.kind not in _RECORD_KINDS:
        raise InvalidArgument(
            f"notification.kind {note.kind} is not a notification kind", "notification.kind"
        )
    validation.room_id(note.room_id, "notification.room_id")
    validation.user_id(note.host_id, "notification.host_id")
    if len(note.title) > validation.TITLE_MAX:
        raise InvalidArgument(
            f"notification.title is longer than {validation.TITLE_MAX} characters", "notification.title"
        )
    return note


def user_ids(ids: np.ndarray, field: str, limit: int) -> np.ndarray:
    """uint64 user ids, each within 1..2^63-1 and at most `limit` of them (checked without a loop)."""
    if len(ids) > limit:
        raise InvalidArgument(f"{field} has {len(ids)} entries; at most {limit} allowed", field)
    if len(ids) and (int(ids.min()) == 0 or int(ids.max()) > validation.USER_ID_MAX):
        raise InvalidArgument(f"{field} holds an id outside 1..{validation.USER_ID_MAX}", field)
    return ids


def _parse(value: bytes, packed: int) -> dict[int, Any]:
    """Top-level fields of a protobuf message: varints as int, length-delimited as bytes, and the
    `packed` repeated fixed64 field as a uint64 array read straight from the buffer."""
    out: dict[int, Any] = {}
    ids: list[np.ndarray] = []
    singles: list[int] = []
    pos, end = 0, len(value)
    view = memoryview(value)
    try:
        while pos < end:
            tag, pos = read_varint(value, pos)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                out[field], pos = read_varint(value, pos)
            elif wire == 2:
                size, pos = read_varint(value, pos)
                if pos + size > end:
                    raise DecodeError("truncated field")
                if field == packed:
                    if size % 8:
                        raise DecodeError("packed fixed64 field is not a multiple of 8 bytes")
                    ids.append(np.frombuffer(view[pos : pos + size], dtype="<u8").astype(np.uint64))
                else:
                    out[field] = bytes(view[pos : pos + size])
                pos += size
            elif wire == 1:
                if pos + 8 > end:
                    raise DecodeError("truncated fixed64")
                if field == packed:
                    singles.append(int.from_bytes(value[pos : pos + 8], "little"))
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                raise DecodeError(f"unsupported wire type {wire}")
    except IndexError as exc:
        raise DecodeError("truncated message") from exc
    if singles:
        ids.append(np.array(singles, dtype=np.uint64))
    if ids:
        out[packed] = ids[0] if len(ids) == 1 else np.concatenate(ids)
    return out
