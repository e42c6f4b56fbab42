"""A join right after a room starts, on an admission process that has not read the start yet.

Any process admits listeners from its own copy of the room, which trails the owner's by the time the
room-state topic takes to reach it (milliseconds, or seconds while a broker fails over). A caller that
has seen the room live (the start's answer, a notification, a room list) must not be told "not found"
by a process behind it: the process says it is behind, and the client asks another one.
"""

from __future__ import annotations

import random

import grpc
import pytest

from tests.integration.helpers import TOKENS, admission_members, client, metadata, rpc_error
from tests.integration.test_relay import TICKET_KEYS, TICKET_PRIVATE_KEY
from tests.integration.test_relay_tree import tree
from townhall.client import Client, Endpoints
from townhall.core.config import KafkaConfig
from townhall.core.errors import Reason, details
from townhall.core.records import Record
from townhall.v1 import admission_pb2, admission_pb2_grpc
from townhall.v1.common_pb2 import Room

pytestmark = pytest.mark.kafka


async def test_a_process_behind_on_a_started_room_sends_the_join_elsewhere(kafka: KafkaConfig) -> None:
    tickets = {"private_key": TICKET_PRIVATE_KEY, "public_keys": (TICKET_KEYS,)}
    async with (
        tree(1, kafka_bootstrap=kafka.bootstrap) as t,
        admission_members(
            kafka, 2, tickets, relays=tuple(t.addresses), relays_internal=tuple(t.internals)
        ) as [
            (ahead_address, ahead),
            (behind_address, behind),
        ],
    ):
        # The second process's room-state follower reads nothing until told: it is behind.
        held: list[Record] = []
        read = behind.store._read
        behind.store._read = held.append  # type: ignore[method-assign,assignment]
        base = random.randrange(1, 2**40) * 1000
        host = client(ahead_address, base)
        clients = [host]
        try:
            # A room the first process owns: the second learns of it from the topic alone.
            for _ in range(32):
                room = await host.create_room("A room just started")
                if ahead.peers.owner(room.room_id) == ahead.peers.me:
                    break
            else:
                raise AssertionError("no room owned by the first process in 32 tries")
            live: Room = await host.start_room(room.room_id)
            stub = admission_pb2_grpc.AdmissionStub(grpc.aio.insecure_channel(behind_address))

            # Asked without a version, the process answers from its copy: it knows no such room.
            plain = admission_pb2.JoinRequest(room_id=room.room_id)
            unseen = await rpc_error(stub.Join(plain, metadata=metadata(base + 1), timeout=10))
            assert unseen.code() == grpc.StatusCode.NOT_FOUND

            # Asked by a caller that has seen the room live, it says it is behind: ask again.
            seen = admission_pb2.JoinRequest(room_id=room.room_id, min_room_version=live.version)
            behind_error = await rpc_error(stub.Join(seen, metadata=metadata(base + 1), timeout=10))
            assert behind_error.code() == grpc.StatusCode.UNAVAILABLE
            assert details(behind_error).reason == Reason.ROOM_BEHIND
            assert f"seen version {live.version}" in (behind_error.details() or "")

            # The client library, calling the process behind first, is admitted by the other one.
            listener = Client(
                Endpoints(f"{behind_address},{ahead_address}", ahead_address), base + 2, TOKENS.mint(base + 2)
            )
            clients.append(listener)
            listener._current = 0  # the process behind first, not a random one
            listener.learn(live)
            grant = await listener.join(room.room_id, give_up_after_s=5)
            assert grant.ticket and grant.relay_address

            # Caught up, the process admits the same caller itself.
            behind.store._read = read  # type: ignore[method-assign]
            for record in held:
                behind.store._followed(record)
            alone = Client(Endpoints(behind_address, behind_address), base + 3, TOKENS.mint(base + 3))
            clients.append(alone)
            alone.learn(live)
            # (A grant once this process holds a lease for the room: its first answer may be a Waiting.)
            assert (await alone.join(room.room_id, give_up_after_s=5)).ticket
        finally:
            for c in clients:
                await c.close()
