"""The notifier process: Graph and Inbox servicers, the planner, the fan-out worker and the Inbox reader."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from townhall.core import logging, sharding
from townhall.core.auth import Authenticator
from townhall.core.config import Config, KafkaConfig
from townhall.core.errors import Unavailable
from townhall.core.forwarding import Forwarding
from townhall.core.kafka import (
    Topics,
    consumer,
    producer,
    reader,
    report_lag,
    wait_for_topics,
)
from townhall.core.provenance import NOTIFIER, RecordSigner, Writer
from townhall.core.tasks import cancel, supervise
from townhall.internal.v1 import internal_pb2, internal_pb2_grpc
from townhall.notifier.clients import started, stopped
from townhall.notifier.handover import Handover
from townhall.notifier.inbox import InboxDelivery
from townhall.notifier.inbox_reader import InboxReader
from townhall.notifier.inbox_resume import Backlog
from townhall.notifier.membership import Membership, api_errors, membership_for
from townhall.notifier.metrics import FOLLOWERS_STORED
from townhall.notifier.peers import NotifierChannels
from townhall.notifier.placement import ShardOwners
from townhall.notifier.planner import Planner, PlannerCommitOnRevoke, start_position
from townhall.notifier.rooms import Reminders, RoomStates
from townhall.notifier.servicers import GraphServicer, InboxServicer, ShardsServicer
from townhall.notifier.store import STORE_ERRORS, SqliteFollowerStore
from townhall.notifier.worker import CommitOnRevoke, Worker
from townhall.v1 import graph_pb2, graph_pb2_grpc, inbox_pb2, inbox_pb2_grpc

log = logging.get(__name__)


def build_app(config: Config, membership: Membership | None = None) -> NotifierApp:
    """The notifier for `config` (members from `membership`, else config); nothing opens until start()."""
    return NotifierApp(config, membership)


class NotifierApp:
    """Implements townhall.core.server.App for the notifier."""

    service_names: Sequence[str] = (
        graph_pb2.DESCRIPTOR.services_by_name["Graph"].full_name,
        inbox_pb2.DESCRIPTOR.services_by_name["Inbox"].full_name,
        internal_pb2.DESCRIPTOR.services_by_name["GraphShards"].full_name,
    )

    def __init__(self, config: Config, membership: Membership | None = None) -> None:
        self.config = config
        self.topics = Topics(config.kafka.topic_prefix)
        self.store = SqliteFollowerStore(config.notifier.data_dir)
        self.hub = InboxDelivery(
            config.notifier.inbox_queue, streams_per_user=config.notifier.inbox_streams_per_user
        )
        self.backlog = Backlog(
            config.kafka,
            self.topics.notifications,
            reader(config.kafka, config.auth, self.topics.notifications),
            config.notifier.inbox_resume_records,
            config.notifier.inbox_resume_notifications,
        )
        self.placement = ShardOwners(config.notifier.address, config.notifier.members)
        self.auth = Authenticator(config.auth, "notifier", config.notifier.address)
        self.peers = NotifierChannels(Forwarding(self.auth), config.tls)
        # Which rooms exist: RemindMe is for rooms not yet started; reminders of ended rooms are released.
        self.rooms = RoomStates(config.kafka, config.auth)
        self.reminders = Reminders(self.store, self.rooms)
        self.membership = membership or membership_for(config.notifier)
        # Graph keys move to their owner when the membership changes (notifier/handover.py).
        self.handover = Handover(self.store, self.placement, self.peers, static=not self.membership.changes)
        self.handover.on_view.append(self._view_changed)
        self._planner: Planner | None = None
        self._producers: dict[str, AIOKafkaProducer] = {}
        self._planner_consumer: AIOKafkaConsumer | None = None
        self._fanout_consumers: dict[str, AIOKafkaConsumer] = {}
        self.inbox: InboxReader | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def register(self, server: grpc.aio.Server) -> None:
        """Adds Graph and Inbox to the server."""
        graph = GraphServicer(
            self.store,
            self.placement,
            self.peers,
            self.handover,
            self.rooms,
            self.config.notifier.reminders_per_user,
        )
        graph_pb2_grpc.add_GraphServicer_to_server(graph, server)
        inbox_pb2_grpc.add_InboxServicer_to_server(
            InboxServicer(self.hub, self.backlog, self._stream_start), server
        )
        internal_pb2_grpc.add_GraphShardsServicer_to_server(ShardsServicer(self.handover), server)

    def _stream_start(self, user: int) -> str:
        """Where an Inbox stream of `user` connected now starts (its NOTIFICATION_KIND_CONNECTED cursor)."""
        if self.inbox is None:
            raise Unavailable("this notifier is not reading notifications yet; reconnect")
        return self.inbox.start_cursor(user)

    async def start(self) -> None:
        """Waits for Kafka and its topics (server.kafka_wait_s), opens the store, connects to Kafka (bounded
        retries) and starts the background loops."""
        kafka = self.config.kafka
        own = self.config.notifier
        needed = self.topics.used_by(NOTIFIER)
        if not own.fanout:  # the Inbox reader and the rooms RemindMe checks
            needed = (self.topics.notifications, self.topics.room_state)
        await wait_for_topics(kafka, needed, self.config.server.kafka_wait_s)
        await self.store.open()
        FOLLOWERS_STORED.set(await self.store.total())
        await self.rooms.start()
        self.reminders.start()
        # Who the notifiers are, before serving: every call is routed by it.
        await self.handover.load()
        await self.handover.set_view(*await self.membership.read())
        self.handover.start()
        self.membership.start(self.handover.set_view)
        if own.fanout:
            for lane in ("fast", "bulk"):
                self._producers[lane] = await started(
                    lambda lane=lane: fanout_producer(kafka, lane),  # type: ignore[misc]
                    f"{lane}-lane producer",
                    kafka.bootstrap,
                )
            # Every notifier reads every room start (its own group, named by its stable address) and
            # plans only what it owns. A group new to Kafka starts from the oldest event, unless other
            # notifiers' groups planned what came before (a notifier added by a scale-up).
            planner_group = f"{own.group_id}-planner-{own.address}"
            others = [f"{own.group_id}-planner-{m}" for m in self.placement.members if m != own.address]
            start_at_ms = await start_position(kafka, planner_group, [*others, f"{own.group_id}-planner"])
            self._planner_consumer = await started(
                lambda: consumer(
                    kafka,
                    client_id="notifier-planner",
                    group_id=planner_group,
                    enable_auto_commit=False,
                    # A new group must not skip rooms that started before it first joined.
                    auto_offset_reset="earliest",
                ),
                "planner consumer",
                kafka.bootstrap,
            )
            for lane in ("fast", "bulk"):
                # Subscribed once the worker exists, with its listener (commit on revoke).
                self._fanout_consumers[lane] = await started(
                    lambda lane=lane: consumer(  # type: ignore[misc]
                        kafka,
                        client_id=f"notifier-worker-{lane}",
                        group_id=f"{own.group_id}-{lane}",
                        enable_auto_commit=False,
                        auto_offset_reset="earliest",
                        metadata_max_age_ms=5_000,
                        # Small fetches per partition: a worker step is a few dozen tasks at most.
                        max_partition_fetch_bytes=256 * 1024,
                    ),
                    f"{lane}-lane consumer",
                    kafka.bootstrap,
                )
        signer = RecordSigner(self.config.auth, Writer(NOTIFIER, own.address))
        if self._producers and self._planner_consumer and self._fanout_consumers:
            planner = Planner(
                self._planner_consumer,
                self._producers,
                self.store,
                self.topics,
                self.placement,
                own.bulk_threshold,
                own.task_users,
                self.handover,
                signer=signer,
                records=reader(kafka, self.config.auth, self.topics.room_started),
            )
            self._planner = planner
            worker = Worker(
                self._fanout_consumers,
                self._producers,
                self.topics,
                own.batch_users,
                own.bulk_share,
                own.worker_tasks,
                own.worker_rate,
                signer=signer,
                # Both lanes' topics have the same writers: one reader checks either.
                records=reader(kafka, self.config.auth, self.topics.fanout_fast, self.topics.fanout_bulk),
            )
            lanes = {"fast": self.topics.fanout_fast, "bulk": self.topics.fanout_bulk}
            for lane, lane_consumer in self._fanout_consumers.items():
                lane_consumer.subscribe([lanes[lane]], listener=CommitOnRevoke(worker, lane))
            self._planner_consumer.subscribe(
                [self.topics.room_started], listener=PlannerCommitOnRevoke(planner, start_at_ms)
            )
            self._spawn(planner.run(), "notifier-planner")
            self._spawn(worker.run(), "notifier-worker")
            for lane, lane_consumer in self._fanout_consumers.items():
                self._spawn(report_lag(lane_consumer, f"{own.group_id}-{lane}"), f"{lane}-lag")
        inbox = self.inbox = InboxReader(
            kafka,
            self.topics.notifications,
            self.hub,
            reader(kafka, self.config.auth, self.topics.notifications),
        )
        partitions = await inbox.start()
        self._spawn(report_lag(lambda: inbox.consumer, "inbox"), "inbox-lag")
        log.info(
            "notifier started",
            data_dir=own.data_dir,
            group=own.group_id,
            fanout=own.fanout,
            member=own.address,
            members=len(self.placement.members),
            epoch=self.placement.epoch,
            room_started=self.topics.room_started,
            notifications=self.topics.notifications,
            inbox_partitions=partitions,
        )

    def _view_changed(self, before: tuple[str, ...], after: tuple[str, ...]) -> None:
        """The members changed: plan recent room starts again for the keys this notifier gained."""
        if self._planner is None:
            return
        me = self.placement.me

        def owner(members: tuple[str, ...], key: str) -> str:
            return sharding.owner(key, members) if members else me

        self._planner.replay(lambda key: owner(after, key) == me and owner(before, key) != me)

    async def leave(self) -> None:
        """A notifier scaled away hands every key it holds to its owner first; one restarting keeps them
        (its volume stays with its identity). Consumer groups rebalance on close."""
        if self.membership.changes:
            try:
                await self.handover.set_view(*await self.membership.read())
            except (*api_errors(), *STORE_ERRORS) as exc:
                log.warning(
                    "notifier membership not read at shutdown; keeping the keys here", error=repr(exc)
                )
        if self.placement.members and self.placement.me not in self.placement.members:
            grace = self.config.notifier.handover_grace_s
            log.info("scaled away: handing every key over before stopping", within_s=grace)
            if not await self.handover.wait_drained(grace):
                log.error(
                    "keys still held after handover_grace_s: they stay on this volume until this notifier "
                    "is back, and their calls answer UNAVAILABLE meanwhile",
                    within_s=grace,
                )

    async def drain(self) -> None:
        """Ends every Inbox stream so clients reconnect elsewhere."""
        self.hub.close()

    async def close(self) -> None:
        """Stops the loops, then the Kafka clients, then the store; safe after a failed start."""
        await cancel(*self._tasks)
        self._tasks.clear()
        await self.reminders.close()
        await self.rooms.close()
        await self.membership.close()
        await self.handover.close()
        try:
            # The consumer leaves its group now, so another member takes over its partitions at once.
            await stopped(self._planner_consumer, "planner consumer")
            for lane, lane_consumer in self._fanout_consumers.items():
                await stopped(lane_consumer, f"{lane}-lane consumer")
            if self.inbox is not None:
                await self.inbox.close()
            for lane, client in self._producers.items():
                await stopped(client, f"{lane}-lane producer")
        finally:
            self._planner_consumer = None
            self.inbox = None
            self._fanout_consumers = {}
            self._producers = {}
            await self.peers.close()
            await self.store.close()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(supervise(work, name))


def fanout_producer(kafka: KafkaConfig, lane: str) -> AIOKafkaProducer:
    """The planner's and workers' producer: acks=all like every producer, with larger batches,
    because fan-out writes many records back to back and throughput is the point.

    The bulk lane compresses its batches (zstd): a celebrity's tasks and notification records are
    packed follower ids, about 2.9 times smaller compressed, and every byte of them is replicated
    twice, sent over TLS and read by every notifier's Inbox reader, on the brokers that also carry the
    fast lane. The fast lane's few records are left as they are (nothing to gain, and no added step)."""
    bulk = lane == "bulk"
    return producer(
        kafka,
        f"notifier-{lane}",
        linger_ms=5 if bulk else 1,
        max_batch_size=256 * 1024 if bulk else 64 * 1024,
        max_request_size=2 * 1024 * 1024,
        compression_type="zstd" if bulk else None,
    )
