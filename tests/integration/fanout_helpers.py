"""Helpers for the fan-out tests: topics of their own, an Inbox that counts, graphs, room starts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from townhall.core.auth import Authenticator
from townhall.core.config import AuthConfig, KafkaConfig
from townhall.core.kafka import Topics, ensure_topics
from townhall.devtools.events import publish_room_started
from townhall.notifier.inbox import Hub, Subscriber
from townhall.notifier.inbox_reader import InboxReader, from_end
from townhall.v1 import graph_pb2, graph_pb2_grpc

WAIT_S = 45.0


async def own_topics(kafka: KafkaConfig) -> KafkaConfig:
    """The broker with a fresh topic prefix, so no other test's tasks or records are in the way."""
    config = KafkaConfig(bootstrap=kafka.bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}", partitions=4)
    await ensure_topics(config)
    return config


def fresh_users(n: int) -> list[int]:
    """`n` consecutive new user ids."""
    base = random.randrange(1, 2**40)
    return list(range(base, base + n))


@dataclass
class CountingInbox:
    """The real Inbox code (Hub + InboxReader) with every user of interest connected."""

    hub: Hub
    subs: dict[int, Subscriber]

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
async def counting_inbox(kafka: KafkaConfig, users: list[int]) -> AsyncIterator[CountingInbox]:
    """An in-test Inbox reading the notifications topic from its current end."""
    hub = Hub(queue=64)
    subs = {u: hub.connect(u) for u in users}
    consumer = AIOKafkaConsumer(
        Topics(kafka.topic_prefix).notifications,
        bootstrap_servers=kafka.bootstrap,
        enable_auto_commit=False,
        metadata_max_age_ms=2_000,
    )
    await consumer.start()
    try:
        await asyncio.wait_for(from_end(consumer), WAIT_S)
        task = asyncio.create_task(InboxReader(consumer, hub).run())
        try:
            yield CountingInbox(hub, subs)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await consumer.stop()


async def until(condition: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "condition") -> None:
    """Polls `condition` until it holds, within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        await asyncio.sleep(0.05)


async def start_room(kafka: KafkaConfig, room: str, host: int, title: str = "fan-out test") -> None:
    """Writes what admission writes when a host starts a room, with a producer of its own."""
    p = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await p.start()
    try:
        await publish_room_started(p, kafka, room, host, title, WAIT_S)
    finally:
        await p.stop()


async def import_followers(address: str, host: int, followers: list[int]) -> int:
    """Makes `followers` follow `host` through Graph.Import; returns the edges created."""
    pairs = np.array([[host, f] for f in followers], dtype="<u8")

    async def chunks() -> AsyncIterator[graph_pb2.ImportChunk]:
        for i in range(0, len(pairs), 3000):
            yield graph_pb2.ImportChunk(pairs=pairs[i : i + 3000].tobytes())

    async with grpc.aio.insecure_channel(address) as channel:
        summary = await graph_pb2_grpc.GraphStub(channel).Import(
            chunks(), metadata=Authenticator(AuthConfig()).credential.metadata(), timeout=WAIT_S
        )
    return int(summary.created)


def notifier_env(kafka: KafkaConfig, data_dir: Path, listen: str, group: str, **extra: str) -> dict[str, str]:
    """Environment for a notifier process on the test broker."""
    return {
        **os.environ,
        "TOWNHALL_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "TOWNHALL_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "TOWNHALL_NOTIFIER_LISTEN": listen,
        "TOWNHALL_NOTIFIER_METRICS_PORT": "0",
        "TOWNHALL_NOTIFIER_DATA_DIR": str(data_dir),
        "TOWNHALL_NOTIFIER_GROUP_ID": group,
        "TOWNHALL_LOG_LEVEL": "warning",
        **{f"TOWNHALL_NOTIFIER_{k.upper()}": v for k, v in extra.items()},
    }


def spawn_notifier(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A notifier process (what `python -m townhall.notifier` runs in production)."""
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "townhall.notifier"], env=env, stdout=fh, stderr=subprocess.STDOUT
        )


async def wait_serving(address: str, process: subprocess.Popen[bytes]) -> None:
    """Waits until the notifier answers gRPC health."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + WAIT_S
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, f"notifier exited with {process.returncode}"
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"notifier at {address} not serving")
