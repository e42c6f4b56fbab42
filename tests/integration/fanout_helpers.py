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
from aiokafka import AIOKafkaProducer

from tests.integration.helpers import config_for, serving
from townhall.core.config import DEV_ENV, KafkaConfig
from townhall.core.kafka import ensure_topics
from townhall.notifier.app import build_app
from townhall.v1 import graph_pb2_grpc
from townhall_tools.devtools import processes
from townhall_tools.devtools.events import publish_room_started

WAIT_S = 45.0


async def own_topics(kafka: KafkaConfig) -> KafkaConfig:
    """The broker with a fresh topic prefix, so no other test's tasks or records are in the way."""
    config = KafkaConfig(bootstrap=kafka.bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}", partitions=4)
    await ensure_topics(config)
    return config


@dataclass
class RunningNotifier:
    """A notifier served in-process on its own topics."""

    kafka: KafkaConfig
    address: str
    graph: graph_pb2_grpc.GraphStub
    internal: str  # where Graph.Import is served


@contextlib.asynccontextmanager
async def serving_notifier(
    kafka: KafkaConfig, data_dir: Path, own: bool = True, **notifier: object
) -> AsyncIterator[RunningNotifier]:
    """A notifier on topics of its own (own_topics; with `own` false, on `kafka`'s), its store in
    `data_dir`, its own consumer group, no metrics port, and `notifier` settings; served until the block
    ends."""
    topics = await own_topics(kafka) if own else kafka
    settings = {"data_dir": str(data_dir), "group_id": f"g-{uuid.uuid4().hex[:8]}", "metrics_port": 0}
    config = config_for(topics, notifier={**settings, **notifier})
    async with serving(build_app(config), config) as address, grpc.aio.insecure_channel(address) as channel:
        yield RunningNotifier(topics, address, graph_pb2_grpc.GraphStub(channel), config.notifier.address)


def fresh_users(n: int) -> list[int]:
    """`n` consecutive new user ids."""
    base = random.randrange(1, 2**40)
    return list(range(base, base + n))


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


def notifier_env(
    kafka: KafkaConfig, data_dir: Path, listen: str, group: str, internal: str, **extra: str
) -> dict[str, str]:
    """Environment for a notifier process on the test broker (with the development keys)."""
    return {
        **os.environ,
        **DEV_ENV,
        "TOWNHALL_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "TOWNHALL_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "TOWNHALL_NOTIFIER_LISTEN": listen,
        "TOWNHALL_NOTIFIER_INTERNAL_LISTEN": internal,
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
    """Waits until the notifier answers gRPC health (in a thread: the test's event loop runs meanwhile)."""
    await asyncio.to_thread(processes.wait_serving, process, address, f"notifier at {address}", WAIT_S)
