"""Kafka helpers shared by every service: topic names, producers, topic creation, event queue."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from prometheus_client import Counter, Gauge

from townhall.core import logging
from townhall.core.config import KafkaConfig
from townhall.core.metrics import KAFKA_PRODUCE_ERRORS
from townhall.core.tasks import cancel

log = logging.get(__name__)

EVENTS_DROPPED = Counter(
    "townhall_events_dropped_total",
    "Best-effort events dropped because the in-process queue to Kafka was full or Kafka failed.",
    ["topic"],
)
EVENTS_QUEUED = Gauge("townhall_events_queued", "Best-effort events waiting for Kafka.")
CONSUMER_LAG = Gauge(
    "townhall_kafka_consumer_lag_records",
    "Records between a consumer's position and the end of its assigned partitions.",
    ["group", "topic"],
)


@dataclass(frozen=True)
class Topics:
    """The project's topic names, derived from one prefix."""

    prefix: str

    @property
    def room_state(self) -> str:
        """Compacted; key room id; value townhall.v1.Room."""
        return f"{self.prefix}.room-state"

    @property
    def presence(self) -> str:
        """Key room id; value PresenceEvent."""
        return f"{self.prefix}.presence"

    @property
    def room_started(self) -> str:
        """Key host id; value RoomStarted."""
        return f"{self.prefix}.room-started"

    @property
    def notifications(self) -> str:
        """Key user shard; value NotificationBatch."""
        return f"{self.prefix}.notifications"

    @property
    def relay_load(self) -> str:
        """Compacted; key relay address; value RelayLoad."""
        return f"{self.prefix}.relay-load"

    @property
    def fanout_fast(self) -> str:
        """Key task id; value FanoutTask: small hosts and reminders."""
        return f"{self.prefix}.fanout-fast"

    @property
    def fanout_bulk(self) -> str:
        """Key task id; value FanoutTask: hosts above notifier.bulk_threshold followers."""
        return f"{self.prefix}.fanout-bulk"

    def all(self) -> dict[str, dict[str, str]]:
        """Every topic with its configuration."""
        compacted = {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1"}
        day = {"retention.ms": str(24 * 3600 * 1000)}
        return {
            self.room_state: compacted,
            self.presence: day,
            self.room_started: day,
            self.notifications: day,
            self.fanout_fast: day,
            self.fanout_bulk: day,
            self.relay_load: compacted,
        }


async def ensure_topics(config: KafkaConfig) -> None:
    """Creates the project's topics if they do not exist (local broker, tests)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=config.bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, config.partitions, 1, topic_configs=cfg)
            for name, cfg in Topics(config.topic_prefix).all().items()
            if name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
            log.info("topics created", topics=[t.name for t in wanted])
    finally:
        await admin.close()


# Not idempotent, on purpose: aiokafka's idempotent producer stops for good when a broker
# restart leaves it with OutOfOrderSequenceNumber (sequence numbers of batches that never made
# it), and every later send fails. Every reader here tolerates a record written twice (room
# versions, notification and task ids), and aiokafka keeps one batch in flight per partition,
# so a retry never reorders a partition either.
IDEMPOTENT = False


def producer(config: KafkaConfig, client_id: str) -> AIOKafkaProducer:
    """A producer whose send_and_wait means the record is on every in-sync replica."""
    return AIOKafkaProducer(
        bootstrap_servers=config.bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=IDEMPOTENT,
        linger_ms=2,
        request_timeout_ms=15_000,
        retry_backoff_ms=200,
    )


async def read_to_end(
    config: KafkaConfig, topic: str, apply: Callable[[bytes | None, bytes | None], None]
) -> dict[TopicPartition, int]:
    """Applies every record of `topic` up to its current end; returns the end offsets."""
    # Without a group, a subscription is assigned every partition of the topic.
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=config.bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        metadata_max_age_ms=5_000,
    )
    await consumer.start()
    try:
        partitions = list(consumer.assignment())
        if not partitions:
            raise RuntimeError(f"topic {topic} does not exist or has no partitions")
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        pending = {tp for tp, end in ends.items() if end > 0}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    apply(record.key, record.value)
                if records and records[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
        return ends
    finally:
        await consumer.stop()


async def end_offsets(config: KafkaConfig, topic: str) -> dict[TopicPartition, int]:
    """The current end offset of every partition of `topic`: where to follow it from, reading nothing."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=config.bootstrap, enable_auto_commit=False, metadata_max_age_ms=5_000
    )
    await consumer.start()
    try:
        partitions = list(consumer.assignment())
        if not partitions:
            raise RuntimeError(f"topic {topic} does not exist or has no partitions")
        return dict(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


async def follow(
    config: KafkaConfig,
    positions: dict[TopicPartition, int],
    handle: Callable[[ConsumerRecord[bytes, bytes]], None],
    retry_s: float = 1.0,
) -> None:
    """Hands every record after `positions` (e.g. read_to_end's ends) to `handle` as it arrives.

    Runs until cancelled. `positions` is kept up to date, so after an error the consumer is made again
    and resumes where it stopped (after the record `handle` failed on, if it did: one bad record must
    not stop the follower).
    """
    while True:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=config.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
        )
        try:
            await consumer.start()
            consumer.assign(list(positions))
            for tp, offset in positions.items():
                consumer.seek(tp, offset)
            while True:
                batch = await consumer.getmany(timeout_ms=1_000)
                for tp, records in batch.items():
                    for record in records:
                        positions[tp] = record.offset + 1
                        handle(record)
        except Exception as exc:  # Kafka errors, or a record `handle` could not take: go on after it
            log.warning("following a topic failed; resuming", error=repr(exc))
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
        await asyncio.sleep(retry_s)


async def report_lag(consumer: AIOKafkaConsumer, group: str, every_s: float = 5.0) -> None:
    """Publishes the consumer's lag per topic every `every_s` seconds, until cancelled."""
    while True:
        lag: dict[str, int] = {}
        for tp in consumer.assignment():
            lag.setdefault(tp.topic, 0)
            high = consumer.highwater(tp)
            if high is None:  # nothing fetched yet from this partition
                continue
            try:
                position = await asyncio.wait_for(consumer.position(tp), 1.0)
            except (TimeoutError, KafkaError, AssertionError):
                continue
            lag[tp.topic] += max(0, high - position)
        for topic, records in lag.items():
            CONSUMER_LAG.labels(group, topic).set(records)
        await asyncio.sleep(every_s)


class EventQueue:
    """A bounded in-process queue of best-effort records to Kafka that never blocks the caller.

    `offer` returns at once; a full queue or a failed send drops the record and counts it.
    """

    def __init__(self, producer: AIOKafkaProducer, capacity: int) -> None:
        self._producer = producer
        self._queue: asyncio.Queue[tuple[str, bytes, bytes]] = asyncio.Queue(capacity)
        self._task: asyncio.Task[None] | None = None

    def offer(self, topic: str, key: bytes, value: bytes) -> bool:
        """Queues a record; False (and counted) if the queue is full."""
        try:
            self._queue.put_nowait((topic, key, value))
        except asyncio.QueueFull:
            EVENTS_DROPPED.labels(topic).inc()
            return False
        EVENTS_QUEUED.inc()
        return True

    def start(self) -> None:
        """Starts the background sender."""
        self._task = asyncio.create_task(self._run(), name="event-queue")

    async def close(self, flush_s: float = 5.0) -> None:
        """Sends what is queued (within flush_s), then stops."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), flush_s)
        await cancel(self._task)

    async def _run(self) -> None:
        while True:
            topic, key, value = await self._queue.get()
            try:
                future = await self._producer.send(topic, value, key=key)
                future.add_done_callback(lambda f, t=topic: _count_failure(f, t))
            except Exception as exc:
                EVENTS_DROPPED.labels(topic).inc()
                KAFKA_PRODUCE_ERRORS.labels(topic).inc()
                log.warning("event dropped", topic=topic, error=str(exc))
            finally:
                EVENTS_QUEUED.dec()
                self._queue.task_done()


def _count_failure(future: asyncio.Future[object], topic: str) -> None:
    if future.cancelled() or future.exception() is not None:
        EVENTS_DROPPED.labels(topic).inc()
        KAFKA_PRODUCE_ERRORS.labels(topic).inc()
