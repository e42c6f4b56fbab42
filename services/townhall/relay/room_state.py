"""The relay's copy of the rooms: the room-state topic read to its end before serving, then followed.

Every version goes to the Guard, which ends the streams it revokes (a removed, banned or demoted user's,
or all of an ended room's) on this relay, whether it is the room's origin or an edge. A record that does
not parse, is out of range, or was not written by an admission process is skipped and counted
(core/records.py, core/room_records.py).
"""

from __future__ import annotations

import time

from aiokafka import TopicPartition

from townhall.core import logging
from townhall.core.config import AuthConfig, KafkaConfig
from townhall.core.kafka import Follower, read_to_end
from townhall.core.records import STALE, Record, skipped
from townhall.core.room_records import AnyOwner, RoomRecords
from townhall.relay import metrics
from townhall.relay.guard import Guard, Watch

log = logging.get(__name__)


class RoomStateFollower:
    """Feeds the Guard every room version from Kafka."""

    def __init__(self, kafka: KafkaConfig, auth: AuthConfig, guard: Guard) -> None:
        self._kafka = kafka
        # A relay does not know the admission members: any admission process may own a room.
        self._records = RoomRecords(kafka, auth, AnyOwner())
        self._topic = self._records.topic
        self._guard = guard
        self._ends: dict[TopicPartition, int] = {}
        self._follower: Follower | None = None

    async def load(self) -> None:
        """Reads the topic to its end, so a ban recorded before this relay started holds from its start."""
        self._ends = await read_to_end(self._kafka, self._topic, self._apply)  # nothing to cut yet
        log.info("room rules read from kafka", rooms=self._guard.rooms)

    async def follow(self) -> None:
        """Keeps applying new versions from where `load` stopped."""
        self._follower = Follower(self._kafka, self._ends, self._record, "room-rules")
        await self._follower.start()

    async def close(self) -> None:
        """Stops following."""
        if self._follower is not None:
            await self._follower.close()

    def _apply(self, record: Record) -> list[tuple[Watch, str]]:
        if record.value is None:
            # An ended room deleted once its tickets expired (admission's retention): forget its rules.
            room_id = self._records.deleted(record)
            if room_id:
                self._guard.forget(room_id)
            return []
        room = self._records.read(record)
        if room is None:
            return []
        held = self._guard.rules(room.room_id)
        if held is not None and held.version > room.version:
            skipped(record, STALE, f"room {room.room_id} version {room.version} is older than {held.version}")
            return []
        return self._guard.apply(room)

    def _record(self, record: Record) -> None:
        cut = self._apply(record)
        if not cut:
            return
        delay_s = max(0.0, time.time() - record.timestamp / 1000)
        metrics.REVOCATION_DELAY.observe(delay_s)
        for watch, reason in cut:
            metrics.STREAMS_REVOKED.labels(reason).inc()
            log.info(
                "stream revoked",
                room=watch.room_id,
                user=watch.user_id,
                stream=watch.kind,
                reason=reason,
            )
