"""The admission process: wires Kafka, the room store, the admitter and the servicers."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import grpc

from townhall.admission.joins import Admitter
from townhall.admission.servicer import AdmissionServicer, RoomsServicer
from townhall.admission.store import RoomStore
from townhall.core.config import Config
from townhall.core.kafka import EventQueue, Topics, producer
from townhall.core.tickets import TicketSigner
from townhall.v1 import admission_pb2, admission_pb2_grpc, rooms_pb2, rooms_pb2_grpc


class AdmissionApp:
    """Rooms + Admission on one server; rooms are rebuilt from Kafka before serving."""

    service_names: Sequence[str] = (
        rooms_pb2.DESCRIPTOR.services_by_name["Rooms"].full_name,
        admission_pb2.DESCRIPTOR.services_by_name["Admission"].full_name,
    )

    def __init__(self, config: Config) -> None:
        self._config = config
        member = f"{socket.gethostname()}/{config.admission.listen}"
        self._producer = producer(config.kafka, client_id=f"admission-{member}")
        self.store = RoomStore(config.kafka, self._producer)
        self._events = EventQueue(self._producer, config.admission.event_queue)
        self.admitter = Admitter(
            self.store.book,
            TicketSigner(config.tickets.secret, config.tickets.ttl_s),
            config.admission.relays,
            self._events,
            Topics(config.kafka.topic_prefix),
            member,
            config.admission.default_listener_limit,
        )

    def register(self, server: grpc.aio.Server) -> None:
        rooms_pb2_grpc.add_RoomsServicer_to_server(RoomsServicer(self.store, self.admitter), server)
        admission_pb2_grpc.add_AdmissionServicer_to_server(AdmissionServicer(self.admitter), server)

    async def start(self) -> None:
        await self._producer.start()
        await self.store.load()
        self._events.start()

    async def drain(self) -> None:
        """Unary RPCs only: the server's grace period covers in-flight calls."""

    async def close(self) -> None:
        await self._events.close()
        await self._producer.stop()


def build_app(config: Config) -> AdmissionApp:
    """The admission app for a config."""
    return AdmissionApp(config)
