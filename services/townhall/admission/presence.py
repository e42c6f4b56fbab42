"""Join and leave events, batched: one Kafka record per room, kind and role every flush interval.

A join only appends a user id to a list (no protobuf, no Kafka call). A background task closes
the batches every `flush_s` and offers them to the bounded EventQueue. Users beyond `capacity`
waiting for a flush are dropped and counted, so a storm never grows memory or blocks a join.
"""

from __future__ import annotations

import asyncio
import time

from townhall.core.kafka import EVENTS_DROPPED, EventQueue
from townhall.core.tasks import cancel
from townhall.v1.common_pb2 import Role
from townhall.v1.events_pb2 import PresenceEvent

FLUSH_S = 0.1
# Users per record: a record stays well under Kafka's and gRPC's message limits (8 bytes a user).
MAX_BATCH = 8192

_Key = tuple["PresenceEvent.Kind.ValueType", str, "Role.ValueType"]


class Presence:
    """Batches presence events per (kind, room, role) and hands them to the event queue."""

    def __init__(
        self, events: EventQueue, topic: str, member: str, capacity: int, flush_s: float = FLUSH_S
    ) -> None:
        self._events = events
        self._topic = topic
        self._member = member
        self._capacity = capacity
        self._flush_s = flush_s
        self._pending: dict[_Key, list[int]] = {}
        self._count = 0
        self._task: asyncio.Task[None] | None = None

    def record(
        self, kind: PresenceEvent.Kind.ValueType, room_id: str, user: int, role: Role.ValueType
    ) -> None:
        """Adds one event to its batch; dropped and counted if `capacity` users are already waiting."""
        if self._count >= self._capacity:
            EVENTS_DROPPED.labels(self._topic).inc()
            return
        key = (kind, room_id, role)
        users = self._pending.get(key)
        if users is None:
            users = self._pending[key] = []
        users.append(user)
        self._count += 1

    def flush(self) -> int:
        """Offers every batch to the event queue now; returns the records offered."""
        pending, self._pending, self._count = self._pending, {}, 0
        at_ms = time.time_ns() // 1_000_000
        records = 0
        for (kind, room_id, role), users in pending.items():
            for start in range(0, len(users), MAX_BATCH):
                event = PresenceEvent(
                    kind=kind,
                    room_id=room_id,
                    role=role,
                    at_ms=at_ms,
                    member=self._member,
                    user_ids=users[start : start + MAX_BATCH],
                )
                self._events.offer(self._topic, room_id.encode(), event.SerializeToString())
                records += 1
        return records

    def start(self) -> None:
        """Starts the periodic flush."""
        self._task = asyncio.create_task(self._run(), name="presence-flush")

    async def close(self) -> None:
        """Stops the periodic flush and offers what is left (the event queue then sends it)."""
        await cancel(self._task)
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            self.flush()
