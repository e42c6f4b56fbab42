"""The notifier process: Graph and Inbox servicers, the fan-out worker and the Inbox reader."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from townhall.core import logging
from townhall.core.config import Config
from townhall.core.kafka import Topics, producer, report_lag
from townhall.notifier.clients import KafkaUnreachable, started, stopped
from townhall.notifier.fanout_worker import FanoutWorker
from townhall.notifier.inbox import Hub
from townhall.notifier.inbox_reader import InboxReader, from_end
from townhall.notifier.metrics import FOLLOWERS_STORED
from townhall.notifier.servicers import GraphServicer, InboxServicer
from townhall.notifier.store import SqliteFollowerStore
from townhall.v1 import graph_pb2, graph_pb2_grpc, inbox_pb2, inbox_pb2_grpc

log = logging.get(__name__)

ASSIGN_TIMEOUT_S = 30.0


def build_app(config: Config) -> NotifierApp:
    """The notifier for `config`; nothing is opened until start()."""
    return NotifierApp(config)


class NotifierApp:
    """Implements townhall.core.server.App for the notifier."""

    service_names: Sequence[str] = (
        graph_pb2.DESCRIPTOR.services_by_name["Graph"].full_name,
        inbox_pb2.DESCRIPTOR.services_by_name["Inbox"].full_name,
    )

    def __init__(self, config: Config) -> None:
        self.config = config
        self.topics = Topics(config.kafka.topic_prefix)
        self.store = SqliteFollowerStore(config.notifier.data_dir)
        self.hub = Hub(config.notifier.inbox_queue)
        self._producer: AIOKafkaProducer | None = None
        self._fanout_consumer: AIOKafkaConsumer | None = None
        self._inbox_consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def register(self, server: grpc.aio.Server) -> None:
        """Adds Graph and Inbox to the server."""
        graph_pb2_grpc.add_GraphServicer_to_server(GraphServicer(self.store), server)
        inbox_pb2_grpc.add_InboxServicer_to_server(InboxServicer(self.hub), server)

    async def start(self) -> None:
        """Opens the store, connects to Kafka (bounded retries) and starts the two background loops."""
        kafka = self.config.kafka
        own = self.config.notifier
        await self.store.open()
        FOLLOWERS_STORED.set(await self.store.total())
        self._producer = await started(
            lambda: producer(kafka, "notifier-fanout"), "fan-out producer", kafka.bootstrap
        )
        self._fanout_consumer = await started(
            lambda: AIOKafkaConsumer(
                self.topics.room_started,
                bootstrap_servers=kafka.bootstrap,
                client_id="notifier-fanout",
                group_id=own.group_id,
                enable_auto_commit=False,
                # A new group must not skip rooms that started before it first joined.
                auto_offset_reset="earliest",
            ),
            "fan-out consumer",
            kafka.bootstrap,
        )
        self._inbox_consumer = await started(
            lambda: AIOKafkaConsumer(
                self.topics.notifications,
                bootstrap_servers=kafka.bootstrap,
                client_id="notifier-inbox",
                enable_auto_commit=False,
                auto_offset_reset="latest",
                metadata_max_age_ms=5_000,
            ),
            "inbox reader",
            kafka.bootstrap,
        )
        try:
            partitions = await asyncio.wait_for(from_end(self._inbox_consumer), ASSIGN_TIMEOUT_S)
        except TimeoutError as exc:
            raise KafkaUnreachable(
                f"no partitions of {self.topics.notifications} within {ASSIGN_TIMEOUT_S:.0f} s; "
                "does the topic exist?"
            ) from exc
        worker = FanoutWorker(
            self._fanout_consumer, self._producer, self.store, self.topics.notifications, own.batch_users
        )
        self._spawn(worker.run(), "notifier-fanout")
        self._spawn(InboxReader(self._inbox_consumer, self.hub).run(), "notifier-inbox")
        self._spawn(report_lag(self._fanout_consumer, own.group_id), "fanout-lag")
        self._spawn(report_lag(self._inbox_consumer, "inbox"), "inbox-lag")
        log.info(
            "notifier started",
            data_dir=own.data_dir,
            group=own.group_id,
            room_started=self.topics.room_started,
            notifications=self.topics.notifications,
            inbox_partitions=len(partitions),
        )

    async def drain(self) -> None:
        """Ends every Inbox stream so clients reconnect elsewhere."""
        self.hub.close()

    async def close(self) -> None:
        """Stops the loops, then the Kafka clients, then the store; safe after a failed start."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        try:
            # The consumer leaves its group now, so another member takes over its partitions at once.
            await stopped(self._fanout_consumer, "fan-out consumer")
            await stopped(self._inbox_consumer, "inbox reader")
            await stopped(self._producer, "fan-out producer")
        finally:
            self._fanout_consumer = self._inbox_consumer = self._producer = None
            await self.store.close()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(_report_exit)
        self._tasks.append(task)


def _report_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background loop died", task=task.get_name(), exc_info=task.exception())
