"""The notifier's view of the rooms: which exist and whether they have started or ended.

Read from the room-state topic to its end before serving, then followed, like every admission process
and relay, under the same checks (core/room_records.py). RemindMe takes reminders only for rooms that
exist and have not started, and reminders of rooms that ended (or were deleted) are released
(`Reminders`).
"""

from __future__ import annotations

import asyncio
import time

from townhall.core import logging
from townhall.core.config import AuthConfig, KafkaConfig
from townhall.core.errors import FailedPrecondition, NotFound, Reason
from townhall.core.kafka import Follower, read_to_end
from townhall.core.records import Record
from townhall.core.room_records import AnyOwner, RoomRecords
from townhall.core.tasks import Ticker
from townhall.notifier.store import SqliteFollowerStore
from townhall.v1.common_pb2 import RoomState

log = logging.get(__name__)

# A room id this process has not read yet is looked for again this long (the replica is a fetch behind
# the admission process that created it) before it is NOT_FOUND.
MISS_WAIT_S = 0.5
MISS_POLL_S = 0.05
PENDING = (RoomState.ROOM_STATE_CREATED, RoomState.ROOM_STATE_SCHEDULED)


class RoomStates:
    """Room id -> its state, for every room on the room-state topic."""

    def __init__(self, kafka: KafkaConfig, auth: AuthConfig) -> None:
        self._kafka = kafka
        # The notifier does not know the admission members: any admission process may own a room.
        self._records = RoomRecords(kafka, auth, AnyOwner())
        self._topic = self._records.topic
        self._states: dict[str, int] = {}
        self._follower: Follower | None = None

    def __len__(self) -> int:
        return len(self._states)

    async def start(self) -> None:
        """Reads the topic to its end, then follows it."""
        ends = await read_to_end(self._kafka, self._topic, self._apply)
        log.info("rooms read from kafka", rooms=len(self._states))
        self._follower = Follower(self._kafka, ends, self._apply, "notifier-rooms")
        await self._follower.start()

    async def close(self) -> None:
        """Stops following."""
        if self._follower is not None:
            await self._follower.close()

    def state(self, room_id: str) -> int | None:
        """The room's state, or None if this process knows no such room."""
        return self._states.get(room_id)

    async def before_start(self, room_id: str) -> None:
        """Returns if the room exists and has not started; NOT_FOUND or FAILED_PRECONDITION saying why not."""
        state = self._states.get(room_id)
        deadline = time.monotonic() + MISS_WAIT_S
        while state is None and time.monotonic() < deadline:
            await asyncio.sleep(MISS_POLL_S)
            state = self._states.get(room_id)
        if state is None:
            raise NotFound(f"room {room_id} does not exist", reason=Reason.ROOM_NOT_FOUND)
        if state == RoomState.ROOM_STATE_LIVE:
            raise FailedPrecondition(f"room {room_id} is live already: join it")
        if state not in PENDING:
            raise FailedPrecondition(f"room {room_id} has ended", reason=Reason.ROOM_ENDED)

    def released(self, room_ids: list[str]) -> list[str]:
        """Those of `room_ids` that ended or no longer exist."""
        live = (*PENDING, RoomState.ROOM_STATE_LIVE)
        return [room_id for room_id in room_ids if self._states.get(room_id) not in live]

    def _apply(self, record: Record) -> None:
        if record.value is None:
            room_id = self._records.deleted(record)
            if room_id:
                self._states.pop(room_id, None)
            return
        room = self._records.read(record)
        if room is not None:
            self._states[room.room_id] = room.state


class Reminders(Ticker):
    """Every minute, deletes the reminders of rooms that ended or no longer exist."""

    def __init__(self, store: SqliteFollowerStore, rooms: RoomStates, every_s: float = 60.0) -> None:
        super().__init__("reminder-release", every_s)
        self._store = store
        self._rooms = rooms

    async def tick(self) -> int:
        """One round; returns the reminders deleted."""
        gone = self._rooms.released(await self._store.reminder_rooms())
        deleted = await self._store.forget_reminders(gone) if gone else 0
        if deleted:
            log.info("reminders released", rooms=len(gone), reminders=deleted)
        return deleted
