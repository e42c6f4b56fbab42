"""Writes the events admission writes, for benchmarks and tests that drive the notifier alone."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaProducer

from townhall.core.config import DEV_AUTH, AuthConfig, KafkaConfig
from townhall.core.kafka import Topics
from townhall.core.provenance import ADMISSION, RecordSigner, Writer
from townhall.internal.v1 import events_pb2
from townhall.v1 import common_pb2


async def publish_room_started(
    producer: AIOKafkaProducer,
    kafka: KafkaConfig,
    room: str,
    host: int,
    title: str,
    timeout_s: float = 20.0,
    auth: AuthConfig | None = None,
) -> None:
    """Writes what admission writes when a host starts a room (key: host id), signed as admission with
    `auth`'s service key (default: the development key), and waits for the ack."""
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
    value, key = event.SerializeToString(), str(host).encode()
    headers = RecordSigner(auth or DEV_AUTH, Writer(ADMISSION, "devtools")).headers(topic, key, value)
    await asyncio.wait_for(producer.send_and_wait(topic, value, key=key, headers=headers), timeout_s)


async def publish_room_created(
    producer: AIOKafkaProducer,
    kafka: KafkaConfig,
    room: str,
    host: int,
    title: str,
    timeout_s: float = 20.0,
    auth: AuthConfig | None = None,
) -> None:
    """Writes what admission writes when a host creates a room (the room-state topic, key: room id), signed
    as admission with `auth`'s service key (default: the development key), and waits for the ack."""
    state = common_pb2.Room(
        room_id=room, host_id=host, title=title, state=common_pb2.ROOM_STATE_CREATED, version=1
    )
    topic = Topics(kafka.topic_prefix).room_state
    value, key = state.SerializeToString(), room.encode()
    headers = RecordSigner(auth or DEV_AUTH, Writer(ADMISSION, "devtools")).headers(topic, key, value)
    await asyncio.wait_for(producer.send_and_wait(topic, value, key=key, headers=headers), timeout_s)
