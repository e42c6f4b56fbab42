"""Message size limits and rate limits on real servers (admission, relay, notifier; real Kafka).

What a caller notices: an oversize message is RESOURCE_EXHAUSTED from gRPC on every server and every
kind of call (stream messages too, and the plaintext health port); a caller over a rate limit is
RESOURCE_EXHAUSTED with a retry-after-ms trailer, per user and per client address, and an exempt
network is not limited per address.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.helpers import TOKENS, client, config_for, rpc_error, serving
from tests.integration.hostile import Method, all_methods
from townhall.admission.app import AdmissionApp
from townhall.client import MAX_RETRY_AFTER_S, retry_after_s, retry_hint_s
from townhall.core.auth import SERVICE, TICKET, Authenticator
from townhall.core.config import Config, KafkaConfig
from townhall.core.credentials import callers
from townhall.core.metrics import RATE_LIMITED
from townhall.core.server import App
from townhall.core.tickets import TICKET_KEY, TicketSigner
from townhall.notifier.app import NotifierApp
from townhall.relay.app import RelayApp
from townhall.v1 import admission_pb2, admission_pb2_grpc, rooms_pb2, rooms_pb2_grpc
from townhall.v1.common_pb2 import Role, RoomState
from townhall_tools.devtools.kafka_broker import free_port

pytestmark = pytest.mark.kafka

MAX = 64 * 1024
RELAY = "limits-relay:7000"


def _config(kafka: KafkaConfig, tmp_path: Path, **sections: dict[str, Any]) -> Config:
    return config_for(
        kafka,
        relay={"advertise": RELAY, "load_report_s": 0},
        notifier={"data_dir": str(tmp_path / uuid.uuid4().hex), "group_id": f"limits-{uuid.uuid4().hex[:8]}"},
        **sections,
    )


def _oversize() -> bytes:
    # Field 1000 (unknown to every request type), length-delimited: past the limit before any parsing.
    return b"\xc2\x3e" + b"\x80\x80\x05" + b"\0" * (MAX + 16_000)


def _credentials(config: Config, method: Method, member: str) -> tuple[tuple[str, str], ...]:
    """What a legitimate caller of `method` sends, so the call gets as far as reading its request
    (internal methods: a credential for `member`'s internal port from a process that may call them)."""
    if method.rule == SERVICE:
        kind = sorted(callers(method.service, method.path.rpartition("/")[2]))[0]
        return Authenticator(config.auth, kind, "127.0.0.1:1").credential.metadata(member, method.path)
    if method.rule == TICKET:
        signer = TicketSigner.from_config(config.tickets)
        return ((TICKET_KEY, signer.sign(signer.issue("room", 42, Role.ROLE_HOST, RELAY))),)
    return TOKENS.metadata(42)


async def _answer(
    channel: grpc.aio.Channel,
    path: str,
    client_streaming: bool,
    server_streaming: bool,
    md: tuple[tuple[str, str], ...] = (),
) -> Any:
    """The error of one call on `path` carrying an oversize message (a stream's first message)."""

    async def messages() -> AsyncIterator[bytes]:
        yield _oversize()

    if client_streaming:
        call: Any = (channel.stream_stream if server_streaming else channel.stream_unary)(path)(
            messages(), metadata=md
        )
    else:
        call = (channel.unary_stream if server_streaming else channel.unary_unary)(path)(
            _oversize(), metadata=md
        )
    if server_streaming:

        async def drain() -> None:
            async for _ in call:
                pass

        return await rpc_error(drain())
    return await rpc_error(call)


async def test_every_server_refuses_oversize_messages_of_every_kind_of_call(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    config = _config(kafka, tmp_path, server={"health_port": 0})
    apps: list[App] = [AdmissionApp(config), RelayApp(config), NotifierApp(config)]
    async with AsyncExitStack() as stack:
        for app in apps:
            address = await stack.enter_async_context(serving(app, config))
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            internal = getattr(config, app.auth.kind).internal_listen
            inner = await stack.enter_async_context(grpc.aio.insecure_channel(internal))
            # Every method of the app's services (and health): unary, server, client and bidi streams;
            # internal methods on the internal port.
            methods = [m for m in all_methods() if m.service in (*app.service_names, "grpc.health.v1.Health")]
            assert methods
            for m in methods:
                md = _credentials(config, m, app.auth.services.me)
                on = inner if m.rule == SERVICE else channel
                error = await _answer(on, m.path, m.client_streaming, m.server_streaming, md)
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (
                    m.path,
                    error.code(),
                    error.details(),
                )
                assert "larger than max" in (error.details() or ""), (m.path, error.details())


async def test_the_plaintext_health_port_has_the_same_size_limit(kafka: KafkaConfig, tmp_path: Path) -> None:
    port = free_port()
    config = _config(kafka, tmp_path, server={"health_port": port})
    async with serving(RelayApp(config), config), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        error = await _answer(channel, "/grpc.health.v1.Health/Check", False, False)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@asynccontextmanager
async def _admission(
    kafka: KafkaConfig, tmp_path: Path, limits: dict[str, Any], host: int
) -> AsyncIterator[tuple[admission_pb2_grpc.AdmissionStub, admission_pb2.JoinRequest]]:
    """An admission server with these [limits], a live room, and the Join request for it."""
    config = _config(kafka, tmp_path, limits=limits)
    async with (
        serving(AdmissionApp(config), config) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        rooms = rooms_pb2_grpc.RoomsStub(channel)
        md = TOKENS.metadata(host)
        room = await rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title="Limits"), metadata=md)
        await rooms.StartRoom(rooms_pb2.StartRoomRequest(room_id=room.room_id), metadata=md)
        yield admission_pb2_grpc.AdmissionStub(channel), admission_pb2.JoinRequest(room_id=room.room_id)


async def test_joins_are_limited_per_user_and_per_address(kafka: KafkaConfig, tmp_path: Path) -> None:
    # Slow refills (a token every 50 s per user, 16.7 s per address): nothing refills during the test.
    limits = {"joins_user": 0.02, "joins_address": 0.06, "burst_s": 100.0}
    async with _admission(kafka, tmp_path, limits, 7_100_001) as (joins, join):
        # One user: its burst (2), then refused with the retry-after the client library honours.
        for _ in range(2):
            await joins.Join(join, metadata=TOKENS.metadata(7_100_002))
        error = await rpc_error(joins.Join(join, metadata=TOKENS.metadata(7_100_002)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many joins and leaves by user 7100002: at most 0.02/s (bursts of 2)" in (
            error.details() or ""
        )
        assert 49 <= retry_after_s(error, default_s=-1) <= 76
        # Other users from the same address: the address's burst (6, two used above) runs out.
        answers = [await _code(joins.Join(join, metadata=TOKENS.metadata(7_100_100 + i))) for i in range(6)]
        assert answers.count(grpc.StatusCode.OK) == 3, answers
        error = await rpc_error(joins.Join(join, metadata=TOKENS.metadata(7_100_200)))
        assert "too many joins and leaves from address 127.0.0.1" in (error.details() or "")
        # A forged token counts in the address's budget of failed credentials, not its joins budget.
        forged = (("authorization", "Bearer a.b.c"),)
        error = await rpc_error(joins.Join(join, metadata=forged))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_exempt_network_is_not_limited_per_address(kafka: KafkaConfig, tmp_path: Path) -> None:
    limits = {"joins_address": 1.0, "burst_s": 1.0, "exempt": ("127.0.0.0/8",)}
    async with _admission(kafka, tmp_path, limits, 7_200_001) as (joins, join):
        for i in range(20):
            await joins.Join(join, metadata=TOKENS.metadata(7_200_100 + i))


async def test_relay_stream_opens_are_limited_per_ticket_user(kafka: KafkaConfig, tmp_path: Path) -> None:
    config = _config(kafka, tmp_path, limits={"streams_user": 0.01, "burst_s": 100.0})  # one open per 100 s
    signer = TicketSigner.from_config(config.tickets)
    async with serving(RelayApp(config), config) as address, grpc.aio.insecure_channel(address) as channel:
        subscribe = channel.unary_stream("/townhall.v1.Relay/Subscribe")
        request = b"\x0a\x04room"  # SubscribeRequest(room_id="room")

        def ticket(user: int) -> tuple[tuple[str, str], ...]:
            return ((TICKET_KEY, signer.sign(signer.issue("room", user, Role.ROLE_LISTENER, RELAY))),)

        first = subscribe(request, metadata=ticket(7_300_001))
        await asyncio.sleep(0.2)
        second = subscribe(request, metadata=ticket(7_300_001))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in second:
                pass
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many stream opens by user 7300001" in (refused.value.details() or "")
        other = subscribe(request, metadata=ticket(7_300_002))  # another user is not affected
        await asyncio.sleep(0.2)
        assert not other.done() and not first.done()
        first.cancel()
        other.cancel()


async def test_the_client_waits_out_a_short_retry_after_and_raises_a_long_one(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    """What the demo meets on a busy admission: room changes refused with a retry-after of a second or so
    go through once it has passed; one whose retry-after is long (past MAX_RETRY_AFTER_S) is the
    caller's to see at once."""
    refused = RATE_LIMITED.labels("changes", "user")
    # Bursts of 1 change, one more every 0.5 s: each change after the first is refused once or twice.
    config = _config(kafka, tmp_path, limits={"changes_user": 2.0, "burst_s": 0.5})
    async with serving(AdmissionApp(config), config) as address:
        host = client(address, 7_400_001)
        try:
            before = refused._value.get()
            room = await host.create_room("Busy admission")
            await host.start_room(room.room_id)
            await host.create_room("Busy admission, again")
            assert (await host.end_room(room.room_id)).state == RoomState.ROOM_STATE_ENDED
            assert refused._value.get() - before >= 3, "the server did refuse"
        finally:
            await host.close()
    # One change per 50 s: the second is refused with a retry-after of about a minute.
    config = _config(kafka, tmp_path, limits={"changes_user": 0.02, "burst_s": 50.0})
    async with serving(AdmissionApp(config), config) as address:
        host = client(address, 7_400_002)
        try:
            await host.create_room("Once a minute")
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await host.create_room("Too soon")
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_hint_s(error.value) > MAX_RETRY_AFTER_S
            assert time.monotonic() - began < MAX_RETRY_AFTER_S
        finally:
            await host.close()


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
