"""The fan-out worker's at-least-once loop: commit only after every record is acknowledged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from townhall.notifier import fanout_worker
from townhall.notifier.fanout_worker import FanoutWorker
from townhall.notifier.records import decode_batch
from townhall.v1 import common_pb2, events_pb2

TP = TopicPartition("townhall.room-started", 3)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes


class FakeStore:
    """Followers held in memory, served in sorted blocks like the real store."""

    def __init__(self, followers: dict[int, list[int]]) -> None:
        self._followers = followers

    async def followers(self, followee: int, block: int = 10_000) -> AsyncIterator[np.ndarray]:
        ids = np.array(sorted(self._followers.get(followee, [])), dtype=np.uint64)
        for start in range(0, len(ids), block):
            yield ids[start : start + block]


@dataclass
class FakeConsumer:
    """Hands out queued records, then waits; remembers commits and seeks."""

    records: list[Record]
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)
    seeks: list[tuple[TopicPartition, int]] = field(default_factory=list)
    # What a seek to an offset fetches again.
    replay: dict[int, Record] = field(default_factory=dict)

    async def getone(self) -> Record:
        if not self.records:
            await asyncio.Event().wait()  # like an idle topic: blocks until the worker is cancelled
        return self.records.pop(0)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.records.insert(0, self.replay[offset])


@dataclass
class FakeProducer:
    """Returns a pending future per record; the test decides when Kafka acknowledges."""

    sent: list[tuple[bytes, bytes]] = field(default_factory=list)
    futures: list[asyncio.Future[Any]] = field(default_factory=list)

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[Any]:
        self.sent.append((key, value))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future

    def ack_all(self) -> None:
        for f in self.futures:
            if not f.done():
                f.set_result(None)

    def fail_all(self) -> None:
        for f in self.futures:
            if not f.done():
                f.set_exception(KafkaTimeoutError())


def _event(host: int, room: str = "r1") -> Record:
    value = events_pb2.RoomStarted(
        room=common_pb2.Room(room_id=room, host_id=host, title="t")
    ).SerializeToString()
    return Record(TP.topic, TP.partition, 0, value)


async def _eventually(condition: Any) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met")


def _worker(consumer: FakeConsumer, producer: FakeProducer, followers: dict[int, list[int]]) -> FanoutWorker:
    return FanoutWorker(consumer, producer, FakeStore(followers), "n", batch_users=2, block_users=3)


async def test_offset_is_committed_only_after_every_record_is_acknowledged() -> None:
    followers = [64, 128, 192, 1, 65, 2]  # shard 0 x3, shard 1 x2, shard 2 x1
    consumer, producer = FakeConsumer([_event(7)]), FakeProducer()
    task = asyncio.create_task(_worker(consumer, producer, {7: followers}).run())
    try:
        await _eventually(lambda: len(producer.sent) == 4)
        await asyncio.sleep(0.02)
        assert consumer.commits == [], "nothing may be committed while records are unacknowledged"
        producer.ack_all()
        await _eventually(lambda: consumer.commits == [{TP: 1}])
    finally:
        task.cancel()

    sent = [(key, decode_batch(value)[1].tolist()) for key, value in producer.sent]
    assert sorted(sent) == [(b"0", [64, 128]), (b"0", [192]), (b"1", [1, 65]), (b"2", [2])]


async def test_a_failed_send_rewinds_and_retries_without_committing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanout_worker, "RETRY_BACKOFF_S", 0.0)
    event = _event(7)
    consumer, producer = FakeConsumer([event], replay={0: event}), FakeProducer()
    task = asyncio.create_task(_worker(consumer, producer, {7: [5]}).run())
    try:
        await _eventually(lambda: len(producer.sent) == 1)
        producer.fail_all()
        await _eventually(lambda: len(producer.sent) == 2)
        assert consumer.seeks == [(TP, 0)]
        assert consumer.commits == []
        producer.ack_all()
        await _eventually(lambda: consumer.commits == [{TP: 1}])
    finally:
        task.cancel()


async def test_malformed_events_are_skipped_and_committed() -> None:
    bad = Record(TP.topic, TP.partition, 0, b"\xff\xff not protobuf")
    no_room = _event(7, room="")
    no_room.offset = 1
    consumer, producer = FakeConsumer([bad, no_room]), FakeProducer()
    task = asyncio.create_task(_worker(consumer, producer, {7: [5]}).run())
    try:
        await _eventually(lambda: consumer.commits == [{TP: 1}, {TP: 2}])
    finally:
        task.cancel()
    assert producer.sent == []


async def test_a_host_without_followers_commits_without_records() -> None:
    consumer, producer = FakeConsumer([_event(9)]), FakeProducer()
    task = asyncio.create_task(_worker(consumer, producer, {}).run())
    try:
        await _eventually(lambda: consumer.commits == [{TP: 1}])
    finally:
        task.cancel()
    assert producer.sent == []
