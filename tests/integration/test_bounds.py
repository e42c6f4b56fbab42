"""Bounds on what a caller can hold on real servers (admission, relay, notifier on loopback; real Kafka).

What a user notices: a few hundred health Watch streams opened with no token, and calls whose request
never comes, all from one address, lock nobody else out of admission (joins and room changes work from
another address, probes answer SERVING); relay and notifier streams are bounded per connection and per
address; open streams end on their own; garbage tokens do not use up the rate budget of the users
behind the same address; a malformed token is UNAUTHENTICATED, never INTERNAL; a peer that refuses its
probes is busy, not serving.

A server listening on [::] sees 127.0.0.1 and ::1 as two client addresses: one machine, two callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.integration.helpers import TOKENS, config_for, dial, join_outcome, rpc_error, serving
from townhall.admission.app import AdmissionApp
from townhall.core.auth import GRANTS, bearer, mint
from townhall.core.config import DEV_USER_KEY, Config, KafkaConfig
from townhall.core.errors import REASON_KEY
from townhall.core.interceptor import LIFETIME
from townhall.core.liveness import Probe, Prober
from townhall.core.server import App
from townhall.core.tickets import TICKET_KEY, TicketSigner
from townhall.core.tokens import SigningKey, b64
from townhall.notifier.app import NotifierApp
from townhall.relay.app import RelayApp
from townhall.v1 import (
    admission_pb2_grpc,
    inbox_pb2,
    inbox_pb2_grpc,
    relay_pb2,
    relay_pb2_grpc,
    rooms_pb2,
    rooms_pb2_grpc,
)
from townhall.v1.common_pb2 import Role
from townhall_tools.devtools.kafka_broker import free_port

pytestmark = pytest.mark.kafka

V4, V6 = "127.0.0.1", "[::1]"
RELAY = "bounds-relay:7000"
OPEN_STREAM_S = 4.0
JOIN = "/townhall.v1.Admission/Join"


def _config(kafka: KafkaConfig, tmp_path: Path, **sections: dict[str, Any]) -> Config:
    server = {"open_stream_max_s": OPEN_STREAM_S, **sections.pop("server", {})}
    return config_for(
        kafka,
        server=server,
        relay={"advertise": RELAY, "load_report_s": 0},
        notifier={"data_dir": str(tmp_path / uuid.uuid4().hex), "group_id": f"bounds-{uuid.uuid4().hex[:8]}"},
        **sections,
    )


async def _never() -> AsyncIterator[bytes]:
    """A request stream that sends nothing and never half-closes."""
    await asyncio.Event().wait()
    yield b""  # pragma: no cover


async def _watch(channel: grpc.aio.Channel) -> Any:
    """A health Watch, once it is open (its first answer came) or refused."""
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    with contextlib.suppress(grpc.aio.AioRpcError):
        await asyncio.wait_for(call.read(), 10)
    return call


async def _settle(calls: Sequence[Any], refused: int, within_s: float = 10.0) -> tuple[list[Any], list[Any]]:
    """(calls still open, calls that ended) once at least `refused` calls ended, or `within_s` passed."""
    for _ in range(int(within_s / 0.05)):
        if sum(c.done() for c in calls) >= refused:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # anything else about to be refused
    return [c for c in calls if not c.done()], [c for c in calls if c.done()]


async def _statuses(calls: Sequence[Any]) -> list[tuple[grpc.StatusCode, str]]:
    return [(await c.code(), await c.details()) for c in calls]


def _cancel(calls: Sequence[Any]) -> None:
    for call in calls:
        call.cancel()


async def test_open_streams_and_stalled_calls_from_one_address_lock_nobody_out_of_admission(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    health_port = free_port()
    config = _config(kafka, tmp_path, server={"health_port": health_port})  # admission's defaults otherwise
    async with serving(AdmissionApp(config), config, host="[::]") as address:
        attacker = [dial(address, V4) for _ in range(10)]
        user = dial(address, V6)
        probes = grpc.aio.insecure_channel(f"{V4}:{health_port}")
        prober = Prober(lambda: [], 1.0, 5.0, 2)
        held: list[Any] = []
        try:
            # No token: 300 health Watch streams that never end (more than max_concurrent_rpcs, 256),
            # opened in waves, each wave open before the next (all at once, gRPC's queue would shed some).
            watches: list[Any] = []
            for wave in range(12):
                watches += await asyncio.gather(*(_watch(attacker[(wave + i) % 10]) for i in range(25)))
            # With valid tokens: 100 Joins whose request never comes (held up to request_timeout_s).
            stalled = []
            for i in range(100):
                stalled.append(
                    attacker[i % 10].stream_unary(JOIN)(_never(), metadata=TOKENS.metadata(7_400_000 + i))
                )
                if i % 10 == 9:
                    await asyncio.sleep(0.1)
            held, ended = await _settle([*watches, *stalled], refused=300)

            # Another address: room changes and joins work, and so do the probes.
            rooms = rooms_pb2_grpc.RoomsStub(user)
            md = TOKENS.metadata(7_401_000)
            room = await rooms.CreateRoom(
                rooms_pb2.CreateRoomRequest(title="Flooded"), metadata=md, timeout=10
            )
            await rooms.StartRoom(rooms_pb2.StartRoomRequest(room_id=room.room_id), metadata=md, timeout=10)
            joined, error = await join_outcome(
                admission_pb2_grpc.AdmissionStub(user), room.room_id, TOKENS.metadata(7_401_001)
            )
            assert joined == "granted", error
            assert await prober.probe(f"{V6}:{address.rpartition(':')[2]}") is Probe.SERVING
            # The kubelet's port is a server of its own: the flooding address does not reach its bounds.
            reply = await health_pb2_grpc.HealthStub(probes).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            # The flooding address holds at most admission.max_calls_per_address (64) calls, of which at
            # most server.max_open_streams_per_address (4) are Watch streams; the rest were refused at once.
            assert len(held) <= 64 and sum(c in held for c in watches) <= 4
            # (A few may be CANCELLED by gRPC's own queue of calls not yet taken.)
            refusals = [(c, d) for c, d in await _statuses(ended) if c != grpc.StatusCode.CANCELLED]
            assert len(refusals) >= 300
            assert {code for code, _ in refusals} == {grpc.StatusCode.RESOURCE_EXHAUSTED}, refusals[:3]
            assert all("from address 127.0.0.1" in details for _, details in refusals), refusals[:3]

            # Watch streams end on their own at server.open_stream_max_s, saying so.
            open_watches = [c for c in held if c in watches]
            assert open_watches
            for call in open_watches:
                async with asyncio.timeout(OPEN_STREAM_S + 10):
                    while await call.read() is not grpc.aio.EOF:
                        pass
                assert await call.code() == grpc.StatusCode.OK
                assert (REASON_KEY, LIFETIME) in tuple(await call.trailing_metadata() or ())
        finally:
            _cancel(held)
            await prober.close()
            for channel in (*attacker, user, probes):
                await channel.close()


def _inbox(channel: grpc.aio.Channel, user: int, config: Config) -> Any:
    return inbox_pb2_grpc.InboxStub(channel).Subscribe(
        inbox_pb2.InboxSubscribeRequest(), metadata=TOKENS.metadata(user)
    )


def _subscribe(channel: grpc.aio.Channel, user: int, config: Config) -> Any:
    signer = TicketSigner.from_config(config.tickets)
    ticket = signer.sign(signer.issue("bounded-room", user, Role.ROLE_LISTENER, RELAY))
    return relay_pb2_grpc.RelayStub(channel).Subscribe(
        relay_pb2.SubscribeRequest(room_id="bounded-room"), metadata=((TICKET_KEY, ticket),)
    )


@pytest.mark.parametrize(
    ("build", "open_stream"), [(NotifierApp, _inbox), (RelayApp, _subscribe)], ids=["notifier", "relay"]
)
async def test_streams_are_bounded_per_connection_and_per_address(
    kafka: KafkaConfig,
    tmp_path: Path,
    build: Callable[[Config], App],
    open_stream: Callable[[grpc.aio.Channel, int, Config], Any],
) -> None:
    config = _config(kafka, tmp_path, server={"max_calls_per_connection": 20, "max_calls_per_address": 50})
    async with serving(build(config), config, host="[::]") as address:
        channels = [dial(address, V4) for _ in range(4)]
        other = dial(address, V6)
        calls: list[Any] = []
        try:
            # One connection: 30 streams, 20 stay open.
            first = [open_stream(channels[0], 7_500_000 + i, config) for i in range(30)]
            calls += first
            held, ended = await _settle(first, refused=10)
            assert len(held) == 20, f"{len(held)} streams open on one connection"
            one = held[0]
            details = {d for _, d in await _statuses(ended)}
            assert all("on this connection: at most 20" in d for d in details), details
            # Three more connections of the same address: 50 open in all.
            more = [open_stream(channels[1 + i % 3], 7_500_100 + i, config) for i in range(45)]
            calls += more
            held, ended = await _settle(more, refused=15)
            assert len(held) == 30, f"{len(held)} more streams open from the address"
            details = {d for _, d in await _statuses(ended)}
            assert all("from address 127.0.0.1: at most 50" in d for d in details), details
            # Another address is not affected.
            theirs = open_stream(other, 7_500_999, config)
            calls.append(theirs)
            await asyncio.sleep(0.5)
            assert not theirs.done()
            # A stream that ends gives its room back.
            one.cancel()
            await asyncio.sleep(0.5)
            again = open_stream(channels[0], 7_501_000, config)
            calls.append(again)
            await asyncio.sleep(0.5)
            assert not again.done()
        finally:
            _cancel(calls)
            for channel in (*channels, other):
                await channel.close()


async def test_open_streams_end_on_their_own_and_health_names_are_bounded(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    config = _config(kafka, tmp_path, server={"request_timeout_s": 1.0})
    async with serving(RelayApp(config), config) as address, grpc.aio.insecure_channel(address) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        # Opened and never asked anything: ended after request_timeout_s.
        idle = reflect.ServerReflectionInfo(_idle_requests())
        error = await rpc_error(_drain(idle))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no request on this stream within 1 s" in (error.details() or "")
        # Asked again and again: served until its lifetime, then ended.
        started = time.monotonic()
        busy = reflect.ServerReflectionInfo(_list_services_every(0.5))
        answers = 0
        async with asyncio.timeout(OPEN_STREAM_S + 10):
            async for _ in busy:
                answers += 1
        assert await busy.code() == grpc.StatusCode.OK and answers >= 3
        assert OPEN_STREAM_S - 1 <= time.monotonic() - started <= OPEN_STREAM_S + 5
        # A health service name is bounded (a Watch holds its name while open).
        health = health_pb2_grpc.HealthStub(channel)
        for call in (health.Check, health.Watch):
            error = await rpc_error(_drain(call(health_pb2.HealthCheckRequest(service="s" * 300))))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "service is 300 bytes; a service name is at most 256" in (error.details() or "")


async def _idle_requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
    await asyncio.Event().wait()
    yield reflection_pb2.ServerReflectionRequest()  # pragma: no cover


async def _list_services_every(interval_s: float) -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
    for _ in range(1000):
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        await asyncio.sleep(interval_s)


async def _drain(call: Any) -> None:
    if hasattr(call, "__aiter__"):
        async for _ in call:
            pass
    else:
        await call


def _token(header: bytes, payload: bytes) -> tuple[tuple[str, str], ...]:
    """A token with this header and payload, signed with the development user key."""
    secret = DEV_USER_KEY.split("=", 1)[1]
    body = b64(header) + b"." + b64(payload)
    return bearer((body + b"." + b64(hmac.digest(secret.encode(), body, hashlib.sha256))).decode())


async def test_garbage_tokens_do_not_use_up_the_budget_of_users_behind_the_same_address(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    # Burst of 10 joins per address, 5 failed credentials per address: nothing refills during the test.
    limits = {"joins_address": 0.1, "failures_address": 0.05, "burst_s": 100.0}
    config = _config(kafka, tmp_path, limits=limits)
    async with (
        serving(AdmissionApp(config), config, host="[::]") as address,
        dial(address, V4) as shared,
        dial(address, V6) as elsewhere,
    ):
        rooms = rooms_pb2_grpc.RoomsStub(elsewhere)
        md = TOKENS.metadata(7_600_000)
        room = await rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title="Shared"), metadata=md, timeout=10)
        await rooms.StartRoom(rooms_pb2.StartRoomRequest(room_id=room.room_id), metadata=md, timeout=10)
        joins = admission_pb2_grpc.AdmissionStub(shared)
        # Someone behind the address sends 30 forged tokens: refused, then refused unread.
        forged = bearer(mint(SigningKey("dev", "not-the-key-anyone-configured-0123456789"), 5, GRANTS))
        answers = [await join_outcome(joins, room.room_id, forged) for _ in range(30)]
        codes = [kind for kind, _ in answers]
        assert codes[:5] == ["UNAUTHENTICATED"] * 5 and set(codes[5:]) == {"RESOURCE_EXHAUSTED"}, codes
        last = answers[-1][1]
        assert last is not None and "missing or invalid credentials from address 127.0.0.1" in (
            last.details() or ""
        )
        # The users behind the same address still have their whole budget.
        for i in range(10):
            joined, error = await join_outcome(joins, room.room_id, TOKENS.metadata(7_600_100 + i))
            assert joined == "granted", (i, error)

        # Malformed tokens (from a fresh address): UNAUTHENTICATED saying why, never INTERNAL.
        header = json.dumps({"alg": "HS256", "kid": "dev", "typ": "JWT"}).encode()
        now = int(time.time())
        malformed = {
            "header nested past the parser": _token(b"[" * 1000 + b"]" * 1000, b"{}"),
            "exp past any time": _token(header, b'{"sub":"5","exp":1' + b"0" * 30 + b"}"),
            "payload nested past the parser": _token(
                header, b'{"sub":"5","exp":%d,"x":' % (now + 60) + b"[" * 1000 + b"]" * 1000 + b"}"
            ),
        }
        other = admission_pb2_grpc.AdmissionStub(elsewhere)
        for what, metadata in malformed.items():
            kind, error = await join_outcome(other, room.room_id, metadata)
            assert kind == "UNAUTHENTICATED", (what, kind, error and error.details())
            assert error is not None and (error.details() or "").startswith("token "), what


async def test_a_peer_that_refuses_its_probes_is_busy_not_serving(kafka: KafkaConfig, tmp_path: Path) -> None:
    # One health check per address, then refused for 100 s: what a saturated peer's answer looks like.
    config = _config(kafka, tmp_path, limits={"open_address": 0.01, "burst_s": 100.0})
    prober = Prober(lambda: [], 1.0, 5.0, 2)
    async with serving(RelayApp(config), config) as address:
        try:
            assert await prober.probe(address) is Probe.SERVING
            assert await prober.probe(address) is Probe.BUSY
        finally:
            await prober.close()
