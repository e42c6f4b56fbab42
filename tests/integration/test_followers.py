"""core/kafka.Follower on the real broker: a gathering follower reads a busy topic in few fetches, and
misses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
import uuid

import pytest

from townhall.core.config import KafkaConfig
from townhall.core.kafka import FOLLOW_WAIT_MS, Follower, Topics, end_offsets, ensure_topics, producer

pytestmark = pytest.mark.kafka

RECORDS = 150
EVERY_S = 0.01


async def _follow_while_writing(kafka: KafkaConfig, gather: bool) -> list[float]:
    """Writes RECORDS records EVERY_S apart, one at a time; returns when each was handed over."""
    kafka = dataclasses.replace(kafka, topic_prefix=f"follow-{uuid.uuid4().hex[:8]}", partitions=1)
    await ensure_topics(kafka)
    topic = Topics(kafka.topic_prefix).presence
    handed: list[float] = []
    done = asyncio.Event()

    def handle(_record: object) -> None:
        handed.append(time.monotonic())
        if len(handed) == RECORDS:
            done.set()

    follower = Follower(kafka, await end_offsets(kafka, topic), handle, "t", gather=gather)
    await follower.start()
    writer = producer(kafka, client_id="follow-test")
    await writer.start()
    try:
        for n in range(RECORDS):
            await writer.send_and_wait(topic, str(n).encode())
            await asyncio.sleep(EVERY_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 10)
    finally:
        await writer.stop()
        await follower.close()
    return handed


def _fetches(handed: list[float]) -> int:
    """How many answers the records came in: records handed over within 5 ms of the one before came in
    the same one."""
    return 1 + sum(1 for before, after in itertools.pairwise(handed) if after - before > 0.005)


async def test_a_gathering_follower_reads_a_busy_topic_in_a_few_fetches(kafka: KafkaConfig) -> None:
    """150 records, one every 10 ms (1.5 s and more): a follower answered at every record takes them in
    about as many fetches; a gathering one in about one per FOLLOW_WAIT_MS, and every record arrives."""
    eager = await _follow_while_writing(kafka, gather=False)
    gathering = await _follow_while_writing(kafka, gather=True)
    assert len(eager) == len(gathering) == RECORDS
    span_s = gathering[-1] - gathering[0]
    assert _fetches(gathering) <= span_s / (FOLLOW_WAIT_MS / 1000) + 3, (span_s, _fetches(gathering))
    assert _fetches(eager) > 3 * _fetches(gathering), (_fetches(eager), _fetches(gathering))
