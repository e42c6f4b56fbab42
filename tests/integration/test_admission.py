"""Admission on a real Kafka broker: durable room changes, joins, and clear errors for bad input."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import REGISTRY

from tests.integration.helpers import client, config_for, metadata, rpc_error, serving, users, wait_for_record
from townhall.admission.app import AdmissionApp
from townhall.core.config import Config, KafkaConfig
from townhall.core.kafka import Topics
from townhall.core.tickets import TicketVerifier
from townhall.internal.v1.events_pb2 import PresenceEvent, RoomStarted
from townhall.v1 import admission_pb2, rooms_pb2
from townhall.v1.common_pb2 import Role, RoomState

pytestmark = pytest.mark.kafka
RELAY = "127.0.0.1:50999"


@pytest.fixture
def config(kafka: KafkaConfig) -> Config:
    return config_for(kafka, admission={"relays": (RELAY,)})


async def test_room_lifecycle_is_durable_and_announced(config: Config, kafka: KafkaConfig) -> None:
    host_id, other_id, _ = users()
    topics = Topics(kafka.topic_prefix)
    async with serving(AdmissionApp(config), config) as address:
        host = client(address, host_id)
        room = await host.create_room("Ask me anything", speakers=[other_id])
        assert room.state == RoomState.ROOM_STATE_CREATED
        live = await host.start_room(room.room_id)
        # Live (version 2), then announced once its room-started event was acknowledged (3).
        assert (live.state, live.version, live.announced) == (RoomState.ROOM_STATE_LIVE, 3, True)
        assert room.room_id in [r.room_id for r in await host.live_rooms()]
        # The start was acknowledged by Kafka before StartRoom returned.
        _, value = await wait_for_record(
            kafka, topics.room_started, lambda _k, v: RoomStarted.FromString(v).room.room_id == room.room_id
        )
        assert RoomStarted.FromString(value).room.host_id == host_id
        await host.close()

    # A new process rebuilds every room from the compacted topic.
    async with serving(AdmissionApp(config), config) as address:
        host = client(address, host_id)
        again = await host.get_room(room.room_id)
        assert (again.state, again.version, again.title) == (RoomState.ROOM_STATE_LIVE, 3, "Ask me anything")
        ended = await host.end_room(room.room_id)
        assert ended.state == RoomState.ROOM_STATE_ENDED
        await host.close()


async def test_only_the_host_starts_or_ends(config: Config) -> None:
    host_id, other_id, _ = users()
    async with serving(AdmissionApp(config), config) as address:
        host, other = (
            client(address, host_id),
            client(address, other_id),
        )
        room = await host.create_room("Mine")
        error = await rpc_error(other.start_room(room.room_id))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only the host" in (error.details() or "")
        error = await rpc_error(other.end_room(room.room_id))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        await host.close()
        await other.close()


async def test_join_grants_a_ticket_the_relay_can_verify(config: Config, kafka: KafkaConfig) -> None:
    host_id, speaker_id, listener_id = users()
    async with serving(AdmissionApp(config), config) as address:
        host = client(address, host_id)
        listener = client(address, listener_id)
        speaker = client(address, speaker_id)
        room = await host.create_room("Join me", speakers=[speaker_id])
        error = await rpc_error(listener.join(room.room_id))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not live" in (error.details() or "")
        await host.start_room(room.room_id)

        grant = await listener.join(room.room_id)
        assert (grant.role, grant.relay_address) == (Role.ROLE_LISTENER, RELAY)
        ticket = TicketVerifier.from_config(config.tickets).verify(grant.ticket, RELAY)
        assert (ticket.room_id, ticket.user_id, ticket.on_stage) == (room.room_id, listener_id, False)
        assert (await speaker.join(room.room_id)).role == Role.ROLE_SPEAKER
        assert (await host.join(room.room_id)).role == Role.ROLE_HOST

        # Join events reach Kafka in batches through the bounded queue, not in the RPC.
        def is_join(_key: bytes, value: bytes) -> bool:
            event = PresenceEvent.FromString(value)
            return event.room_id == room.room_id and listener_id in event.user_ids

        _, value = await wait_for_record(kafka, Topics(kafka.topic_prefix).presence, is_join)
        event = PresenceEvent.FromString(value)
        assert (event.kind, event.role) == (PresenceEvent.KIND_JOIN, Role.ROLE_LISTENER)
        for c in (host, listener, speaker):
            await c.close()


async def test_full_room_sheds_with_retry_after(config: Config) -> None:
    host_id, _, _ = users()
    async with serving(AdmissionApp(config), config) as address:
        host = client(address, host_id)
        room = await host.create_room("Tiny", listener_limit=2)
        await host.start_room(room.room_id)
        fans = [client(address, host_id + 100 + i) for i in range(3)]
        await fans[0].join(room.room_id)
        await fans[1].join(room.room_id)
        await fans[1].join(room.room_id)  # joining twice takes one place
        request = admission_pb2.JoinRequest(room_id=room.room_id)
        error = await rpc_error(fans[2].admission.Join(request, metadata=fans[2].metadata))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = dict(error.trailing_metadata() or ())["retry-after-ms"]
        assert 1000 <= int(retry) <= 3000
        await fans[0].leave(room.room_id)
        assert (await fans[2].join(room.room_id)).role == Role.ROLE_LISTENER
        for c in (host, *fans):
            await c.close()


async def test_bad_input_gets_a_clear_status(config: Config) -> None:
    host_id, _, _ = users()
    async with serving(AdmissionApp(config), config) as address:
        host = client(address, host_id)
        rooms = host.rooms
        md = metadata(host_id)
        cases: list[tuple[object, grpc.StatusCode, str]] = [
            (rooms.GetRoom(rooms_pb2.GetRoomRequest(room_id=""), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "room_id is required"),
            (rooms.GetRoom(rooms_pb2.GetRoomRequest(room_id="r" * 33), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "at most 32"),
            (rooms.GetRoom(rooms_pb2.GetRoomRequest(room_id="nosuchroom"), metadata=md), grpc.StatusCode.NOT_FOUND, "does not exist"),
            (rooms.StartRoom(rooms_pb2.StartRoomRequest(room_id="nosuchroom"), metadata=md), grpc.StatusCode.NOT_FOUND, "does not exist"),
            (rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title="x" * 201), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "at most 200"),
            (rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title="ok", speaker_ids=[0]), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "speaker_ids[0]"),
            (rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title="ok", speaker_ids=[host_id]), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "must not include the host"),
            (host.admission.Join(admission_pb2.JoinRequest(room_id="bad id!"), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "may only contain"),
            (host.admission.Join(admission_pb2.JoinRequest(room_id="nosuchroom"), metadata=md), grpc.StatusCode.NOT_FOUND, "does not exist"),
            (rooms.ListLiveRooms(rooms_pb2.ListLiveRoomsRequest(page_size=-1), metadata=md), grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative"),
        ]  # fmt: skip
        for call, code, message in cases:
            error = await rpc_error(call)
            assert (error.code(), message in (error.details() or "")) == (code, True), error.details()
        await host.close()


async def test_every_rpc_is_counted_by_method_and_status(config: Config) -> None:
    """Under the gRPC ecosystem's names and labels (go-grpc-prometheus), codes spelled as it spells them."""
    host_id, other_id, _ = users()

    def sample(name: str, method: str, **code: str) -> float:
        labels = {"grpc_type": "unary", "grpc_service": "townhall.v1.Rooms", "grpc_method": method, **code}
        return REGISTRY.get_sample_value(name, labels) or 0.0

    def counts() -> tuple[float, ...]:
        return (
            sample("grpc_server_started_total", "CreateRoom"),
            sample("grpc_server_handled_total", "CreateRoom", grpc_code="OK"),
            sample("grpc_server_handling_seconds_count", "CreateRoom"),
            sample("grpc_server_started_total", "StartRoom"),
            sample("grpc_server_handled_total", "StartRoom", grpc_code="PermissionDenied"),
            sample("grpc_server_started_total", "GetRoom"),
            sample("grpc_server_handled_total", "GetRoom", grpc_code="InvalidArgument"),
            sample("grpc_server_handling_seconds_count", "GetRoom"),
        )

    async with serving(AdmissionApp(config), config) as address:
        host, other = client(address, host_id), client(address, other_id)
        before = counts()
        room = await host.create_room("Counted")
        await rpc_error(other.start_room(room.room_id))
        await rpc_error(host.get_room(""))
        assert [after - was for after, was in zip(counts(), before, strict=True)] == [1] * 8
        await host.close()
        await other.close()
