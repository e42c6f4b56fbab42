"""The relay service's App: the hub, the servicer and their lifecycle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc

from townhall.core import logging
from townhall.core.auth import Authenticator
from townhall.core.config import Config
from townhall.core.kafka import Topics, wait_for_topics
from townhall.core.tasks import cancel, supervise
from townhall.core.tickets import TicketVerifier
from townhall.relay import metrics
from townhall.relay.fanout import FanoutSettings
from townhall.relay.guard import REPLACED, Guard, Watch
from townhall.relay.hub import RelayRooms
from townhall.relay.leaves import LeaveFollower
from townhall.relay.load_report import LoadReporter
from townhall.relay.room_state import RoomStateFollower
from townhall.relay.servicer import SERVICE, RelayServicer, generic_handler
from townhall.relay.upstream import Upstreams

log = logging.get(__name__)

EXPIRE_EVERY_S = 60.0


class RelayApp:
    """One relay process: rooms, chunk timers and the Relay service."""

    service_names: Sequence[str] = (SERVICE,)

    def __init__(self, config: Config, idle_room_s: float = 60.0) -> None:
        relay = config.relay
        settings = FanoutSettings(
            subscriber_queue=relay.subscriber_queue,
            stuck_cutoff_s=relay.stuck_cutoff_s,
            ring_chunks=relay.ring_chunks,
            late_join_s=relay.late_join_s,
        )
        # Public keys only: a relay verifies tickets and cannot make one.
        tickets = TicketVerifier.from_config(config.tickets)
        self.auth = Authenticator(config.auth, "relay", relay.internal_address)
        self.upstreams = Upstreams(config.server.max_message_bytes, config.tls, self.auth.credential)
        self.hub = RelayRooms(
            settings,
            chunk_s=relay.chunk_s,
            idle_s=idle_room_s,
            upstreams=self.upstreams,
            large_chunk_s=relay.large_room_chunk_s,
            large_downstream=relay.large_room_relays,
            upstream_lost_s=relay.upstream_lost_s,
            lost_report_s=relay.upstream_lost_report_s,
        )
        self._flush_s = 2 * max(relay.chunk_s, relay.large_room_chunk_s)
        # Moderation: the rooms' rules from the room-state topic, enforced on this relay's streams.
        self.guard = Guard(relay.streams_per_user, config.tickets.ttl_s, on_replaced=_replaced)
        self.rooms: RoomStateFollower | None = None
        self.leaves: LeaveFollower | None = None
        if relay.follow_room_state:
            self.rooms = RoomStateFollower(config.kafka, config.auth, self.guard)
            self.leaves = LeaveFollower(config.kafka, config.auth, self.guard, relay.address)
        self.reporter = LoadReporter(config, self.hub, self.guard.leads)
        self.hub.announce = self.reporter.announce
        # The topics it writes (load reports) and follows (moderation); none for a relay without Kafka.
        topics = Topics(config.kafka.topic_prefix)
        self._topics = [topics.relay_load] if relay.load_report_s else []
        if relay.follow_room_state:
            self._topics += [topics.room_state, topics.presence]
        self._kafka = config.kafka
        self._kafka_wait_s = config.server.kafka_wait_s
        self.servicer = RelayServicer(self.hub, tickets, relay, self.guard)
        self._expiry: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the Relay service (Subscribe writes pre-serialised chunks)."""
        server.add_generic_rpc_handlers((generic_handler(self.servicer),))

    async def start(self) -> None:
        """Waits for Kafka and its topics (server.kafka_wait_s), reads the rooms' rules, then starts the sweep
        and the load report (timers, pulls: per room)."""
        await wait_for_topics(self._kafka, self._topics, self._kafka_wait_s)
        if self.rooms is not None:
            await self.rooms.load()
            await self.rooms.follow()
        if self.leaves is not None:
            await self.leaves.start()
        self._expiry = supervise(self._expire_forever(), "relay-expiry")
        await self.hub.start()
        self.reporter.start()

    async def leave(self) -> None:
        """Nothing to hand over before NOT_SERVING: admission stops placing here once it sees it."""

    async def drain(self) -> None:
        """Moves speakers first, then ends every stream; listeners reconnect elsewhere and resume.

        Runs after the drain notice, so admission already sends joins to other relays. Publish
        streams end at their next frame; the frames already here still go out in the next chunks
        (two chunk intervals), then Subscribe and Pull streams end with UNAVAILABLE.
        """
        self.hub.stop_publishing()
        await asyncio.sleep(self._flush_s)
        self.hub.drain()

    async def close(self) -> None:
        """Stops the load report, the chunk timers, the pulls and the sweep."""
        await cancel(self._expiry)
        await self.reporter.close()
        if self.rooms is not None:
            await self.rooms.close()
        if self.leaves is not None:
            await self.leaves.close()
        await self.hub.close()
        await self.upstreams.close()

    async def _expire_forever(self) -> None:
        """Forgets leaves and ended rooms' rules once every ticket they judge has expired."""
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            dropped = self.guard.expire(time.time_ns() // 1_000_000)
            metrics.LEAVES.set(self.guard.leaves)
            if dropped:
                log.info("ended rooms forgotten", rooms=dropped)


def _replaced(watch: Watch) -> None:
    metrics.STREAMS_REVOKED.labels(REPLACED).inc()
    log.info("stream replaced by a newer one", room=watch.room_id, user=watch.user_id, stream=watch.kind)


def build_app(config: Config) -> RelayApp:
    """The relay App for `run_service`."""
    return RelayApp(config)
