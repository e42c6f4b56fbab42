"""The relay's copy of the rooms: the room-state topic read to its end before serving, then followed.

Every version goes to the Guard, which ends the streams it revokes (a removed, banned or demoted user's,
or all of an ended room's) on this relay, whether it is the room's origin or an edge.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import ConsumerRecord, TopicPartition

from townhall.core import logging
from townhall.core.config import KafkaConfig
from townhall.core.kafka import Topics, follow, read_to_end
from townhall.core.tasks import cancel
from townhall.relay import metrics
from townhall.relay.guard import Guard, Watch
from townhall.v1.common_pb2 import Room

log = logging.get(__name__)


class RoomStateFollower:
    """Feeds the Guard every room version from Kafka."""

    def __init__(self, kafka: KafkaConfig, guard: Guard) -> None:
        self._kafka = kafka
        self._topic = Topics(kafka.topic_prefix).room_state
        self._guard = guard
        self._ends: dict[TopicPartition, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def load(self) -> None:
        """Reads the topic to its end, so a ban recorded before this relay started holds from its start."""

        def apply(key: bytes | None, value: bytes | None) -> None:
            if value:
                self._apply(value)  # nothing to cut yet: the relay is not serving
            elif key:
                self._guard.forget(key.decode("utf-8", "replace"))

        self._ends = await read_to_end(self._kafka, self._topic, apply)
        log.info("room rules read from kafka", rooms=self._guard.rooms)

    def follow(self) -> None:
        """Keeps applying new versions from where `load` stopped."""
        self._task = asyncio.create_task(follow(self._kafka, self._ends, self._record), name="room-rules")

    async def close(self) -> None:
        """Stops following."""
        await cancel(self._task)

    def _apply(self, value: bytes) -> list[tuple[Watch, str]]:
        try:
            room = Room.FromString(value)
        except ValueError as exc:  # DecodeError: skip a record this version cannot read
            log.warning("bad room-state record", topic=self._topic, error=str(exc))
            return []
        return self._guard.apply(room)

    def _record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if not record.value:
            # An ended room deleted once its tickets expired (admission's retention): forget its rules.
            if record.key:
                self._guard.forget(record.key.decode("utf-8", "replace"))
            return
        cut = self._apply(record.value)
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
