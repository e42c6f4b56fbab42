"""Join and leave events, batched: one Kafka record per room, kind and role every flush interval.

A join only appends a user id to a list (no protobuf, no Kafka call). A background task closes
the batches and offers them to the bounded EventQueue: leaves every `flush_s` (100 ms), everything
else every `batch_s` (1 s). Users beyond `capacity` waiting for a flush are dropped and counted, so a
storm never grows memory or blocks a join.

A listener's Leave that gives a seat back is batched per relay with the time it happened: that relay
voids the listener's older tickets (relay/leaves.py), so leaves go out at the short interval.

Each `batch_s` flush also tallies this process's seats per room (`seats`): a room whose count changed
gets a KIND_TALLY record, and every room with listeners gets one again every TALLY_EVERY_S, so every
admission process can sum the rooms' listeners over all of them (tallies.py).

Why joins and tallies wait a second: every admission process and every relay reads (and checks the
signature of) every presence record. With many rooms taking joins on every process, a record per room
per 100 ms from each process made that reading grow with the square of the processes (4 processes
over 50 busy rooms: 1,000 records/s written and 3,000/s read by each); the counts they feed are
pushed to watchers once a second anyway (admission.watch_counts_s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from townhall.admission.tallies import TALLY_EVERY_S
from townhall.core.kafka import EVENTS_DROPPED, EventQueue
from townhall.core.metrics import KAFKA_PRODUCE_ERRORS, from_zero
from townhall.core.tasks import cancel, supervise
from townhall.internal.v1.events_pb2 import PresenceEvent
from townhall.v1.common_pb2 import Role

FLUSH_S = 0.1
# Joins, the other kinds and tallies: one batch per room and kind this often.
BATCH_S = 1.0
# Users per record: a record stays well under Kafka's and gRPC's message limits (8 bytes a user).
MAX_BATCH = 8192

_Key = tuple["PresenceEvent.Kind.ValueType", str, "Role.ValueType", str]


class Presence:
    """Batches presence events per (kind, room, role) and hands them to the event queue."""

    def __init__(
        self,
        events: EventQueue,
        topic: str,
        member: str,
        capacity: int,
        flush_s: float = FLUSH_S,
        seats: Callable[[], Mapping[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        batch_s: float = BATCH_S,
    ) -> None:
        self._events = events
        self._topic = topic
        from_zero(EVENTS_DROPPED, topic)
        from_zero(KAFKA_PRODUCE_ERRORS, topic)
        self._member = member
        self._capacity = capacity
        self._flush_s = flush_s
        self._batch_s = batch_s
        self._pending: dict[_Key, list[int]] = {}
        # Per batch of leaves that give seats back, when each user left (Unix ms, in user order).
        self._times: dict[_Key, list[int]] = {}
        self._count = 0
        # This process's seats per room, and the tally last offered for each room.
        self._seats = seats
        self._told: dict[str, int] = {}
        self._clock = clock
        self._told_all = clock()
        self._batched_at = clock()
        self._task: asyncio.Task[None] | None = None

    def record(
        self, kind: PresenceEvent.Kind.ValueType, room_id: str, user: int, role: Role.ValueType
    ) -> bool:
        """Adds one event to its batch; False (dropped, counted) if `capacity` users are already waiting."""
        if self._count >= self._capacity:
            EVENTS_DROPPED.labels(self._topic).inc()
            return False
        key = (kind, room_id, role, "")
        users = self._pending.get(key)
        if users is None:
            users = self._pending[key] = []
        users.append(user)
        self._count += 1
        return True

    def room_for(self, events: int) -> bool:
        """Whether `events` more fit before the next flush."""
        return self._count + events <= self._capacity

    def left(self, room_id: str, user: int, relays: list[str], at_ms: int) -> None:
        """A listener gave its seat back at `at_ms`: one leave per relay its tickets were for ("": every
        relay). Call `room_for` first: these are never dropped here."""
        for relay in relays:
            key = (PresenceEvent.KIND_LEAVE, room_id, Role.ROLE_LISTENER, relay)
            self._pending.setdefault(key, []).append(user)
            self._times.setdefault(key, []).append(at_ms)
            self._count += 1

    def flush(self) -> int:
        """Offers every batch (and the tallies due) to the event queue now; returns the records offered."""
        self._batched_at = self._clock()
        return self._offer(lambda _key: True) + self._tally(time.time_ns() // 1_000_000)

    def tick(self) -> int:
        """The periodic flush: the leaves' batches, and every other batch and the tallies when `batch_s`
        has passed since they last went; returns the records offered."""
        if self._clock() - self._batched_at >= self._batch_s:
            return self.flush()
        return self._offer(lambda key: key[0] == PresenceEvent.KIND_LEAVE)

    def _offer(self, due: Callable[[_Key], bool]) -> int:
        """Offers the batches `due` says go now; the rest keep waiting."""
        pending: dict[_Key, list[int]] = {}
        for key in [key for key in self._pending if due(key)]:
            pending[key] = self._pending.pop(key)
            self._count -= len(pending[key])
        times = {key: self._times.pop(key) for key in pending if key in self._times}
        at_ms = time.time_ns() // 1_000_000
        records = 0
        for key, users in pending.items():
            kind, room_id, role, relay = key
            left = times.get(key, ())
            for start in range(0, len(users), MAX_BATCH):
                event = PresenceEvent(
                    kind=kind,
                    room_id=room_id,
                    role=role,
                    at_ms=at_ms,
                    member=self._member,
                    user_ids=users[start : start + MAX_BATCH],
                    relay=relay,
                    left_at_ms=left[start : start + MAX_BATCH],
                )
                self._events.offer(self._topic, room_id.encode(), event.SerializeToString())
                records += 1
        return records

    def _tally(self, at_ms: int) -> int:
        """Offers the tallies that changed (and every one with listeners every TALLY_EVERY_S)."""
        if self._seats is None:
            return 0
        seats, told = self._seats(), self._told
        now = self._clock()
        again = now - self._told_all >= TALLY_EVERY_S
        if again:
            self._told_all = now
        records = 0
        for room_id in [room for room in told if room not in seats]:
            if told.pop(room_id):
                records += self._offer_tally(room_id, 0, at_ms)
        for room_id, listeners in seats.items():
            if told.get(room_id) != listeners or (again and listeners):
                told[room_id] = listeners
                records += self._offer_tally(room_id, listeners, at_ms)
        return records

    def _offer_tally(self, room_id: str, listeners: int, at_ms: int) -> int:
        event = PresenceEvent(
            kind=PresenceEvent.KIND_TALLY,
            room_id=room_id,
            at_ms=at_ms,
            member=self._member,
            listeners=listeners,
        )
        self._events.offer(self._topic, room_id.encode(), event.SerializeToString())
        return 1

    def start(self) -> None:
        """Starts the periodic flush."""
        self._task = supervise(self._run(), "presence-flush")

    async def close(self) -> None:
        """Stops the periodic flush and offers what is left (the event queue then sends it)."""
        await cancel(self._task)
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            self.tick()
