"""Writes the events admission writes, for benchmarks and tests that drive the notifier alone."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaProducer

from townhall.core.config import KafkaConfig
from townhall.core.kafka import Topics
from townhall.v1 import common_pb2, events_pb2


async def publish_room_started(
    producer: AIOKafkaProducer, kafka: KafkaConfig, room: str, host: int, title: str, timeout_s: float = 20.0
) -> None:
    """Writes what admission writes when a host starts a room (key: host id), and waits for the ack."""
    event = events_pb2.RoomStarted(
        room=common_pb2.Room(
            room_id=room,
            host_id=host,
            title=title,
            state=common_pb2.ROOM_STATE_LIVE,
            started_at_ms=int(time.time() * 1000),
        )
    )
    topic = Topics(kafka.topic_prefix).room_started
    await asyncio.wait_for(
        producer.send_and_wait(topic, event.SerializeToString(), key=str(host).encode()), timeout_s
    )
