"""One notifier with the real broker: the fast lane while the bulk lane is full; follows during a fan-out."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.integration.fanout_helpers import RunningNotifier, fresh_users, serving_notifier, start_room, until
from tests.integration.helpers import metadata
from townhall.core.config import KafkaConfig
from townhall.v1 import graph_pb2
from townhall_tools.devtools.fanout import counting_inbox, import_followers

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
async def notifier(
    kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningNotifier]:
    # Tasks of 10 users at 40 tasks/s: a 2,000-follower host keeps the bulk lane busy for seconds.
    async with serving_notifier(
        kafka,
        tmp_path_factory.mktemp("lanes"),
        task_users=10,
        worker_rate=40.0,
        bulk_threshold=100,
        bulk_share=0.2,
    ) as running:
        yield running


async def test_a_small_host_is_notified_while_a_big_fanout_is_still_running(
    notifier: RunningNotifier,
) -> None:
    big, *crowd = fresh_users(2001)
    small, *few = fresh_users(4)
    await import_followers(notifier.internal, big, crowd)
    await import_followers(notifier.internal, small, few)
    big_room, small_room = f"big-{uuid.uuid4().hex[:6]}", f"small-{uuid.uuid4().hex[:6]}"
    async with counting_inbox(notifier.kafka, crowd + few) as inbox:
        await start_room(notifier.kafka, big_room, big)
        await until(lambda: inbox.delivered(big_room) >= 100, what="the bulk fan-out under way")
        await start_room(notifier.kafka, small_room, small)
        await until(
            lambda: inbox.delivered(small_room) == len(few), what="the small host's followers notified"
        )
        bulk_done_then = inbox.delivered(big_room)
        await until(lambda: inbox.delivered(big_room) == len(crowd), what="the bulk fan-out finished")
        # A bulk-lane host draws a crowd: its followers are told to join on admission's crowd lane.
        assert (inbox.crowd(big_room), inbox.crowd(small_room)) == ({True}, {False})
    # Not a timing claim: the small host's notifications overtook a bulk lane with work queued.
    assert bulk_done_then < len(crowd)


async def test_follow_and_unfollow_during_a_fanout_apply_from_the_next_room(
    notifier: RunningNotifier,
) -> None:
    host, *followers = fresh_users(1001)
    [newcomer] = fresh_users(1)
    leaver = followers[-1]  # the last block: still waiting to be fanned out when it unfollows
    await import_followers(notifier.internal, host, followers)
    first, second = f"one-{uuid.uuid4().hex[:6]}", f"two-{uuid.uuid4().hex[:6]}"
    async with counting_inbox(notifier.kafka, [*followers, newcomer]) as inbox:
        await start_room(notifier.kafka, first, host)
        await until(lambda: inbox.delivered(first) >= 50, what="the fan-out under way")
        await notifier.graph.Follow(
            graph_pb2.FollowRequest(followee_id=host), metadata=metadata(newcomer), timeout=10
        )
        await notifier.graph.Unfollow(
            graph_pb2.UnfollowRequest(followee_id=host), metadata=metadata(leaver), timeout=10
        )
        assert inbox.delivered(first) < len(followers), "the changes came after the fan-out had finished"
        await until(lambda: inbox.delivered(first) == len(followers), what="the first room fanned out")
        first_got = inbox.got(first)
        # The fan-out covers the followers as planned: the leaver still hears about this room,
        # the newcomer does not.
        assert first_got[leaver] == 1 and first_got[newcomer] == 0

        await start_room(notifier.kafka, second, host)
        await until(lambda: inbox.delivered(second) == len(followers), what="the second room fanned out")
        await until(lambda: True)
        second_got = inbox.got(second)
    assert second_got[newcomer] == 1 and second_got[leaver] == 0
    count = await notifier.graph.CountFollowers(
        graph_pb2.CountFollowersRequest(user_id=host), metadata=metadata(host), timeout=10
    )
    assert count.count == len(followers)
    page = await notifier.graph.ListFollowers(
        graph_pb2.ListFollowersRequest(user_id=host, page_size=10_000), metadata=metadata(host), timeout=10
    )
    assert sorted(page.follower_ids) == sorted([*followers[:-1], newcomer])
