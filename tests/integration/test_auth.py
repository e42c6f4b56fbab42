"""Authentication on real servers (admission and notifier on the real broker): what a caller notices."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.helpers import config_for, dial, rpc_error, serving
from townhall.admission.app import AdmissionApp
from townhall.core.auth import HOST, PUBLISH, SUBSCRIBE, bearer, mint
from townhall.core.config import Config, KafkaConfig
from townhall.core.tokens import SigningKey
from townhall.notifier.app import NotifierApp
from townhall.v1 import (
    admission_pb2,
    admission_pb2_grpc,
    graph_pb2,
    graph_pb2_grpc,
    inbox_pb2,
    inbox_pb2_grpc,
    rooms_pb2,
    rooms_pb2_grpc,
)

pytestmark = pytest.mark.kafka

OLD, NEW = "old=" + "o" * 40, "new=" + "n" * 40
Md = tuple[tuple[str, str], ...]


def signed(entry: str, user: int, grants: tuple[str, ...] = (HOST, PUBLISH, SUBSCRIBE), **kw: Any) -> Md:
    """Metadata with a token for `user` signed with the KID=SECRET `entry`."""
    return bearer(mint(SigningKey(*entry.split("=", 1)), user, grants, **kw))


@dataclasses.dataclass
class Servers:
    """Admission and notifier, both verifying user tokens with the OLD and NEW keys."""

    admission: grpc.aio.Channel
    notifier: grpc.aio.Channel
    config: Config
    notifier_address: str

    def calls(self, md: Md, room_id: str = "nosuchroom") -> dict[str, Callable[[], Awaitable[Any]]]:
        """Every client RPC of admission and the notifier, made with `md`."""
        rooms = rooms_pb2_grpc.RoomsStub(self.admission)
        joins = admission_pb2_grpc.AdmissionStub(self.admission)
        graph = graph_pb2_grpc.GraphStub(self.notifier)
        inbox = inbox_pb2_grpc.InboxStub(self.notifier)

        async def first_notification() -> Any:
            return await inbox.Subscribe(inbox_pb2.InboxSubscribeRequest(), metadata=md).read()

        later = int(time.time() * 1000) + 3_600_000
        return {
            "Rooms/CreateRoom": lambda: rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title="t"), metadata=md),
            "Rooms/StartRoom": lambda: rooms.StartRoom(
                rooms_pb2.StartRoomRequest(room_id=room_id), metadata=md
            ),
            "Rooms/ScheduleRoom": lambda: rooms.ScheduleRoom(
                rooms_pb2.ScheduleRoomRequest(room_id=room_id, start_at_ms=later), metadata=md
            ),
            "Rooms/EndRoom": lambda: rooms.EndRoom(rooms_pb2.EndRoomRequest(room_id=room_id), metadata=md),
            "Rooms/GetRoom": lambda: rooms.GetRoom(rooms_pb2.GetRoomRequest(room_id=room_id), metadata=md),
            "Rooms/ListLiveRooms": lambda: rooms.ListLiveRooms(rooms_pb2.ListLiveRoomsRequest(), metadata=md),
            "Rooms/WatchRoom": lambda: rooms.WatchRoom(
                rooms_pb2.WatchRoomRequest(room_id=room_id), metadata=md
            ).read(),
            "Admission/Join": lambda: joins.Join(admission_pb2.JoinRequest(room_id=room_id), metadata=md),
            "Admission/Leave": lambda: joins.Leave(admission_pb2.LeaveRequest(room_id=room_id), metadata=md),
            "Graph/Follow": lambda: graph.Follow(graph_pb2.FollowRequest(followee_id=5), metadata=md),
            "Graph/Unfollow": lambda: graph.Unfollow(graph_pb2.UnfollowRequest(followee_id=5), metadata=md),
            "Graph/CountFollowers": lambda: graph.CountFollowers(
                graph_pb2.CountFollowersRequest(user_id=5), metadata=md
            ),
            "Graph/ListFollowers": lambda: graph.ListFollowers(
                graph_pb2.ListFollowersRequest(user_id=5), metadata=md
            ),
            "Graph/RemindMe": lambda: graph.RemindMe(graph_pb2.RemindMeRequest(room_id=room_id), metadata=md),
            "Inbox/Subscribe": first_notification,
        }


@asynccontextmanager
async def servers(
    kafka: KafkaConfig, tmp_path: Path, keys: tuple[str, ...] = (NEW, OLD)
) -> AsyncIterator[Servers]:
    config = config_for(
        kafka,
        auth={"keys": keys},
        notifier={"data_dir": str(tmp_path / uuid.uuid4().hex), "group_id": f"auth-{uuid.uuid4().hex[:8]}"},
    )
    async with (
        serving(AdmissionApp(config), config) as admission,
        serving(NotifierApp(config), config) as notifier,
        grpc.aio.insecure_channel(admission) as a,
        grpc.aio.insecure_channel(notifier) as n,
    ):
        yield Servers(a, n, config, notifier)


BAD_TOKENS: list[tuple[str, Callable[[], Md], str]] = [
    ("missing", lambda: (), "metadata authorization is required"),
    ("garbled", lambda: (("authorization", "Bearer not-a-token"),), "token is not a JWT"),
    ("forged", lambda: signed("new=" + "x" * 40, 1), "signature does not verify with key 'new'"),
    ("expired", lambda: signed(NEW, 1, ttl_s=-300), "token has expired at"),
    ("unknown key id", lambda: signed("gone=" + "n" * 40, 1), "key id 'gone' is not known here"),
]


async def test_every_client_rpc_refuses_a_bad_token_and_says_why(kafka: KafkaConfig, tmp_path: Path) -> None:
    async with servers(kafka, tmp_path) as s:
        for name, md, message in BAD_TOKENS:
            for method, call in s.calls(md()).items():
                error = await rpc_error(call())
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (name, method, error.details())
                assert message in (error.details() or ""), (name, method, error.details())
        # Health stays open: probes carry no token.
        health = health_pb2_grpc.HealthStub(s.admission)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_grants_decide_what_a_user_may_do(kafka: KafkaConfig, tmp_path: Path) -> None:
    host, listener = 7_000_001, 7_000_002
    async with servers(kafka, tmp_path) as s:
        rooms = rooms_pb2_grpc.RoomsStub(s.admission)
        joins = admission_pb2_grpc.AdmissionStub(s.admission)
        no_host = signed(NEW, host, (PUBLISH, SUBSCRIBE))
        for method in ("Rooms/CreateRoom", "Rooms/StartRoom", "Rooms/ScheduleRoom", "Rooms/EndRoom"):
            error = await rpc_error(s.calls(no_host)[method]())
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert "needs the 'host' grant" in (error.details() or ""), (method, error.details())
            assert "grants: publish, subscribe" in (error.details() or "")

        room = await rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title="Grants"), metadata=signed(NEW, host))
        await rooms.StartRoom(rooms_pb2.StartRoomRequest(room_id=room.room_id), metadata=signed(NEW, host))
        join = admission_pb2.JoinRequest(room_id=room.room_id)
        error = await rpc_error(joins.Join(join, metadata=signed(NEW, listener, (PUBLISH,))))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "as a listener needs the 'subscribe' grant" in (error.details() or "")
        reply = await joins.Join(join, metadata=signed(NEW, listener, (SUBSCRIBE,)))
        assert reply.grant.role == 4  # listener
        # The host is on stage: its ticket allows publishing, which needs the 'publish' grant.
        error = await rpc_error(joins.Join(join, metadata=signed(NEW, host, (HOST, SUBSCRIBE))))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "as the host needs the 'publish' grant" in (error.details() or "")
        # Graph and Inbox need a valid token and no grant.
        nothing = signed(NEW, listener, ())
        assert (await s.calls(nothing)["Graph/CountFollowers"]()).count == 0
        follows = graph_pb2_grpc.GraphStub(s.notifier)
        assert (await follows.Follow(graph_pb2.FollowRequest(followee_id=host), metadata=nothing)).created


async def test_tokens_of_both_live_keys_work_and_a_removed_keys_fail(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    async with servers(kafka, tmp_path, keys=(NEW, OLD)) as s:
        for entry in (OLD, NEW):
            listed = await s.calls(signed(entry, 11))["Rooms/ListLiveRooms"]()
            assert isinstance(listed, rooms_pb2.ListLiveRoomsResponse)
            assert (await s.calls(signed(entry, 11))["Graph/CountFollowers"]()).count >= 0
    # The issuer moved to NEW and OLD is removed from the config: its tokens stop working everywhere.
    async with servers(kafka, tmp_path, keys=(NEW,)) as s:
        for method in ("Rooms/ListLiveRooms", "Graph/CountFollowers"):
            error = await rpc_error(s.calls(signed(OLD, 11))[method]())
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "key id 'old' is not known here (keys: new)" in (error.details() or "")
            await s.calls(signed(NEW, 11))[method]()


async def test_concurrent_callers_are_never_mixed_up(kafka: KafkaConfig, tmp_path: Path) -> None:
    """Each call's identity is its own, however many callers the server handles at once: 200 users
    follow one host all at once, over connections of their own (each within the server's calls per
    connection), and the host's followers are exactly those 200, each once. A call served as another
    caller would follow twice (created false) and leave its own user out."""
    async with servers(kafka, tmp_path) as s:
        host = 8_000_000
        users = list(range(host + 1, host + 201))
        per_connection = s.config.server.max_calls_per_connection // 2
        channels = [dial(s.notifier_address) for _ in range(math.ceil(len(users) / per_connection))]
        try:

            async def follow(user: int) -> bool:
                graph = graph_pb2_grpc.GraphStub(channels[(user - host) % len(channels)])
                reply = await graph.Follow(
                    graph_pb2.FollowRequest(followee_id=host), metadata=signed(NEW, user, ())
                )
                return reply.created

            created = await asyncio.gather(*(follow(u) for u in users))
        finally:
            for channel in channels:
                await channel.close()
        assert len(channels) > 1 and all(created)
        listed = await graph_pb2_grpc.GraphStub(s.notifier).ListFollowers(
            graph_pb2.ListFollowersRequest(user_id=host, page_size=1000), metadata=signed(NEW, host, ())
        )
        assert list(listed.follower_ids) == users
