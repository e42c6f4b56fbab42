"""Two notifiers on loopback sharing the graph by followee: forwarding, import, one fan-out per host."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from tests.integration.fanout_helpers import fresh_users, own_topics, start_room, until
from tests.integration.helpers import config_for, metadata
from townhall.core import server
from townhall.core.config import Config, KafkaConfig
from townhall.notifier.app import build_app
from townhall.notifier.placement import ShardOwners
from townhall.v1 import graph_pb2, graph_pb2_grpc
from townhall_tools.devtools.fanout import counting_inbox, import_followers
from townhall_tools.devtools.kafka_broker import free_port

pytestmark = pytest.mark.kafka


async def test_two_notifiers_keep_each_followee_on_its_owner_and_fan_out_once(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    topics = await own_topics(kafka)
    # Notifiers know each other by their internal ports; clients call the client ports.
    clients = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    members = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    group = f"g-{uuid.uuid4().hex[:8]}"
    apps, running = [], []
    try:
        for i, (address, internal) in enumerate(zip(clients, members, strict=True)):
            config = config_for(
                topics,
                notifier={
                    "listen": address,
                    "internal_listen": internal,
                    "members": tuple(members),
                    "data_dir": str(tmp_path / f"n{i}"),
                    "group_id": group,
                    "metrics_port": 0,
                },
            )
            app = build_app(config)
            apps.append(app)
            running.append(await server.start(app, config, address, internal))
        placement = ShardOwners(members[0], members)
        # A host owned by the second notifier, followed through the first one.
        host = next(u for u in fresh_users(200) if placement.followee_owner(u) == members[1])
        follower, *crowd = fresh_users(301)
        async with grpc.aio.insecure_channel(clients[0]) as channel:
            graph = graph_pb2_grpc.GraphStub(channel)
            reply = await graph.Follow(
                graph_pb2.FollowRequest(followee_id=host), metadata=metadata(follower), timeout=10
            )
            assert reply.created is True
            assert await import_followers(members[0], host, crowd) == len(crowd)
            count = await graph.CountFollowers(
                graph_pb2.CountFollowersRequest(user_id=host), metadata=metadata(host), timeout=10
            )
            assert count.count == len(crowd) + 1
        assert await apps[1].store.count(host) == len(crowd) + 1, "the edges live on the owner"
        assert await apps[0].store.count(host) == 0

        room = f"sharded-{uuid.uuid4().hex[:6]}"
        users = [follower, *crowd]
        before = REGISTRY.get_sample_value("townhall_notifier_duplicates_dropped_total") or 0.0
        async with counting_inbox(topics, users) as inbox:
            await start_room(topics, room, host)
            await until(lambda: inbox.delivered(room) == len(users), what="every follower notified")
            got = inbox.got(room)
        assert sorted(set(got.values())) == [1]
        after = REGISTRY.get_sample_value("townhall_notifier_duplicates_dropped_total") or 0.0
        assert after == before, "only the owner planned the room: no repeats reached the Inbox"
    finally:
        for app, run in zip(apps, running, strict=False):
            await server.stop(app, run, 1.0)
        for app in apps[len(running) :]:
            await app.close()


async def test_a_dead_notifiers_keys_stay_its_own_and_come_back_with_their_data(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    """Unlike admission's rooms (all state in Kafka, so ownership follows the live members), a graph key
    lives on its owner's volume: while its notifier is down its keys are UNAVAILABLE (never served, empty,
    by another notifier, which would lose them), and they are back, whole, when it restarts."""
    topics = await own_topics(kafka)
    clients = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    members = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    group = f"g-{uuid.uuid4().hex[:8]}"

    def config(i: int) -> Config:
        return config_for(
            topics,
            notifier={
                "listen": clients[i],
                "internal_listen": members[i],
                "members": tuple(members),
                "data_dir": str(tmp_path / f"n{i}"),
                "group_id": group,
                "metrics_port": 0,
            },
        )

    apps = [build_app(config(i)) for i in range(2)]
    running = [await server.start(app, config(i), clients[i], members[i]) for i, app in enumerate(apps)]
    host = next(
        u for u in fresh_users(200) if ShardOwners(members[0], members).followee_owner(u) == members[1]
    )
    first, second = fresh_users(2)
    try:
        async with grpc.aio.insecure_channel(clients[0]) as channel:
            graph = graph_pb2_grpc.GraphStub(channel)
            follow = graph_pb2.FollowRequest(followee_id=host)
            assert (await graph.Follow(follow, metadata=metadata(first), timeout=10)).created

            await server.stop(apps[1], running[1], 1.0)  # the owner of `host` is down
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await graph.Follow(follow, metadata=metadata(second), timeout=30)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            assert await apps[0].store.count(host) == 0, "the live notifier took none of the dead one's keys"

            apps[1] = build_app(config(1))  # restarted on the same volume
            running[1] = await server.start(apps[1], config(1), clients[1], members[1])
            assert (await graph.Follow(follow, metadata=metadata(second), timeout=10)).created
            count = await graph.CountFollowers(
                graph_pb2.CountFollowersRequest(user_id=host), metadata=metadata(host), timeout=10
            )
            assert count.count == 2, "the follow made before the restart is still there"
    finally:
        for i, app in enumerate(apps):
            if running[i] is not None:
                with contextlib.suppress(Exception):
                    await server.stop(app, running[i], 1.0)
