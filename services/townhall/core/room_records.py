"""The room-state topic as every reader reads it (admission's replica, the relays' moderation).

A Room record takes effect only if it is signed by an admission process (core/provenance.py), keyed by
the room it holds, within what a room may hold (core/validation.py, stored_room) and written by a
writer the reader takes for the room's owner (`Ownership`). What "owner" can mean to a reader of a log:
the reader did not see the writer's view of membership when the record was written, and a compacted
topic replays records whose writers may have left long ago, so a reader cannot judge a record by who
owns the room *now* without refusing legitimate history. What it can check consistently on every
reader, today, is the writer's role and, where the members are configured, that the writer is one of
them (`ListedOwners`). Fenced ownership (issue 13) plugs in here: the owner's fencing epoch goes into the
signed writer header, and an Ownership that keeps the highest epoch seen per room refuses records of a
lower one, the same way on every reader and on every replay.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from townhall.core import validation
from townhall.core.config import AuthConfig, KafkaConfig
from townhall.core.kafka import Topics, reader
from townhall.core.provenance import Writer
from townhall.core.records import FORGED, INVALID, BadRecord, Record
from townhall.v1.common_pb2 import Room


class Ownership(Protocol):
    """Whether a reader takes `writer` (None: an unsigned record, accepted during a migration) for the
    owner of `room` when the record was written."""

    def allows(self, room: Room, writer: Writer | None) -> bool: ...


class AnyOwner:
    """Any admission process that may own rooms (its role is checked by the Reader): readers that do
    not know the admission members (relays)."""

    def allows(self, room: Room, writer: Writer | None) -> bool:
        """Always: the role check is all this reader can make."""
        return True


class ListedOwners:
    """One of the configured admission members (admission.members): a crowd-lane process, or one that
    is not a member, writes nothing any reader applies."""

    def __init__(self, members: Collection[str]) -> None:
        self._members = frozenset(members)

    def allows(self, room: Room, writer: Writer | None) -> bool:
        """Whether the writer is a listed member (an unsigned record has no writer to check)."""
        return writer is None or writer.member in self._members


class RoomRecords:
    """Reads Room records of the room-state topic for one process."""

    def __init__(self, kafka: KafkaConfig, auth: AuthConfig, ownership: Ownership) -> None:
        self.topic = Topics(kafka.topic_prefix).room_state
        self._reader = reader(kafka, auth, self.topic)
        self._ownership = ownership

    def read(self, record: Record) -> Room | None:
        """The record's room version, or None (skipped and counted: core/records.py)."""
        return self._reader.read(record, self._parse)

    def deleted(self, record: Record) -> str | None:
        """The room a tombstone deletes (an ended room whose retention is over), or None (skipped and
        counted): signed by an owner like any room version, keyed by a room id."""
        return self._reader.deleted(record, self._deletion)

    def _deletion(self, record: Record, writer: Writer | None) -> str:
        room_id = validation.room_id((record.key or b"").decode(), "key")
        if not self._ownership.allows(Room(room_id=room_id), writer):
            raise BadRecord(FORGED, f"{writer} is not an owner of room {room_id} as this reader knows it")
        return room_id

    def _parse(self, record: Record, writer: Writer | None) -> Room:
        room = Room.FromString(record.value or b"")
        validation.stored_room(room)
        if record.key != room.room_id.encode():
            raise BadRecord(INVALID, f"the record's key is not the id of the room it holds ({room.room_id})")
        if not self._ownership.allows(room, writer):
            raise BadRecord(
                FORGED, f"{writer} is not an owner of room {room.room_id} as this reader knows it"
            )
        return room
