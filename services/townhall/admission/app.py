"""The admission process: wires Kafka, membership, the room store, capacity, the admitter and servicers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from townhall.admission.capacity import Capacity
from townhall.admission.cluster import AdmissionCluster
from townhall.admission.failover import Failover, StagePresence
from townhall.admission.fairness import FairBudget
from townhall.admission.joins import Admitter
from townhall.admission.metrics import PEERS_DOWN, RELAYS_KNOWN
from townhall.admission.moderation import ModerationServicer
from townhall.admission.placement import Placer
from townhall.admission.presence import Presence
from townhall.admission.relay_load import RelayLoadFollower
from townhall.admission.relays import RelayDirectory
from townhall.admission.retention import Retention
from townhall.admission.scheduler import Scheduler
from townhall.admission.servicer import (
    WATCH_ROOM,
    AdmissionServicer,
    LeasesServicer,
    OwnerServicer,
    RoomsServicer,
)
from townhall.admission.store import RoomStore
from townhall.admission.tallies import Tallies, TallyFollower
from townhall.admission.watch import WatchHub, preserialized
from townhall.core import logging
from townhall.core.auth import Authenticator
from townhall.core.config import AdmissionConfig, Config
from townhall.core.errors import TownhallError
from townhall.core.forwarding import Forwarding
from townhall.core.kafka import EventQueue, Topics, producer, wait_for_topics
from townhall.core.liveness import Prober
from townhall.core.membership import KubernetesMembership, Membership, ProbedMembership, StaticMembership
from townhall.core.provenance import ADMISSION, CROWD, RecordSigner, Writer
from townhall.core.room_records import AnyOwner, ListedOwners, Ownership, RoomRecords
from townhall.core.tasks import cancel, spawn
from townhall.core.tickets import TicketSigner
from townhall.internal.v1 import internal_pb2, internal_pb2_grpc
from townhall.internal.v1.events_pb2 import RelayLoad
from townhall.v1 import (
    admission_pb2,
    admission_pb2_grpc,
    moderation_pb2,
    moderation_pb2_grpc,
    rooms_pb2,
    rooms_pb2_grpc,
)
from townhall.v1.common_pb2 import Room, RoomState

log = logging.get(__name__)

_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# A relay whose last load report is older than this is quiet: placed on only when every relay is, and
# forgotten (if it was discovered, not configured) once its probes fail too.
RELAY_QUIET_S = 15.0
# How long a starting process waits for the relay-load topic to be read before its first probe round.
RELAY_READ_S = 10.0


def ownership_for(config: AdmissionConfig) -> Ownership:
    """Who this process takes for a room's owner when it reads room-state (core/room_records.py): one of
    the configured members, or (Kubernetes membership, a single process) any admission process."""
    if config.membership == "static" and config.members:
        return ListedOwners(config.members)
    return AnyOwner()


def membership_for(config: AdmissionConfig) -> Membership:
    """Static members from config, or the ready endpoints of the admission headless Service."""
    if config.membership == "kubernetes":
        namespace = config.kube_namespace or (
            _NAMESPACE_FILE.read_text().strip() if _NAMESPACE_FILE.exists() else "default"
        )
        return KubernetesMembership(config.address, config.kube_service, namespace, config.kube_port or None)
    return StaticMembership(config.address, config.members, owns=config.owner)


class AdmissionApp:
    """Rooms + Admission on one server; rooms are rebuilt from Kafka before serving, then followed."""

    service_names: Sequence[str] = (
        rooms_pb2.DESCRIPTOR.services_by_name["Rooms"].full_name,
        admission_pb2.DESCRIPTOR.services_by_name["Admission"].full_name,
        moderation_pb2.DESCRIPTOR.services_by_name["Moderation"].full_name,
        internal_pb2.DESCRIPTOR.services_by_name["Leases"].full_name,
        internal_pb2.DESCRIPTOR.services_by_name["Owner"].full_name,
    )

    def __init__(self, config: Config) -> None:
        self._config = config
        own = config.admission
        self.max_concurrent_rpcs = own.max_concurrent_rpcs
        self.max_calls_per_address = own.max_calls_per_address
        self.server_options = {
            "grpc.server.max_pending_requests": own.max_pending_requests,
            "grpc.server.max_pending_requests_hard_limit": 2 * own.max_pending_requests,
        }
        self._marking: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        member = f"{socket.gethostname()}/{own.listen}"
        self._producer = producer(config.kafka, client_id=f"admission-{member}")
        signer = RecordSigner(config.auth, Writer(ADMISSION if own.owner else CROWD, own.address))
        records = RoomRecords(config.kafka, config.auth, ownership_for(own))
        self.store = RoomStore(
            config.kafka, self._producer, signer, records, own.rooms_per_host_per_hour, f"admission-{member}"
        )
        self._listed = membership_for(own)
        relay = config.relay
        report_s = relay.load_report_s
        # The relays: the configured seeds plus those found in the load reports, probed before use.
        self.relays = RelayDirectory(
            own.relays,
            own.max_relays,
            quiet_s=max(RELAY_QUIET_S, 3 * report_s),
            seeds_internal=own.relays_internal,
        )
        # Health probes of the other members and of the relays: the dead own no rooms, get no listeners.
        # A relay is probed at its internal address (the directory's): its advertised one may be reachable
        # from the clients' side only (kind's per-relay NodePorts on the host's 127.0.0.1).
        self.prober = Prober(
            lambda: [*self._listed.members(), *self.relays.targets()],
            own.probe_interval_s,
            own.probe_timeout_s,
            own.probe_failures,
            skip=(own.address,),
            tls=config.tls,
            busy_failures=own.probe_busy_failures,
            address=self.relays.internal,
        )
        self.membership = ProbedMembership(self._listed, self.prober.liveness, owns=own.owner)
        self.auth = Authenticator(config.auth, "admission", own.address)
        self.peers = AdmissionCluster(self.membership, Forwarding(self.auth), config.tls)
        self.capacity = Capacity(
            self.store.book,
            self.peers,
            own.default_listener_limit,
            own.lease_min,
            own.lease_max,
            own.crowd_joins_per_s,
            self._mark_crowd,
        )
        self._events = EventQueue(self._producer, config.admission.event_queue, signer)
        self.placer = Placer(
            own.relays, relay.edge_target, relay.tree_degree, relay.listener_capacity, stale_s=RELAY_QUIET_S
        )
        self._placeable: list[str] = list(own.relays)
        # Host failover reads who of each room's hosts is connected from the same relay reports.
        self.stage_presence = StagePresence(fresh_s=max(3 * report_s, 1.0))
        self._relay_loads = RelayLoadFollower(
            config.kafka, config.auth, self.placer, self._relay_reported, self._relay_gone
        )
        self.presence = Presence(
            self._events,
            Topics(config.kafka.topic_prefix).presence,
            member,
            own.event_queue,
            seats=self.capacity.seats,
        )
        # Listeners seated on the other admission processes, from their tallies on the presence topic.
        self.tallies = Tallies(member)
        self._tally_follower = TallyFollower(config.kafka, config.auth, self.tallies)
        self.admitter = Admitter(
            self.store.book,
            TicketSigner.from_config(config.tickets),
            self.relays,
            self.presence,
            self.capacity,
            FairBudget(own.admit_rate),
            own.waiting_room,
            self.placer,
        )
        self.watches = WatchHub(
            self.store.book,
            lambda room_id: self.admitter.listeners(room_id) + self.tallies.listeners(room_id),
            own.watch_interval_s,
            own.watch_counts_s,
            own.max_watch_streams,
            own.max_watch_streams_per_user,
        )
        self.store.on_change = self._changed
        self.scheduler = Scheduler(self.store, self.peers.is_owner)
        self.retention = Retention(
            self.store, self.peers.is_owner, config.tickets.ttl_s, own.unstarted_room_ttl_s
        )
        self.failover = (
            Failover(self.store, self.stage_presence, self.peers.is_owner, own.host_grace_s)
            if own.host_grace_s
            else None
        )
        if own.host_grace_s and not relay.load_report_s:
            log.warning("host failover cannot see who is connected: relay.load_report_s is 0")
        self._members: list[str] = []
        self.prober.on_round(self._probed)

    def _relay_reported(self, report: RelayLoad) -> None:
        self.stage_presence.observe_report(report)
        # A new relay is probed in the next round; it gets listeners once a probe finds it serving.
        self.relays.report(report.relay, report.at_ms / 1000, time.time(), report.internal)

    def _relay_gone(self, relay: str) -> None:
        if self.relays.gone(relay):
            self.placer.forget(relay)
            self._place_relays()

    def _place_relays(self) -> None:
        """Gives the placer the relays it may place on: seeds, and discovered relays probed serving."""
        serving = self.prober.liveness.is_up
        for relay in self.relays.prune(serving, time.time()):
            self.placer.forget(relay)
        placeable = self.relays.placeable(serving)
        if placeable != self._placeable:
            log.info("relays changed", relays=placeable, before=self._placeable)
            self._placeable = placeable
            self.placer.set_relays(placeable)
        RELAYS_KNOWN.set(len(self.relays))

    def _probed(self) -> None:
        """After each probe round: hand lease books over if the owners changed, place on serving relays."""
        members = self.membership.members()
        if members != self._members:
            before, self._members = self._members, members
            log.info("admission members changed", members=members, before=before)
            if before:
                self.capacity.members_changed(before, members)
            self.store.writers.keep_owned(self.peers.is_owner)
        # Only relays a probe found serving get listeners: one not probed yet is not up either.
        self._place_relays()
        is_up = self.prober.liveness.is_up
        relays = self.relays.targets()
        self.placer.set_up([r for r in relays if is_up(r)])
        peers = [m for m in self._listed.members() if m != self.membership.me]
        PEERS_DOWN.labels("relay").set(sum(not is_up(r) for r in relays))
        PEERS_DOWN.labels("admission").set(sum(not is_up(m) for m in peers))

    def _changed(self, room: Room) -> None:
        self.watches.changed(room)
        if room.state == RoomState.ROOM_STATE_ENDED:
            self.admitter.forget(room.room_id)
            self.tallies.forget(room.room_id)
        elif room.state == RoomState.ROOM_STATE_LIVE:
            # Lease ahead of the first join, so no join waits for capacity from the owner.
            self.capacity.allowance(room.room_id)

    def _mark_crowd(self, room_id: str) -> None:
        """The owner saw the room's join demand pass admission.crowd_joins_per_s: record it (once)."""
        if room_id in self._marking:
            return
        self._marking.add(room_id)
        task = spawn(self._record_crowd(room_id), "mark-crowd")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record_crowd(self, room_id: str) -> None:
        try:
            await self.store.mark_crowd(room_id)
            log.info("room draws a crowd: its clients join on the crowd lane", room=room_id)
        except TownhallError as exc:
            log.warning("could not mark the room crowd", room=room_id, error=str(exc))
        finally:
            self._marking.discard(room_id)

    def register(self, server: grpc.aio.Server) -> None:
        rooms = RoomsServicer(self.store, self.admitter, self.peers, self.watches)
        # WatchRoom writes updates serialised once for every stream of a room (admission/watch.py).
        rooms_pb2_grpc.add_RoomsServicer_to_server(rooms, preserialized(server, (WATCH_ROOM,)))
        admission_pb2_grpc.add_AdmissionServicer_to_server(AdmissionServicer(self.admitter), server)
        moderation = ModerationServicer(self.store, self.peers, self._config.tickets.ttl_s)
        moderation_pb2_grpc.add_ModerationServicer_to_server(moderation, server)
        internal_pb2_grpc.add_LeasesServicer_to_server(LeasesServicer(self.capacity), server)
        internal_pb2_grpc.add_OwnerServicer_to_server(OwnerServicer(self.store, self.peers), server)

    async def start(self) -> None:
        """Waits for Kafka and the topics (server.kafka_wait_s), reads the rooms, then starts the loops."""
        topics = Topics(self._config.kafka.topic_prefix)
        await wait_for_topics(self._config.kafka, topics.used_by(ADMISSION), self._config.server.kafka_wait_s)
        if isinstance(self._listed, KubernetesMembership):
            self._listed.start()
        # Every relay that reports is known before the first probe round (and so before serving).
        self._relay_loads.start()
        if not await self._relay_loads.wait_read(RELAY_READ_S):
            log.warning("relay load reports not read yet: relays are found as their reports arrive")
        # One round before serving, so this process owns no room of a member that is down, and
        # places listeners only on relays found serving.
        await self.prober.round()
        self.prober.start()
        await self._producer.start()
        await self.store.load()
        await self.store.follow()
        if taken := self.capacity.started():
            log.info("rooms taken over at start: leases wait for the members' reports", rooms=taken)
        for room in self.store.book.live():
            self.capacity.allowance(room.room_id)
        await self._tally_follower.start()
        self._events.start()
        self.presence.start()
        self.watches.start()
        self.capacity.start()
        self.scheduler.start()
        self.retention.start()
        if self.failover is not None:
            self.failover.start()

    async def leave(self) -> None:
        """Stops owning rooms (changes go to the next owner), then lets the changes in flight finish.

        Only then does the server report NOT_SERVING, so the next owner never takes a room while a
        change of it is still being written here. Joins are served until the server stops.
        """
        self.membership.leave()
        self._probed()
        await self.store.quiesce()
        log.info("rooms handed over", members=self.membership.members())

    async def drain(self) -> None:
        """Ends the WatchRoom streams (clients watch again elsewhere); unary calls finish in the grace."""
        self.watches.drain()

    async def close(self) -> None:
        if isinstance(self._listed, KubernetesMembership):
            self._listed.stop()
        await cancel(*self._tasks)
        await self.prober.close()
        await self.scheduler.close()
        await self.retention.close()
        if self.failover is not None:
            await self.failover.close()
        await self._relay_loads.close()
        await self.watches.close_all()
        await self._tally_follower.close()
        await self.capacity.close()
        await self.store.stop()
        await self.peers.close()
        await self.presence.close()
        await self._events.close()
        await self._producer.stop()


def build_app(config: Config) -> AdmissionApp:
    """The admission app for a config."""
    return AdmissionApp(config)
