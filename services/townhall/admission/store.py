"""Durable rooms: every change is acknowledged by Kafka (acks=all) before it is applied or answered."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from townhall.admission.metrics import ROOM_CHANGES, ROOMS_LIVE
from townhall.admission.rooms import RoomBook
from townhall.core import logging
from townhall.core.config import KafkaConfig
from townhall.core.errors import Unavailable
from townhall.core.kafka import Topics, read_to_end
from townhall.core.metrics import KAFKA_PRODUCE_ERRORS
from townhall.core.tasks import cancel
from townhall.v1.common_pb2 import Room
from townhall.v1.events_pb2 import RoomStarted

log = logging.get(__name__)

# How long a change may wait for Kafka before the caller is told to retry (UNAVAILABLE).
COMMIT_TIMEOUT_S = 10.0


def now_ms() -> int:
    """Wall-clock Unix milliseconds."""
    return time.time_ns() // 1_000_000


class RoomStore:
    """Rooms held in memory, written through to the compacted room-state topic."""

    def __init__(self, kafka: KafkaConfig, producer: AIOKafkaProducer) -> None:
        self.book = RoomBook()
        self._kafka = kafka
        self._topics = Topics(kafka.topic_prefix)
        self._producer = producer
        # One change at a time per room, so versions never fork.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._ends: dict[TopicPartition, int] = {}
        self._follower: asyncio.Task[None] | None = None
        # Called with each room version read from the topic while following (after `load`).
        self.on_change: Callable[[Room], None] | None = None

    async def load(self) -> int:
        """Rebuilds every room from the room-state topic; returns how many records were read."""
        count = 0

        def apply(_key: bytes | None, value: bytes | None) -> None:
            nonlocal count
            count += 1
            if value:
                self.book.apply(Room.FromString(value))

        self._ends = await read_to_end(self._kafka, self._topics.room_state, apply)
        self._update_gauge()
        log.info("rooms rebuilt from kafka", records=count, rooms=len(self.book))
        return count

    def follow(self) -> None:
        """Keeps applying the topic from where `load` stopped: every process holds a replica of every room."""
        self._follower = asyncio.create_task(self._follow(), name="room-state-follower")

    async def stop(self) -> None:
        """Stops following the topic."""
        await cancel(self._follower)

    async def _follow(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._kafka.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
        )
        await consumer.start()
        try:
            consumer.assign(list(self._ends))
            for tp, offset in self._ends.items():
                consumer.seek(tp, offset)
            while True:
                batch = await consumer.getmany(timeout_ms=1_000)
                for records in batch.values():
                    for record in records:
                        if not record.value:
                            continue
                        room = Room.FromString(record.value)
                        if self.book.apply(room):
                            self._update_gauge()
                        # Also for versions already applied (this process's own or forwarded changes).
                        if self.on_change is not None:
                            self.on_change(room)
        finally:
            await consumer.stop()

    async def create(
        self, host: int, title: str, speakers: list[int], listener_limit: int, room_id: str | None = None
    ) -> Room:
        """Creates and durably records a room (with `room_id` when a forwarding member picked it)."""
        room = self.book.created(host, title, speakers, listener_limit, now_ms(), room_id)
        async with self._locks[room.room_id]:
            await self._commit(room, "created")
        return room

    async def start(self, room_id: str, caller: int) -> Room:
        """Starts the caller's room and announces it; repeating it announces it again."""
        async with self._locks[room_id]:
            room = self.book.started(room_id, caller, now_ms())
            if room is not self.book.get(room_id):
                await self._commit(room, "started")
            await self._send(self._topics.room_started, str(room.host_id), RoomStarted(room=room))
        return room

    async def schedule(self, room_id: str, caller: int, start_at_ms: int) -> Room:
        """Durably schedules the caller's room to start at `start_at_ms`."""
        async with self._locks[room_id]:
            room = self.book.scheduled(room_id, caller, start_at_ms)
            await self._commit(room, "scheduled")
        return room

    async def end(self, room_id: str, caller: int) -> Room:
        """Ends the caller's room."""
        async with self._locks[room_id]:
            room = self.book.ended(room_id, caller, now_ms())
            if room is not self.book.get(room_id):
                await self._commit(room, "ended")
        return room

    async def mark_crowd(self, room_id: str) -> Room:
        """Durably marks a live room as drawing a crowd (its clients then join on the crowd lane)."""
        async with self._locks[room_id]:
            room = self.book.crowded(room_id)
            if room is not self.book.get(room_id):
                await self._commit(room, "crowd")
        return room

    async def change(self, room_id: str, change: str, make: Callable[[Room], Room]) -> Room:
        """Applies a pure rule (admission/stage.py) to the room and durably records what it returns.

        A rule that returns the room it was given changed nothing: nothing is written.
        """
        async with self._locks[room_id]:
            held = self.book.get(room_id)
            room = make(held)
            if room is not held:
                await self._commit(room, change)
        return room

    async def _commit(self, room: Room, change: str) -> None:
        await self._send(self._topics.room_state, room.room_id, room)
        self.book.apply(room)
        ROOM_CHANGES.labels(change).inc()
        self._update_gauge()
        log.info("room changed", room=room.room_id, change=change, version=room.version)

    async def _send(self, topic: str, key: str, message: Room | RoomStarted) -> None:
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(topic, message.SerializeToString(), key=key.encode()),
                COMMIT_TIMEOUT_S,
            )
        except (KafkaError, TimeoutError) as exc:
            KAFKA_PRODUCE_ERRORS.labels(topic).inc()
            log.warning("kafka write failed", topic=topic, key=key, error=repr(exc))
            raise Unavailable("the change could not be recorded in Kafka; it was not made: retry") from exc

    def _update_gauge(self) -> None:
        ROOMS_LIVE.set(self.book.live_count())
