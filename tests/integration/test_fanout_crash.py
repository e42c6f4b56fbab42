"""Notifier processes on loopback with the real broker: kill -9 of a worker mid-fan-out, then restart."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.integration.fanout_helpers import (
    fresh_users,
    notifier_env,
    own_topics,
    spawn_notifier,
    start_room,
    until,
    wait_serving,
)
from townhall.core.config import KafkaConfig
from townhall_tools.devtools.fanout import counting_inbox, import_followers
from townhall_tools.devtools.kafka_broker import free_port

pytestmark = pytest.mark.kafka

FOLLOWERS = 3000


async def test_a_worker_killed_mid_fanout_and_restarted_notifies_every_follower_exactly_once(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    topics = await own_topics(kafka)
    host, *followers = fresh_users(FOLLOWERS + 1)
    address, internal = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    # Slow, small tasks (10 users, 60 tasks/s) so the kill lands in the middle of the fan-out.
    env = notifier_env(
        topics,
        tmp_path / "store",
        address,
        f"g-{uuid.uuid4().hex[:8]}",
        internal,
        task_users="10",
        worker_rate="60",
        bulk_threshold="100",
    )
    worker = spawn_notifier(env, tmp_path / "notifier.log")
    try:
        await wait_serving(address, worker)
        assert await import_followers(internal, host, followers) == FOLLOWERS
        room = f"crash-{uuid.uuid4().hex[:8]}"
        async with counting_inbox(topics, followers) as inbox:
            await start_room(topics, room, host)
            await until(lambda: inbox.delivered(room) >= 300, what="first notifications")
            worker.kill()  # kill -9: no drain, no commit, no goodbye to the group
            worker.wait(10)
            before = inbox.delivered(room)
            assert before < FOLLOWERS, "the kill came after the fan-out had finished"

            worker = spawn_notifier(env, tmp_path / "notifier.log")
            await wait_serving(address, worker)
            await until(
                lambda: inbox.delivered(room) == FOLLOWERS, timeout_s=50, what="every follower notified"
            )
            got = inbox.got(room)
        assert sorted(set(got.values())) == [1], "every follower exactly once at the Inbox"
    finally:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(15)
