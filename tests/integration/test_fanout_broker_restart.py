"""A notifier with a Kafka broker of its own that restarts mid-fan-out: nothing is lost."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.fanout_helpers import fresh_users, own_topics, start_room, until
from tests.integration.helpers import config_for, serving
from townhall.core.config import KafkaConfig
from townhall.notifier.app import build_app
from townhall_tools.devtools.fanout import counting_inbox, import_followers
from townhall_tools.devtools.kafka_broker import Broker, free_port

pytestmark = pytest.mark.kafka

FOLLOWERS = 2000


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker only this module uses, so restarting it leaves the session broker alone."""
    b = Broker(tmp_path_factory.mktemp("own-kafka"), port=free_port())
    b.start()
    try:
        yield b
    finally:
        b.stop()


async def test_a_broker_restart_mid_fanout_loses_no_notification(broker: Broker, tmp_path: Path) -> None:
    topics = await own_topics(KafkaConfig(bootstrap=broker.bootstrap))
    host, *followers = fresh_users(FOLLOWERS + 1)
    config = config_for(
        topics,
        notifier={
            "data_dir": str(tmp_path),
            "group_id": f"g-{uuid.uuid4().hex[:8]}",
            "metrics_port": 0,
            "task_users": 10,
            "worker_rate": 50.0,
            "bulk_threshold": 100,
        },
    )
    app = build_app(config)
    async with serving(app, config):
        assert await import_followers(config.notifier.address, host, followers) == FOLLOWERS
        room = f"restart-{uuid.uuid4().hex[:8]}"
        async with counting_inbox(topics, followers) as inbox:
            await start_room(topics, room, host)
            await until(lambda: inbox.delivered(room) >= 200, what="first notifications")
            broker.stop()
            assert inbox.delivered(room) < FOLLOWERS, "the restart came after the fan-out had finished"
            broker.start()
            await until(
                lambda: inbox.delivered(room) == FOLLOWERS, timeout_s=55, what="every follower notified"
            )
            got = inbox.got(room)
    assert sorted(set(got.values())) == [1], "every follower exactly once at the Inbox"
