"""TLS and mutual TLS on real servers: clients, relay-to-relay pulls and forwarded calls all go through it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.helpers import client, config_for
from tests.integration.test_relay import TIMEOUT, frame_ids, frames, read_until
from townhall.admission.app import AdmissionApp
from townhall.core import server
from townhall.core.certs import Authority
from townhall.core.channels import channel
from townhall.core.config import DEV_ENV, Config, KafkaConfig, TlsConfig
from townhall.core.config import load as load_config
from townhall.core.sharding import owner
from townhall.core.tickets import TICKET_KEY, TicketSigner
from townhall.relay.app import RelayApp
from townhall.v1 import relay_pb2_grpc
from townhall.v1.common_pb2 import Role
from townhall.v1.relay_pb2 import SubscribeRequest
from townhall_tools.devtools.kafka_broker import free_port

# Certificates name this host only (no IP): members dial each other by IP and expect this name.
NAME = "townhall.test"
ROOM = "tls-room"
# The internal port of each relay `relays` started, by client address.
INTERNAL: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Pki:
    """A CA, a certificate it signed (server and client), and a stranger's certificate from another CA."""

    tls: TlsConfig
    stranger: TlsConfig

    def mutual(self) -> TlsConfig:
        return dataclasses.replace(self.tls, require_client_cert=True)

    def without_cert(self) -> TlsConfig:
        return dataclasses.replace(self.tls, cert="", key="")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder / "ca")
    pem = ca.issue("member", dns=(NAME,))
    tls = TlsConfig(enabled=True, cert=str(pem.cert), key=str(pem.key), ca=str(ca.ca), server_name=NAME)
    other = Authority(folder / "other", "Someone else's CA")
    theirs = other.issue("stranger", dns=(NAME,))
    # The stranger trusts our CA (to reach the server) but presents a certificate we never signed.
    stranger = dataclasses.replace(tls, cert=str(theirs.cert), key=str(theirs.key))
    return Pki(tls, stranger)


@contextlib.asynccontextmanager
async def relays(count: int, tls: TlsConfig, **env: str) -> AsyncIterator[list[str]]:
    """`count` relays serving with `tls` on free ports; their client addresses (index 0 is the origin).
    Each one's internal port is in INTERNAL."""
    started: list[tuple[RelayApp, server.Running]] = []
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    try:
        for address in addresses:
            INTERNAL[address] = f"127.0.0.1:{free_port()}"
            config = dataclasses.replace(
                load_config(
                    env={
                        **DEV_ENV,
                        "TOWNHALL_RELAY_LISTEN": address,
                        "TOWNHALL_RELAY_INTERNAL_LISTEN": INTERNAL[address],
                        "TOWNHALL_RELAY_METRICS_PORT": "0",
                        "TOWNHALL_RELAY_LOAD_REPORT_S": "0",
                        "TOWNHALL_RELAY_FOLLOW_ROOM_STATE": "false",
                        **env,
                    }
                ),
                tls=tls,
            )
            app = RelayApp(config)
            started.append((app, await server.start(app, config, address, INTERNAL[address])))
        yield addresses
    finally:
        for app, running in started:
            await server.stop(app, running, 1.0)


def ticket(relay: str, user: int, role: int, upstream: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    signer = TicketSigner.from_config(load_config(env=DEV_ENV).tickets)
    return ((TICKET_KEY, signer.sign(signer.issue(ROOM, user, role, relay, upstream=upstream))),)


async def first_chunk(address: str, tls: TlsConfig) -> object:
    """What a listener on `address` gets first while a speaker publishes to it."""
    async with channel(address, tls) as ch:
        stub = relay_pb2_grpc.RelayStub(ch)
        listener = stub.Subscribe(
            SubscribeRequest(room_id=ROOM), metadata=ticket(address, 100, Role.ROLE_LISTENER)
        )
        speaker = asyncio.ensure_future(
            stub.Publish(frames(25), metadata=ticket(address, 1, Role.ROLE_SPEAKER))
        )
        try:
            return await asyncio.wait_for(listener.read(), TIMEOUT)
        finally:
            listener.cancel()
            speaker.cancel()


async def refused(address: str, tls: TlsConfig) -> grpc.aio.AioRpcError:
    """The error a client dialling with `tls` gets (fails the test if it gets through)."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await first_chunk(address, tls)
    return error.value


async def test_a_tls_relay_serves_tls_clients_and_refuses_plaintext_and_unverified_ones(pki: Pki) -> None:
    async with relays(1, pki.tls) as [address]:
        chunk = await first_chunk(address, pki.tls)
        assert chunk is not grpc.aio.EOF
        assert (await refused(address, TlsConfig())).code() == grpc.StatusCode.UNAVAILABLE  # plaintext
        # The certificate names townhall.test: dialling 127.0.0.1 without expecting that name fails.
        wrong_name = dataclasses.replace(pki.tls, server_name="")
        assert (await refused(address, wrong_name)).code() == grpc.StatusCode.UNAVAILABLE
        # Server-side TLS only: a client without a certificate is served.
        assert await first_chunk(address, pki.without_cert()) is not grpc.aio.EOF


async def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(pki: Pki) -> None:
    async with relays(1, pki.mutual()) as [address]:
        assert await first_chunk(address, pki.tls) is not grpc.aio.EOF
        assert (await refused(address, pki.without_cert())).code() == grpc.StatusCode.UNAVAILABLE
        assert (await refused(address, pki.stranger)).code() == grpc.StatusCode.UNAVAILABLE


async def test_an_edge_pulls_from_the_origin_over_mutual_tls(pki: Pki) -> None:
    async with (
        relays(2, pki.mutual()) as [origin, edge],
        channel(origin, pki.tls) as o,
        channel(edge, pki.tls) as e,
    ):
        listener = relay_pb2_grpc.RelayStub(e).Subscribe(
            SubscribeRequest(room_id=ROOM),
            metadata=ticket(edge, 100, Role.ROLE_LISTENER, (INTERNAL[origin],)),
        )
        await asyncio.sleep(0.3)  # the edge opens its pull
        speaker = relay_pb2_grpc.RelayStub(o).Publish(
            frames(20), metadata=ticket(origin, 1, Role.ROLE_SPEAKER)
        )
        heard = await read_until(listener, lambda chunks: len(frame_ids(chunks)) >= 20)
        assert frame_ids([c for _, c in heard])[:20] == [(1, s) for s in range(20)]
        await asyncio.wait_for(speaker, TIMEOUT)


async def test_probes_check_a_plaintext_health_port_while_the_service_port_is_mutual_tls(pki: Pki) -> None:
    health_port = free_port()
    async with relays(1, pki.mutual(), TOWNHALL_SERVER_HEALTH_PORT=str(health_port)):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.kafka
async def test_admission_members_forward_and_lease_over_mutual_tls(
    pki: Pki, kafka: KafkaConfig, tmp_path: Path
) -> None:
    """Two admission processes, mutual TLS everywhere: clients, forwarded room changes and leases."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    members = tuple(f"127.0.0.1:{free_port()}" for _ in range(2))  # their internal ports
    client_of = dict(zip(members, addresses, strict=True))

    def config(me: str, internal: str) -> Config:
        base = config_for(
            kafka,
            admission={
                "listen": me,
                "internal_listen": internal,
                "members": members,
                "relays": ("127.0.0.1:1",),
                "relays_internal": ("127.0.0.1:2",),
            },
        )
        return dataclasses.replace(base, tls=pki.mutual())

    host = 9_000_001
    configs = [config(a, m) for a, m in zip(addresses, members, strict=True)]
    apps = [AdmissionApp(c) for c in configs]
    running = [
        await server.start(app, c, c.admission.listen, c.admission.internal_listen)
        for app, c in zip(apps, configs, strict=True)
    ]
    first = addresses[0]
    try:
        started = {}
        for address in addresses:
            c = client(address, host, tls=pki.tls)
            room = await c.create_room("Over mTLS")
            started[owner(room.room_id, members)] = room.room_id
            await c.close()
        # Whichever process owns a room, the other one forwards StartRoom to it over mutual TLS.
        for room_owner, room_id in started.items():
            other = next(client_of[m] for m in members if m != room_owner)
            c = client(other, host, tls=pki.tls)
            assert (await c.start_room(room_id)).state == 2
            await c.close()
        # A listener joining on a non-owner takes capacity leased from the owner (Leases.Acquire, mTLS).
        for room_owner, room_id in started.items():
            other = next(client_of[m] for m in members if m != room_owner)
            fan = client(other, 9_100_000, tls=pki.tls)
            assert (await fan.join(room_id, give_up_after_s=10)).role == Role.ROLE_LISTENER
            await fan.close()
        # And a client without a certificate gets nowhere.
        bare = client(first, host, tls=pki.without_cert())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await bare.live_rooms()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        await bare.close()
    finally:
        for app, one in zip(apps, running, strict=True):
            await server.stop(app, one, 1.0)
