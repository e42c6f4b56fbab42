"""The fan-out worker: room-started events in, acknowledged notification records out, then commit."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from google.protobuf.message import DecodeError

from townhall.core import logging
from townhall.core.errors import TownhallError
from townhall.core.metrics import KAFKA_PRODUCE_ERRORS
from townhall.notifier.clients import describe
from townhall.notifier.fanout import Batch, ShardBatcher
from townhall.notifier.metrics import FANOUT_EVENTS, FANOUT_LAG, NOTIFICATIONS
from townhall.notifier.records import encode_batch, room_started
from townhall.notifier.store import FollowerStore
from townhall.v1 import events_pb2

log = logging.get(__name__)

# Follower ids read from the store per step, and records in flight before waiting for acks:
# both bound the memory one celebrity's fan-out can take.
BLOCK_USERS = 10_000
MAX_IN_FLIGHT = 256
RETRY_BACKOFF_S = 1.0


class FanoutWorker:
    """Turns each room-started event into NotificationBatch records; commits only once all are acked.

    A crash or a failed send before the commit replays the event (at-least-once); readers drop
    the duplicates by (room_id, kind, user_id).
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        store: FollowerStore,
        topic: str,
        batch_users: int,
        block_users: int = BLOCK_USERS,
    ) -> None:
        self._consumer = consumer
        self._producer = producer
        self._store = store
        self._topic = topic
        self._batch_users = batch_users
        self._block_users = block_users

    async def run(self) -> None:
        """Handles events one at a time until cancelled."""
        while True:
            try:
                record = await self._consumer.getone()
            except Exception as exc:
                log.warning("room-started fetch failed, will retry", error=describe(exc))
                await asyncio.sleep(RETRY_BACKOFF_S)
                continue
            tp = TopicPartition(record.topic, record.partition)
            try:
                await self.handle(record.value or b"")
            except Exception as exc:
                # Nothing is committed: rewind so this event is retried, after a pause.
                log.warning(
                    "fan-out failed, will retry",
                    partition=record.partition,
                    offset=record.offset,
                    error=describe(exc),
                )
                self._rewind(tp, record)
                await asyncio.sleep(RETRY_BACKOFF_S)
                continue
            await self._commit(tp, record.offset + 1)

    async def handle(self, value: bytes) -> int:
        """Fans out one serialised RoomStarted; returns the number of users in acknowledged records."""
        try:
            notification = room_started(events_pb2.RoomStarted.FromString(value))
        except (DecodeError, TownhallError) as exc:
            # A poison record must not block the partition: it is skipped, counted and logged.
            FANOUT_EVENTS.labels("invalid").inc()
            log.warning("room-started event skipped", error=str(exc))
            return 0
        encoded = notification.SerializeToString()
        batcher = ShardBatcher(self._batch_users)
        in_flight: list[tuple[asyncio.Future[object], int]] = []
        users = records = 0
        async for block in self._store.followers(notification.host_id, self._block_users):
            for batch in batcher.add(block):
                in_flight.append(await self._send(encoded, batch))
                if len(in_flight) >= MAX_IN_FLIGHT:
                    users += await self._settle(in_flight)
                    records += len(in_flight)
                    in_flight.clear()
        for batch in batcher.flush():
            in_flight.append(await self._send(encoded, batch))
        users += await self._settle(in_flight)
        records += len(in_flight)
        FANOUT_EVENTS.labels("done").inc()
        if notification.started_at_ms > 0:
            FANOUT_LAG.observe(max(0.0, time.time() - notification.started_at_ms / 1000))
        log.info(
            "room fan-out done",
            room=notification.room_id,
            host=notification.host_id,
            users=users,
            records=records,
        )
        return users

    async def _send(self, notification: bytes, batch: Batch) -> tuple[asyncio.Future[object], int]:
        value = encode_batch(notification, batch.user_ids)
        try:
            future = await self._producer.send(self._topic, value, key=batch.key)
        except Exception:
            KAFKA_PRODUCE_ERRORS.labels(self._topic).inc()
            raise
        # If this attempt is abandoned before _settle, its outcome must still be observed.
        future.add_done_callback(_observe)
        return future, len(batch.user_ids)

    async def _settle(self, in_flight: list[tuple[asyncio.Future[object], int]]) -> int:
        """Waits until every record in flight is acknowledged; returns the users they name."""
        if not in_flight:
            return 0
        # Wait for all, not just the first failure, so nothing is still in flight on a retry.
        results = await asyncio.gather(*(future for future, _ in in_flight), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            KAFKA_PRODUCE_ERRORS.labels(self._topic).inc(len(failures))
            raise failures[0]
        users = sum(n for _, n in in_flight)
        NOTIFICATIONS.labels("topic").inc(users)
        return users

    def _rewind(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            self._consumer.seek(tp, record.offset)
        except Exception as exc:
            # The partition moved to another member during a rebalance; it resumes from the commit.
            log.info("fan-out rewind skipped", partition=record.partition, error=str(exc))

    async def _commit(self, tp: TopicPartition, offset: int) -> None:
        try:
            await self._consumer.commit({tp: offset})
        except Exception as exc:
            # Lost the partition in a rebalance: its new owner replays the event; readers dedupe.
            log.warning("fan-out commit failed", partition=tp.partition, offset=offset, error=str(exc))


def _observe(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()
