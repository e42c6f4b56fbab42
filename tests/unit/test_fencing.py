"""Room writers without a broker: one producer per room, bounded, dropped when fenced, failed or moved."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from aiokafka.errors import KafkaTimeoutError, ProducerFenced

from townhall.admission import fencing
from townhall.admission.fencing import RoomWriters
from townhall.core.config import KafkaConfig
from townhall.core.errors import Aborted, Unavailable


class FakeProducer:
    """Stands in for a transactional AIOKafkaProducer; `fail` is raised by the next send."""

    made: list[FakeProducer] = []

    def __init__(self, **options: Any) -> None:
        self.transactional_id = options["transactional_id"]
        self.stopped = False
        self.fail: BaseException | None = None
        self.committed = 0
        FakeProducer.made.append(self)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    async def begin_transaction(self) -> None:
        pass

    async def send(self, topic: str, value: bytes | None, **options: Any) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self.fail is not None:
            future.set_exception(self.fail)
        else:
            future.set_result("written")
        return future

    async def commit_transaction(self) -> None:
        self.committed += 1


@pytest.fixture
def writers(monkeypatch: pytest.MonkeyPatch) -> RoomWriters:
    FakeProducer.made = []
    monkeypatch.setattr(fencing, "producer", lambda kafka, **options: FakeProducer(**options))
    return RoomWriters(
        KafkaConfig(topic_prefix="t"), "test", busy=lambda room_id: room_id == "busy", capacity=2
    )


def later() -> float:
    return time.monotonic() + 5


async def settle() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_each_room_has_a_producer_of_its_own_claimed_once(writers: RoomWriters) -> None:
    assert await writers.claim("a", later()) is True, "just made: the caller catches up"
    assert await writers.claim("a", later()) is False
    assert await writers.write("a", "t.room-state", b"a", b"v", [], later()) == "written"
    assert [p.transactional_id for p in FakeProducer.made] == ["t.room-a"]


async def test_idle_producers_beyond_the_bound_are_closed_least_recently_used_first(
    writers: RoomWriters,
) -> None:
    for room_id in ("busy", "old", "new"):
        await writers.claim(room_id, later())
    await settle()
    assert len(writers) == 2 and [p.stopped for p in FakeProducer.made] == [False, True, False]


async def test_a_fenced_write_is_aborted_and_the_next_change_claims_the_room_again(
    writers: RoomWriters,
) -> None:
    await writers.claim("a", later())
    FakeProducer.made[0].fail = ProducerFenced()
    with pytest.raises(Aborted) as refused:
        await writers.write("a", "t.room-state", b"a", b"v", [], later())
    assert refused.value.code == grpc.StatusCode.ABORTED and "another admission process" in str(refused.value)
    assert FakeProducer.made[0].committed == 0
    await settle()
    assert FakeProducer.made[0].stopped and await writers.claim("a", later()) is True


async def test_a_kafka_failure_is_unavailable_and_drops_the_producer(writers: RoomWriters) -> None:
    await writers.claim("a", later())
    FakeProducer.made[0].fail = KafkaTimeoutError()
    with pytest.raises(Unavailable):
        await writers.write("a", "t.room-state", b"a", b"v", [], later())
    assert len(writers) == 0


async def test_producers_of_rooms_now_owned_elsewhere_are_closed(writers: RoomWriters) -> None:
    await writers.claim("mine", later())
    await writers.claim("theirs", later())
    assert writers.keep_owned(lambda room_id: room_id == "mine") == 1
    await settle()
    assert [p.stopped for p in FakeProducer.made] == [False, True]
