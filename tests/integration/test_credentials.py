"""Credentials that are not master keys, on real servers (admission, relay and notifier on the real broker).

Internal calls live on an internal port and take a credential bound to its caller, the member called
and the method; client ports take none. Relays verify tickets but cannot make them. No process runs
on a development key it was not given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.integration.helpers import TOKENS, config_for, rpc_error, serving
from townhall.admission.app import AdmissionApp
from townhall.core.auth import Authenticator, bearer, internal_service
from townhall.core.config import DEV_ENV, Config, KafkaConfig
from townhall.core.credentials import SERVICE_KEY, ServiceCredential
from townhall.core.tickets import TICKET_KEY, TicketSigner
from townhall.core.tokens import SigningKey
from townhall.internal.v1 import internal_pb2, internal_pb2_grpc
from townhall.notifier.app import NotifierApp
from townhall.relay.app import RelayApp
from townhall.v1 import (
    admission_pb2,
    admission_pb2_grpc,
    graph_pb2,
    graph_pb2_grpc,
    relay_pb2,
    relay_pb2_grpc,
    rooms_pb2,
    rooms_pb2_grpc,
)
from townhall.v1.common_pb2 import Role

pytestmark = pytest.mark.kafka
RELAY = "credentials-relay:7000"
ACQUIRE = "/townhall.internal.v1.Leases/Acquire"
CREATE = "/townhall.internal.v1.Owner/CreateRoom"
IMPORT = "/townhall.v1.Graph/Import"
PULL = "/townhall.v1.Relay/Pull"
Md = tuple[tuple[str, str], ...]


@dataclass
class Site:
    """Admission, relay and notifier: each one's client and internal channel, and member address."""

    config: Config
    client: dict[str, grpc.aio.Channel]
    internal: dict[str, grpc.aio.Channel]
    member: dict[str, str]

    def credential(self, kind: str, me: str = "127.0.0.1:1") -> ServiceCredential:
        """The credentials a `kind` process at `me` mints (the cluster's service key)."""
        return Authenticator(self.config.auth, kind, me).credential


@asynccontextmanager
async def site(kafka: KafkaConfig, tmp_path: Path, **sections: dict[str, Any]) -> AsyncIterator[Site]:
    config = config_for(
        kafka,
        relay={"advertise": RELAY, "load_report_s": 0, "follow_room_state": False},
        notifier={"data_dir": str(tmp_path / uuid.uuid4().hex), "group_id": f"creds-{uuid.uuid4().hex[:8]}"},
        **sections,
    )
    async with AsyncExitStack() as stack:
        handle = Site(config, {}, {}, {})
        for kind, app in (("admission", AdmissionApp), ("relay", RelayApp), ("notifier", NotifierApp)):
            address = await stack.enter_async_context(serving(app(config), config))
            internal = getattr(config, kind).internal_listen
            handle.client[kind] = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            handle.internal[kind] = await stack.enter_async_context(grpc.aio.insecure_channel(internal))
            handle.member[kind] = internal
        yield handle


def internal_calls(s: Site, on: str) -> dict[str, Callable[[Md], Awaitable[Any]]]:
    """Each internal method, called on the `on` ("client" or "internal") port of its server."""
    ports = s.client if on == "client" else s.internal
    leases = internal_pb2_grpc.LeasesStub(ports["admission"])
    owner = internal_pb2_grpc.OwnerStub(ports["admission"])
    graph = graph_pb2_grpc.GraphStub(ports["notifier"])
    relay = relay_pb2_grpc.RelayStub(ports["relay"])
    acquire = internal_pb2.AcquireRequest(room_id="someroom", member="127.0.0.1:1", count=5)
    create = internal_pb2.ForwardedCreate(
        room_id="made-up", host_id=99, request=rooms_pb2.CreateRoomRequest(title="as someone else")
    )

    async def chunks() -> AsyncIterator[graph_pb2.ImportChunk]:  # 5 follows 6
        yield graph_pb2.ImportChunk(pairs=(5).to_bytes(8, "little") + (6).to_bytes(8, "little"))

    async def pull(md: Md) -> Any:
        call = relay.Pull(relay_pb2.PullRequest(room_id="someroom"), metadata=md)
        await call.initial_metadata()
        if call.done():
            await call.read()  # raises with the call's status
        call.cancel()
        return "open"

    return {
        ACQUIRE: lambda md: leases.Acquire(acquire, metadata=md),
        CREATE: lambda md: owner.CreateRoom(create, metadata=md),
        IMPORT: lambda md: graph.Import(chunks(), metadata=md),
        PULL: pull,
    }


KIND = {ACQUIRE: "admission", CREATE: "admission", IMPORT: "operator", PULL: "relay"}


async def listed_services(channel: grpc.aio.Channel) -> list[str]:
    """The services reflection lists on a port."""

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(ask(), timeout=10)
    reply = await stream.read()
    stream.cancel()
    return [service.name for service in reply.list_services_response.service]


SERVER = {ACQUIRE: "admission", CREATE: "admission", IMPORT: "notifier", PULL: "relay"}


async def test_internal_methods_are_served_only_on_the_internal_port(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    async with site(kafka, tmp_path) as s:
        # On a client port, not even a valid credential for the method opens it.
        for method, call in internal_calls(s, "client").items():
            valid = s.credential(KIND[method]).metadata(s.member[SERVER[method]], method)
            error = await rpc_error(call(valid))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert "served only on the internal port" in (error.details() or ""), error.details()
        # On the internal port they work, with the credential made for them.
        calls = internal_calls(s, "internal")
        md = {m: s.credential(KIND[m]).metadata(s.member[SERVER[m]], m) for m in calls}
        assert (await calls[ACQUIRE](md[ACQUIRE])).granted == 0  # no such room
        assert (await calls[IMPORT](md[IMPORT])).created == 1
        assert await calls[PULL](md[PULL]) == "open"
        # The internal port serves no client call, and no internal call without a credential.
        join = admission_pb2_grpc.AdmissionStub(s.internal["admission"]).Join(
            admission_pb2.JoinRequest(room_id="someroom"), metadata=TOKENS.metadata(7)
        )
        error = await rpc_error(join)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "client call: it is served on the client port" in (error.details() or "")
        for method, call in calls.items():
            for md_of_a_client in ((), TOKENS.metadata(7)):
                error = await rpc_error(call(md_of_a_client))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, method
                assert f"{SERVICE_KEY} (a service credential" in (error.details() or "")
        # Reflection on a client port lists what it serves: no internal service (grpcurl's view).
        for kind, channel in s.client.items():
            listed = await listed_services(channel)
            assert "grpc.health.v1.Health" in listed, listed
            assert not [name for name in listed if internal_service(name)], f"{kind} lists {listed}"
        # Peers probe health there; its health answers as the client port's does.
        for channel in s.internal.values():
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_credential_is_good_only_for_its_method_its_member_and_a_minute(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    async with site(kafka, tmp_path) as s:
        calls = internal_calls(s, "internal")
        # What one admission process sends another to take a lease: seen on the wire, kept, replayed.
        seen = s.credential("admission", "127.0.0.1:1").metadata(s.member["admission"], ACQUIRE)
        claims = jwt.decode(dict(seen)[SERVICE_KEY], options={"verify_signature": False})
        assert claims["sub"] == "admission@127.0.0.1:1"
        assert claims["aud"] == s.member["admission"] + ACQUIRE
        assert claims["exp"] - claims["iat"] <= 60
        error = await rpc_error(calls[CREATE](seen))  # another method on the same member
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not for this call" in (error.details() or "")
        elsewhere = s.credential("admission").metadata("10.9.9.9:50071", ACQUIRE)  # for another member
        error = await rpc_error(calls[ACQUIRE](elsewhere))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"takes one for '{s.member['admission']}{ACQUIRE}'" in (error.details() or "")
        # Each kind of process makes only its own kind of internal call.
        for method, kind in ((ACQUIRE, "relay"), (PULL, "admission"), (IMPORT, "relay")):
            wrong = s.credential(kind).metadata(s.member[SERVER[method]], method)
            error = await rpc_error(calls[method](wrong))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert f"not from {kind}@" in (error.details() or "")
        # A lease is taken for the member the credential names, never for another.
        other = internal_pb2.AcquireRequest(room_id="someroom", member="10.9.9.9:50071", count=5)
        leases = internal_pb2_grpc.LeasesStub(s.internal["admission"])
        error = await rpc_error(leases.Acquire(other, metadata=seen))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        # More rooms in the call: one answer each, in order; a room twice (the book would take the second
        # holding as the whole and forget the first grant) and more than 255 are refused, saying which.
        mine = internal_pb2.AcquireRequest(room_id="someroom", member="127.0.0.1:1", count=5)
        mine.more.add(room_id="room-b", count=3)
        mine.more.add(room_id="room-c", held=2)
        assert len((await leases.Acquire(mine, metadata=seen)).more) == 2
        mine.more.add(room_id="room-b")
        error = await rpc_error(leases.Acquire(mine, metadata=seen))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "more[2]: room room-b is asked for twice" in (error.details() or "")
        del mine.more[:]
        mine.more.extend(internal_pb2.RoomAsk(room_id=f"r{n}") for n in range(256))
        error = await rpc_error(leases.Acquire(mine, metadata=seen))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 255" in (error.details() or "")
        del mine.more[1:]
        mine.more[0].room_id = "no spaces"
        error = await rpc_error(leases.Acquire(mine, metadata=seen))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "more[0].room_id" in (
            error.details() or ""
        )
        # An expired credential (minted two minutes ago) and a forged one are refused.
        old = s.credential("admission").metadata(s.member["admission"], ACQUIRE, now=time.time() - 120)
        error = await rpc_error(calls[ACQUIRE](old))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in (error.details() or "")
        forged = ServiceCredential(SigningKey("dev", "not-the-clusters-service-key-0123"), "admission", "x:1")
        error = await rpc_error(calls[ACQUIRE](forged.metadata(s.member["admission"], ACQUIRE)))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "does not verify" in (
            error.details() or ""
        )


async def test_a_service_credential_on_a_client_port_is_refused_and_lifts_no_rate_limit(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    # One read a user per 50 s, bursts of 2: the third read within the test is over the limit.
    async with site(kafka, tmp_path, limits={"reads_user": 0.02, "burst_s": 100.0}) as s:
        rooms = rooms_pb2_grpc.RoomsStub(s.client["admission"])
        request = rooms_pb2.ListLiveRoomsRequest()
        user = TOKENS.metadata(7_400_001)
        # What a member sends when it forwards a call to this member: the user's token and a credential.
        forwarded = (
            *user,
            *s.credential("admission").metadata(s.member["admission"], "/townhall.v1.Rooms/ListLiveRooms"),
        )
        for _ in range(5):
            error = await rpc_error(rooms.ListLiveRooms(request, metadata=forwarded))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "accepted only on the internal port" in (error.details() or "")
        # The user's own reads are limited as anyone's.
        await rooms.ListLiveRooms(request, metadata=user)
        await rooms.ListLiveRooms(request, metadata=user)
        error = await rpc_error(rooms.ListLiveRooms(request, metadata=user))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Relay streams refuse it too.
        signer = TicketSigner.from_config(s.config.tickets)
        ticket = ((TICKET_KEY, signer.sign(signer.issue("room", 5, Role.ROLE_LISTENER, RELAY))),)
        stream = relay_pb2_grpc.RelayStub(s.client["relay"]).Subscribe(
            relay_pb2.SubscribeRequest(room_id="room"),
            metadata=(*ticket, *s.credential("relay").metadata(s.member["relay"], PULL)),
        )
        error = await rpc_error(stream.read())
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_relay_verifies_tickets_but_nothing_it_holds_can_make_one(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    async with site(kafka, tmp_path) as s:
        relay = relay_pb2_grpc.RelayStub(s.client["relay"])
        # What the relay is configured with: public keys and the service key, never a private key.
        relay_config = {k: v for k, v in DEV_ENV.items() if k != "TOWNHALL_TICKETS_PRIVATE_KEY"}
        claims = {
            "sub": "5",
            "room": "room",
            "role": Role.ROLE_HOST,
            "aud": RELAY,
            "exp": int(time.time()) + 60,
        }
        attempts = {
            f"HS256 with {name}": jwt.encode(
                claims, value.partition("=")[2], algorithm="HS256", headers={"kid": "dev"}
            )
            for name, value in relay_config.items()
        }
        attempts["ES256 with a key of its own"] = jwt.encode(
            claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "dev"}
        )
        for what, token in attempts.items():
            call = relay.Publish(_no_frames(), metadata=((TICKET_KEY, token),))
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, what
        # Admission's ticket (its private key) is taken.
        signer = TicketSigner.from_config(s.config.tickets)
        good = ((TICKET_KEY, signer.sign(signer.issue("room", 5, Role.ROLE_LISTENER, RELAY))),)
        stream = relay.Subscribe(relay_pb2.SubscribeRequest(room_id="room"), metadata=good)
        await stream.initial_metadata()
        assert not stream.done()
        stream.cancel()


async def _no_frames() -> AsyncIterator[relay_pb2.AudioFrame]:
    return
    yield


def _run_without_keys(service: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOWNHALL_")}
    return subprocess.run(
        [sys.executable, "-m", f"townhall.{service}"],
        env={**clean, "TOWNHALL_KAFKA_BOOTSTRAP": "127.0.0.1:1", **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("service", ["admission", "relay", "notifier"])
def test_a_process_without_configured_keys_refuses_to_start_naming_them(service: str, tmp_path: Path) -> None:
    done = _run_without_keys(service, tmp_path, TOWNHALL_NOTIFIER_DATA_DIR=str(tmp_path / "n"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert (
        f"townhall {service}: configuration error: {service} needs keys that are not configured"
        in done.stderr
    )
    assert "TOWNHALL_AUTH_SERVICE_KEYS" in done.stderr and "`townhall dev`" in done.stderr


async def test_a_deployment_with_a_jwks_does_not_accept_development_tokens(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    idp = Ed25519PrivateKey.generate()
    jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(idp.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "idp", "alg": "EdDSA", "use": "sig"}]}))
    config = config_for(kafka, auth={"keys": (), "jwks": str(path)})
    async with serving(AdmissionApp(config), config) as address, grpc.aio.insecure_channel(address) as ch:
        rooms = rooms_pb2_grpc.RoomsStub(ch)
        request = rooms_pb2.ListLiveRoomsRequest()
        error = await rpc_error(rooms.ListLiveRooms(request, metadata=bearer(TOKENS.mint(5))))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "key id 'dev' is not known here (keys: idp)" in (error.details() or "")
        claims = {"sub": "5", "exp": int(time.time()) + 600, "grants": ["subscribe"]}
        token = jwt.encode(claims, idp, algorithm="EdDSA", headers={"kid": "idp"})
        await rooms.ListLiveRooms(request, metadata=bearer(token))
