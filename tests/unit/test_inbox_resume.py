"""Inbox resume without a network: cursors name a place in one shard's part of the topic, the client keeps
the last one and shows each notification once, and the MISSED marker never travels through Kafka."""

from dataclasses import dataclass, field

import numpy as np
import pytest

from townhall.client import InboxCursor
from townhall.core.errors import InvalidArgument
from townhall.notifier.inbox_resume import checked_stamped, cursor, position
from townhall.notifier.records import SHARDS, notification, shard_key
from townhall.v1 import inbox_pb2


@dataclass
class _Record:
    topic: str = "townhall.notifications"
    partition: int = 3
    offset: int = 41
    key: bytes | None = None
    value: bytes | None = b""
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 0


_IDS = np.array([7, 7 + SHARDS], dtype=np.uint64)


def _room(room_id: str) -> inbox_pb2.Notification:
    return inbox_pb2.Notification(
        kind=inbox_pb2.NOTIFICATION_KIND_ROOM_STARTED, room_id=room_id, host_id=1, title="t"
    )


def test_a_stamped_notification_resumes_at_its_record_for_every_user_of_its_shard() -> None:
    user = 7 + 5 * SHARDS
    note, _ = checked_stamped(_Record(key=shard_key(7)), _room("abc"), _IDS, partitions=12)
    assert note.notification_id == "1.abc"
    assert position(note.cursor, user) == (12, 3, 41)
    assert position(note.cursor, 7) == (12, 3, 41)
    with pytest.raises(InvalidArgument, match="resume_cursor belongs to another request"):
        position(note.cursor, 8)
    with pytest.raises(InvalidArgument, match="resume_cursor is not a token this service made"):
        position(note.cursor[:-1], user)
    assert cursor(7, 12, 3, 41) == note.cursor


@pytest.mark.parametrize("key", [None, b"", b"64", b"-1", b"07", b"\xff", b"1e3", "\u0663".encode()])
def test_a_record_whose_key_is_not_a_user_shard_is_refused_not_stamped(key: bytes | None) -> None:
    """A signed record with a key that names no shard (the record fuzz found one) is skipped as invalid,
    not a failure of the reader that stamps its cursor."""
    with pytest.raises(InvalidArgument, match="is not a user shard"):
        checked_stamped(_Record(key=key), _room("abc"), _IDS, partitions=12)


def test_the_client_keeps_the_last_cursor_and_shows_each_notification_once() -> None:
    kept = InboxCursor(remember=2)
    first, second, third = (
        checked_stamped(_Record(key=b"1", offset=i), _room(r), _IDS, 4)[0] for i, r in enumerate("xyz")
    )
    assert [kept.fresh(n) for n in (first, second, first)] == [True, True, False]
    assert kept.cursor == first.cursor, "the cursor of the last one the stream sent"
    assert kept.fresh(third) and kept.fresh(first), "only the latest ids are remembered (bounded)"
    marker = inbox_pb2.Notification(kind=inbox_pb2.NOTIFICATION_KIND_MISSED, cursor=second.cursor)
    assert kept.fresh(marker) and kept.fresh(marker) and kept.missed == 2
    assert kept.cursor == second.cursor
    start = inbox_pb2.Notification(kind=inbox_pb2.NOTIFICATION_KIND_CONNECTED, cursor=third.cursor)
    assert kept.fresh(start) and (kept.cursor, kept.missed) == (third.cursor, 2)


def test_a_record_cannot_carry_the_missed_marker() -> None:
    assert notification(_room("ok")).room_id == "ok"
    with pytest.raises(InvalidArgument, match="not a notification kind"):
        notification(inbox_pb2.Notification(kind=inbox_pb2.NOTIFICATION_KIND_MISSED, room_id="r", host_id=1))
