"""Leaves on a relay: a listener who gave its seat back (Admission.Leave) loses its older tickets here.

Admission records a listener's Leave on the presence topic, addressed to the relays its tickets were for,
with the time it left; this relay follows the topic from its end (from when it starts serving) and hands
each leave addressed to it to the Guard, which ends the listener's streams opened with older tickets and
refuses those tickets from then on. No call per join or per chunk: only leaves are looked at. A leave
takes effect only if an admission process signed it and it is well formed (core/records.py): a forged
one would cut any listener off.
"""

from __future__ import annotations

import time
from typing import TypeGuard

from townhall.core import logging, validation
from townhall.core.config import AuthConfig, KafkaConfig
from townhall.core.kafka import Follower, Topics, follow_from_end, reader
from townhall.core.provenance import Writer
from townhall.core.records import INVALID, BadRecord, Record
from townhall.internal.v1.events_pb2 import PresenceEvent
from townhall.relay import metrics
from townhall.relay.guard import Guard

log = logging.get(__name__)

# A leave stamped further ahead of this relay's clock counts as made now (a clock that is wrong, or a
# record that is, must not void a user's tickets for the future).
MAX_AHEAD_MS = 60_000
# Users one presence record holds at most (admission/presence.py's MAX_BATCH).
MAX_USERS = 8192


class LeaveFollower:
    """Feeds the Guard the leaves addressed to this relay (or to every relay)."""

    def __init__(self, kafka: KafkaConfig, auth: AuthConfig, guard: Guard, relay: str) -> None:
        self._kafka = kafka
        self._topic = Topics(kafka.topic_prefix).presence
        self._reader = reader(kafka, auth, self._topic)
        self._guard = guard
        self._relay = relay
        self._follower: Follower | None = None

    async def start(self) -> None:
        """Follows the presence topic from its current end."""
        self._follower = await follow_from_end(self._kafka, self._topic, self._record, "leaves")

    async def close(self) -> None:
        """Stops following."""
        if self._follower is not None:
            await self._follower.close()

    def _record(self, record: Record) -> None:
        event = self._reader.read(record, leave_record)
        if not is_leave(event) or event.relay not in ("", self._relay):
            return
        now_ms = time.time_ns() // 1_000_000
        latest = now_ms + MAX_AHEAD_MS
        leaves = [
            (user, min(at_ms, latest)) for user, at_ms in zip(event.user_ids, event.left_at_ms, strict=True)
        ]
        cut = self._guard.left(event.room_id, leaves, now_ms)
        metrics.LEAVES.set(self._guard.leaves)
        for watch, reason in cut:
            metrics.STREAMS_REVOKED.labels(reason).inc()
            log.info(
                "stream revoked", room=watch.room_id, user=watch.user_id, stream=watch.kind, reason=reason
            )


def is_leave(event: PresenceEvent | None) -> TypeGuard[PresenceEvent]:
    """Whether a presence record is a leave that voids tickets (joins and plain leaves are not)."""
    return event is not None and event.kind == PresenceEvent.KIND_LEAVE and bool(event.left_at_ms)


def leave_record(record: Record, _writer: Writer | None) -> PresenceEvent:
    """A presence record, checked when it is a leave that voids tickets: a room, valid users, a time each."""
    event = PresenceEvent.FromString(record.value or b"")
    if not is_leave(event):
        return event  # nothing on a relay acts on it
    validation.room_id(event.room_id, "room_id")
    validation.user_ids(event.user_ids, "user_ids", MAX_USERS)
    if event.relay:
        validation.address(event.relay, "relay")
    if len(event.left_at_ms) != len(event.user_ids):
        raise BadRecord(INVALID, "left_at_ms does not match user_ids")
    return event
