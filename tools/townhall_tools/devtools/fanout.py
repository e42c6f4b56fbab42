"""Fan-out helpers for tests, benchmarks and fault runs: followers in bulk, an Inbox that counts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from townhall.core.config import DEV_AUTH, DEV_SERVICE_KEY, AuthConfig, KafkaConfig
from townhall.core.credentials import operator_credential
from townhall.core.kafka import Topics, reader
from townhall.notifier.inbox import InboxDelivery, InboxStream
from townhall.notifier.inbox_reader import InboxReader
from townhall.v1 import graph_pb2, graph_pb2_grpc

WAIT_S = 45.0


@dataclass
class CountingInbox:
    """The real Inbox code (InboxDelivery + InboxReader) with every user of interest connected."""

    hub: InboxDelivery
    subs: dict[int, InboxStream]

    def got(self, room: str) -> dict[int, int]:
        """Notifications for `room` queued per user."""
        return {u: sum(1 for n in s._queue if n.room_id == room) for u, s in self.subs.items()}

    def crowd(self, room: str) -> set[bool]:
        """The `crowd` flags of the notifications for `room` queued so far."""
        return {n.crowd for s in self.subs.values() for n in s._queue if n.room_id == room}

    def delivered(self, room: str) -> int:
        """Users that have at least one notification for `room`."""
        return sum(1 for c in self.got(room).values() if c)


@contextlib.asynccontextmanager
async def counting_inbox(
    kafka: KafkaConfig, users: list[int], auth: AuthConfig = DEV_AUTH
) -> AsyncIterator[CountingInbox]:
    """An Inbox of our own reading the notifications topic from its current end; records are checked with
    `auth`'s service keys (the notifiers' own: the development keys unless given)."""
    hub = InboxDelivery(queue=64)
    subs = {u: hub.connect(u) for u in users}
    topic = Topics(kafka.topic_prefix).notifications
    inbox = InboxReader(kafka, topic, hub, reader(kafka, auth, topic))
    await asyncio.wait_for(inbox.start(), WAIT_S)
    try:
        yield CountingInbox(hub, subs)
    finally:
        await inbox.close()


ASSIGN_POLL_S = 0.1


async def from_end(consumer: AIOKafkaConsumer) -> list[TopicPartition]:
    """Waits until a started group-less consumer holds every partition of its topic, then fixes
    each position at the current end, so nothing produced after this returns is missed.
    """
    # Without a group, aiokafka assigns every partition of the subscribed topic once its metadata
    # is known; right after the topic is created that can take a few metadata refreshes.
    # aiokafka has no public event for that, hence the polling.
    while True:
        partitions = sorted(consumer.assignment())
        if partitions:
            break
        await asyncio.sleep(ASSIGN_POLL_S)
    await consumer.seek_to_end(*partitions)
    for tp in partitions:
        await consumer.position(tp)  # waits for the end offset to be resolved
    return partitions


async def import_followers(
    address: str, host: int, followers: list[int], auth: AuthConfig | None = None
) -> int:
    """Makes `followers` follow `host` through Graph.Import on a notifier's internal port (`address`, as an
    operator signing with `auth`'s service key, the development one unless given); returns the edges
    created."""
    pairs = np.array([[host, f] for f in followers], dtype="<u8")

    async def chunks() -> AsyncIterator[graph_pb2.ImportChunk]:
        for i in range(0, len(pairs), 3000):
            yield graph_pb2.ImportChunk(pairs=pairs[i : i + 3000].tobytes())

    credential = operator_credential(auth or AuthConfig(service_keys=(DEV_SERVICE_KEY,)))
    async with grpc.aio.insecure_channel(address) as channel:
        summary = await graph_pb2_grpc.GraphStub(channel).Import(
            chunks(), metadata=credential.metadata(address, "/townhall.v1.Graph/Import"), timeout=WAIT_S
        )
    return int(summary.created)
