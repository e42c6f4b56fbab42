"""The notifiers change while users follow (real notifier servers on loopback, the real broker): follows
made before a change of the members are still counted, listed and notified after it.

Two ways the members change: as the chart's StatefulSet is scaled (2 -> 3 -> 2 while serving; the
Kubernetes API is not here, so each notifier is handed the StatefulSet's new view as its poll would
read it, one notifier after the other), and as the local topology does it (static members, every
notifier restarted with a longer list)."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.fanout_helpers import fresh_users, own_topics, start_room, until
from tests.integration.helpers import config_for, metadata
from townhall.core import server
from townhall.core.config import KafkaConfig
from townhall.core.sharding import owner
from townhall.notifier.app import NotifierApp, build_app
from townhall.v1 import graph_pb2, graph_pb2_grpc
from townhall_tools.devtools.events import publish_room_created
from townhall_tools.devtools.fanout import counting_inbox, import_followers
from townhall_tools.devtools.kafka_broker import free_port

pytestmark = pytest.mark.kafka
OnChange = Callable[[list[str], int], Awaitable[object]]
CELEBRITY_FOLLOWERS = 6_000  # more than one stored block (4096 ids) and one handover chunk


class Scaled:
    """One notifier pod's view of the StatefulSet's members, changed when the test scales it."""

    changes = True

    def __init__(self, members: Iterable[str], epoch: int) -> None:
        self.view = (list(members), epoch)
        self._on_change: OnChange | None = None

    async def read(self) -> tuple[list[str], int]:
        return self.view

    def start(self, on_change: OnChange) -> None:
        self._on_change = on_change

    async def close(self) -> None:
        """Nothing to stop."""

    async def scale(self, members: Iterable[str], epoch: int) -> None:
        """What this pod's next poll of the StatefulSet reads."""
        self.view = (list(members), epoch)
        assert self._on_change is not None
        await self._on_change(*self.view)


@dataclass
class Cluster:
    """Notifiers on loopback sharing one group and the test's own topics. A notifier is known to the others
    by its internal address (its member address); users call its client address."""

    kafka: KafkaConfig
    root: Path
    group: str = field(default_factory=lambda: f"g-{uuid.uuid4().hex[:8]}")
    apps: dict[str, NotifierApp] = field(default_factory=dict)
    running: dict[str, server.Running] = field(default_factory=dict)
    clients: dict[str, str] = field(default_factory=dict)

    async def start(self, member: str, members: Iterable[str], scaled: Scaled | None = None) -> None:
        client = self.clients.setdefault(member, f"127.0.0.1:{free_port()}")
        config = config_for(
            self.kafka,
            notifier={
                "listen": client,
                "internal_listen": member,
                "members": tuple(members) if scaled is None else (),
                "data_dir": str(self.root / member.replace(":", "-")),
                "group_id": self.group,
                "metrics_port": 0,
            },
        )
        app = build_app(config) if scaled is None else build_app(config, scaled)
        self.apps[member] = app
        self.running[member] = await server.start(app, config, client, member)

    async def stop(self, address: str) -> None:
        app = self.apps.pop(address)
        await server.stop(app, self.running.pop(address), 1.0)

    async def stop_all(self) -> None:
        for address in list(self.apps):
            await self.stop(address)


@asynccontextmanager
async def cluster(kafka: KafkaConfig, root: Path) -> AsyncIterator[Cluster]:
    c = Cluster(await own_topics(kafka), root)
    try:
        yield c
    finally:
        await c.stop_all()


@dataclass
class Graph:
    """Who follows whom, as the users made it, and the rooms they asked to be reminded of."""

    follows: dict[int, set[int]] = field(default_factory=dict)
    reminders: dict[str, set[int]] = field(default_factory=dict)

    async def follow(self, address: str, followee: int, follower: int) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await graph_pb2_grpc.GraphStub(channel).Follow(
                graph_pb2.FollowRequest(followee_id=followee), metadata=metadata(follower), timeout=30
            )
        assert reply.created
        self.follows.setdefault(followee, set()).add(follower)

    async def remind(self, address: str, room: str, user: int) -> None:
        """Asks for a reminder of `room` (created a moment ago: the notifier may not have read it yet)."""
        async with grpc.aio.insecure_channel(address) as channel:
            for _ in range(100):
                try:
                    reply = await graph_pb2_grpc.GraphStub(channel).RemindMe(
                        graph_pb2.RemindMeRequest(room_id=room), metadata=metadata(user), timeout=30
                    )
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
        assert reply.created
        self.reminders.setdefault(room, set()).add(user)

    async def check(self, address: str) -> None:
        """Every followee's count and list, as one notifier answers them, are what the users made."""
        async with grpc.aio.insecure_channel(address) as channel:
            graph = graph_pb2_grpc.GraphStub(channel)
            for followee, followers in self.follows.items():
                md = metadata(followee)
                count = await graph.CountFollowers(
                    graph_pb2.CountFollowersRequest(user_id=followee), metadata=md, timeout=30
                )
                assert count.count == len(followers), (address, followee)
                listed: list[int] = []
                token = ""
                while True:
                    page = await graph.ListFollowers(
                        graph_pb2.ListFollowersRequest(user_id=followee, page_token=token),
                        metadata=md,
                        timeout=30,
                    )
                    listed += page.follower_ids
                    if not (token := page.next_page_token):
                        break
                assert listed == sorted(followers), (address, followee)

    async def notified(self, kafka: KafkaConfig, hosts: list[int], rooms: list[str]) -> None:
        """Rooms started by `hosts` (and the reminded `rooms`) reach every follower (and reminded user)."""
        expected: dict[str, set[int]] = {}
        for host in hosts:
            expected[f"r{uuid.uuid4().hex[:12]}"] = set(self.follows[host])
        for room in rooms:
            expected[room] = set(self.reminders[room])
        users = sorted(set().union(*expected.values()))
        async with counting_inbox(kafka, users) as inbox:
            host_of = {room: host for room, host in zip(expected, hosts, strict=False)}
            for room in expected:
                await start_room(kafka, room, host_of.get(room, random.randrange(1, 2**40)))
            for room, want in expected.items():
                await until(
                    lambda r=room, w=want: {u for u, n in inbox.got(r).items() if n} >= w,  # type: ignore[misc]
                    what=f"every follower of {room} notified",
                )


def followee_key(followee: int) -> str:
    return f"user:{followee}"  # a followee's rendezvous key


def room_key(room: str) -> str:
    return f"room:{room}"  # a room's reminder list's rendezvous key


def addresses(n: int) -> list[str]:
    return [f"127.0.0.1:{free_port()}" for _ in range(n)]


async def make_graph(
    graph: Graph, notifiers: Cluster, members: list[str], new: str
) -> tuple[list[int], list[str]]:
    """Followees and rooms spread so that some of each move to `new` when it joins; made through any member."""
    hosts = fresh_users(60)
    moving = [h for h in hosts if owner(followee_key(h), [*members, new]) == new]
    assert len(moving) >= 3, "some followees move to the new notifier"
    celebrity = moving[0]
    crowd = fresh_users(CELEBRITY_FOLLOWERS)
    assert await import_followers(members[0], celebrity, crowd) == CELEBRITY_FOLLOWERS
    graph.follows[celebrity] = set(crowd)
    for i, host in enumerate(hosts):
        for follower in fresh_users(3):
            await graph.follow(notifiers.clients[members[i % len(members)]], host, follower)
    rooms = [f"remind-{uuid.uuid4().hex[:8]}" for _ in range(12)]
    producer = AIOKafkaProducer(bootstrap_servers=notifiers.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for room in rooms:  # scheduled rooms, as admission has them: reminders are for rooms not started
            await publish_room_created(producer, notifiers.kafka, room, hosts[0], "a scheduled room")
    finally:
        await producer.stop()
    for i, room in enumerate(rooms):
        await graph.remind(notifiers.clients[members[i % len(members)]], room, fresh_users(1)[0])
    moved_rooms = [r for r in rooms if owner(room_key(r), [*members, new]) == new]
    return [celebrity, *moving[1:3], hosts[0]], moved_rooms or rooms[:1]


async def test_a_scaled_statefulset_keeps_every_follow_counted_listed_and_notified(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    a, b, c = addresses(3)
    async with cluster(kafka, tmp_path) as notifiers:
        views = {a: Scaled([a, b], 1), b: Scaled([a, b], 1)}
        for address in (a, b):
            await notifiers.start(address, (), views[address])
        graph = Graph()
        hosts, rooms = await make_graph(graph, notifiers, [a, b], c)
        await graph.check(notifiers.clients[a])

        # Scaled to 3: the new pod starts with the new view; the others see it one after the other,
        # while users keep following through every notifier.
        views[c] = Scaled([a, b, c], 2)
        await notifiers.start(c, (), views[c])
        clients = notifiers.clients
        await graph.follow(clients[c], hosts[1], fresh_users(1)[0])
        await views[a].scale([a, b, c], 2)
        await graph.follow(clients[b], hosts[2], fresh_users(1)[0])  # b still has the old view
        await graph.follow(clients[a], hosts[1], fresh_users(1)[0])
        await views[b].scale([a, b, c], 2)
        for address in (a, b, c):
            await graph.check(clients[address])
        await until(
            lambda: all(app.handover.drained for app in notifiers.apps.values()),
            what="every notifier drained",
        )
        store_c = notifiers.apps[c].store
        assert await store_c.count(hosts[0]) == len(graph.follows[hosts[0]]), "the celebrity moved to c"
        assert not await notifiers.apps[a].store.holds(followee_key(hosts[0]))
        assert not await notifiers.apps[b].store.holds(followee_key(hosts[0]))
        await graph.notified(notifiers.kafka, hosts, rooms)

        # Scaled back to 2: the pod that goes away hands everything over before it stops.
        for address in (c, a, b):
            await views[address].scale([a, b], 3)
        await graph.follow(clients[a], hosts[0], fresh_users(1)[0])
        assert await notifiers.apps[c].handover.wait_drained(30)
        await notifiers.stop(c)
        for address in (a, b):
            await graph.check(clients[address])
        for host in hosts:
            holders = [x for x in (a, b) if await notifiers.apps[x].store.holds(followee_key(host))]
            assert len(holders) == 1, (host, holders)
        await graph.notified(notifiers.kafka, hosts, rooms)


async def test_local_notifiers_restarted_with_one_more_member_keep_every_follow(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    a, b, c = addresses(3)
    async with cluster(kafka, tmp_path) as notifiers:
        for address in (a, b):
            await notifiers.start(address, (a, b))
        graph = Graph()
        hosts, rooms = await make_graph(graph, notifiers, [a, b], c)
        await notifiers.stop_all()

        # `townhall dev --notifiers 3` on the same data: every notifier starts with the longer list.
        for address in (a, b, c):
            await notifiers.start(address, (a, b, c))
        for address in (a, b, c):
            await graph.check(notifiers.clients[address])
        await graph.notified(notifiers.kafka, hosts, rooms)
