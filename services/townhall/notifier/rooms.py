"""The notifier's view of the rooms: which exist and whether they have started or ended.

Read from the room-state topic to its end before serving, then followed, like every admission process
and relay. RemindMe takes reminders only for rooms that exist and have not started, and reminders of
rooms that ended (or were deleted) are released (`Reminders`).
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import ConsumerRecord
from google.protobuf.message import DecodeError

from townhall.core import logging
from townhall.core.config import KafkaConfig
from townhall.core.errors import FailedPrecondition, NotFound
from townhall.core.kafka import Topics, follow, read_to_end
from townhall.core.tasks import Ticker, cancel
from townhall.notifier.store import SqliteFollowerStore
from townhall.v1.common_pb2 import Room, RoomState

log = logging.get(__name__)

# A room id this process has not read yet is looked for again this long (the replica is a fetch behind
# the admission process that created it) before it is NOT_FOUND.
MISS_WAIT_S = 0.5
MISS_POLL_S = 0.05
PENDING = (RoomState.ROOM_STATE_CREATED, RoomState.ROOM_STATE_SCHEDULED)


class RoomStates:
    """Room id -> its state, for every room on the room-state topic."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self._kafka = kafka
        self._topic = Topics(kafka.topic_prefix).room_state
        self._states: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._states)

    async def start(self) -> None:
        """Reads the topic to its end, then follows it."""
        ends = await read_to_end(self._kafka, self._topic, self._apply)
        log.info("rooms read from kafka", rooms=len(self._states))
        self._task = asyncio.create_task(follow(self._kafka, ends, self._record), name="notifier-rooms")

    async def close(self) -> None:
        """Stops following."""
        await cancel(self._task)

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
            raise NotFound(f"room {room_id} does not exist")
        if state == RoomState.ROOM_STATE_LIVE:
            raise FailedPrecondition(f"room {room_id} is live already: join it")
        if state not in PENDING:
            raise FailedPrecondition(f"room {room_id} has ended")

    def released(self, room_ids: list[str]) -> list[str]:
        """Those of `room_ids` that ended or no longer exist."""
        live = (*PENDING, RoomState.ROOM_STATE_LIVE)
        return [room_id for room_id in room_ids if self._states.get(room_id) not in live]

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if not value:
            if key:
                self._states.pop(key.decode("utf-8", "replace"), None)
            return
        try:
            room = Room.FromString(value)
        except DecodeError as exc:
            log.warning("bad room-state record", topic=self._topic, error=str(exc))
            return
        self._states[room.room_id] = room.state

    def _record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        self._apply(record.key, record.value)


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
