"""Listeners per room over every admission process, from the tallies they publish on the presence topic.

Each admission process knows its own seats exactly (leases.Allowance.listeners) and publishes a tally
per room when it changes (presence.py, at most once per flush) and again every TALLY_EVERY_S. Every
admission process follows the presence topic and keeps the latest tally of each other process: a room's
listeners are its own seats plus the others' latest tallies. A tally is a count, not a difference, so a
lost or repeated record never makes the sum drift: the next tally makes it good. A process that stops
publishing (it died) drops out once its latest tally is TALLY_TTL_S old.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeGuard

from townhall.core import validation
from townhall.core.config import AuthConfig, KafkaConfig
from townhall.core.kafka import Follower, Topics, follow_from_end, reader
from townhall.core.provenance import Writer
from townhall.core.records import INVALID, BadRecord, Record
from townhall.internal.v1.events_pb2 import PresenceEvent

TALLY_EVERY_S = 5.0
TALLY_TTL_S = 3 * TALLY_EVERY_S
# Admission processes whose tallies one room keeps (a sanity bound far above any deployment).
MAX_MEMBERS = 1024
MAX_MEMBER_NAME = 512


class Tallies:
    """The latest tally of each other admission process, per room (pure; times in monotonic seconds)."""

    def __init__(
        self, me: str, ttl_s: float = TALLY_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._me = me
        self._ttl_s = ttl_s
        self._clock = clock
        self._rooms: dict[str, dict[str, tuple[int, float]]] = {}

    def observe(self, room_id: str, member: str, listeners: int) -> None:
        """Takes a process's tally of a room (this process's own are ignored: its seats are exact)."""
        if member == self._me:
            return
        members = self._rooms.get(room_id)
        if members is None:
            if not listeners:
                return
            members = self._rooms[room_id] = {}
        if listeners:
            if member in members or len(members) < MAX_MEMBERS:
                members[member] = (listeners, self._clock())
        else:
            members.pop(member, None)
            if not members:
                del self._rooms[room_id]

    def listeners(self, room_id: str) -> int:
        """The room's listeners on the other processes, from their fresh tallies."""
        members = self._rooms.get(room_id)
        if not members:
            return 0
        oldest = self._clock() - self._ttl_s
        return sum(count for count, at in members.values() if at >= oldest)

    def prune(self) -> int:
        """Forgets tallies past their time; returns how many."""
        oldest = self._clock() - self._ttl_s
        dropped = 0
        for room_id, members in list(self._rooms.items()):
            for member, (_, at) in list(members.items()):
                if at < oldest:
                    del members[member]
                    dropped += 1
            if not members:
                del self._rooms[room_id]
        return dropped

    def forget(self, room_id: str) -> None:
        """Drops a room's tallies (it ended)."""
        self._rooms.pop(room_id, None)


class TallyFollower:
    """Feeds Tallies from the presence topic, from its end (tallies are repeated, so none is needed from
    before: a process that starts knows every other's within TALLY_EVERY_S)."""

    def __init__(self, kafka: KafkaConfig, auth: AuthConfig, tallies: Tallies) -> None:
        self._kafka = kafka
        self._topic = Topics(kafka.topic_prefix).presence
        self._reader = reader(kafka, auth, self._topic)
        self._tallies = tallies
        self._follower: Follower | None = None
        self._pruned = time.monotonic()

    async def start(self) -> None:
        """Follows the presence topic from its current end."""
        self._follower = await follow_from_end(self._kafka, self._topic, self._record, "tallies", gather=True)

    async def close(self) -> None:
        """Stops following."""
        if self._follower is not None:
            await self._follower.close()

    def _record(self, record: Record) -> None:
        event = self._reader.read(record, tally_record)
        if is_tally(event):
            self._tallies.observe(event.room_id, event.member, event.listeners)
        now = time.monotonic()
        if now - self._pruned >= TALLY_EVERY_S:
            self._pruned = now
            self._tallies.prune()


def is_tally(event: PresenceEvent | None) -> TypeGuard[PresenceEvent]:
    """Whether a presence record is a tally."""
    return event is not None and event.kind == PresenceEvent.KIND_TALLY


def tally_record(record: Record, _writer: Writer | None) -> PresenceEvent:
    """A presence record, checked when it is a tally: a room, a member, at most a room's listener limit."""
    event = PresenceEvent.FromString(record.value or b"")
    if is_tally(event):
        validation.room_id(event.room_id, "room_id")
        # A sum over MAX_MEMBERS processes stays far within RoomCounts.listeners (uint64).
        validation.bounded(event.listeners, "listeners", 0, validation.MAX_LISTENER_LIMIT)
        if not 0 < len(event.member) <= MAX_MEMBER_NAME:
            raise BadRecord(INVALID, f"member must be 1..{MAX_MEMBER_NAME} characters")
    return event
