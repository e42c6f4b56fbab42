"""The planner: room-started events in, fan-out tasks on the fast or bulk lane out, then commit."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord
from google.protobuf.message import DecodeError

from townhall.core import logging
from townhall.core.errors import TownhallError
from townhall.core.kafka import Topics
from townhall.core.metrics import KAFKA_PRODUCE_ERRORS
from townhall.core.provenance import RecordSigner
from townhall.core.records import Reader
from townhall.core.tasks import cancel
from townhall.notifier.clients import describe
from townhall.notifier.metrics import FANOUT_EVENTS, FANOUT_LAG, FANOUT_TASKS
from townhall.notifier.offsets import OffsetBook
from townhall.notifier.placement import Placement
from townhall.notifier.records import encode_task, room_started, room_started_record
from townhall.notifier.store import SqliteFollowerStore
from townhall.v1 import events_pb2

log = logging.get(__name__)

# Task records in flight before waiting for their acks: bounds memory for any follower count.
MAX_IN_FLIGHT = 16
RETRY_BACKOFF_S = 1.0
COMMIT_EVERY_S = 0.2


@dataclass(frozen=True)
class Plan:
    """What the planner wrote for one room start."""

    room_id: str
    tasks: int
    users: int


def task_id(room_id: str, started_at_ms: int, part: str, index: int) -> str:
    """The idempotent id of a task: the same room start planned again gives the same ids."""
    return f"{room_id}/{started_at_ms}/{part}/{index}"


class Planner:
    """Splits the followers of each started room's host (and the room's reminder list) into tasks.

    Every notifier reads every room-started event (its own consumer group) and plans only what
    it owns: the followers of hosts whose graph shard is here, and the reminders of rooms
    placed here. An event is committed once all its tasks are acknowledged; big hosts are
    planned in the background so a small host's event behind them is not held up.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producers: Mapping[str, AIOKafkaProducer],
        store: SqliteFollowerStore,
        topics: Topics,
        placement: Placement,
        bulk_threshold: int,
        task_users: int,
        *,
        signer: RecordSigner,
        records: Reader,
    ) -> None:
        self._consumer = consumer
        self._signer = signer
        # Room-started events are acted on only if admission signed them and they make a notification.
        self._records = records
        # One producer per lane: a fast task never queues behind bulk bytes in a client buffer.
        self._producers = producers
        self._store = store
        self._topics = topics
        self._placement = placement
        self._threshold = bulk_threshold
        self._task_users = task_users
        self._book = OffsetBook()
        self._big: asyncio.Queue[tuple[TopicPartition, ConsumerRecord[bytes, bytes]]] = asyncio.Queue()
        self._last_commit = 0.0

    async def run(self) -> None:
        """Plans events until cancelled."""
        big = asyncio.create_task(self._big_loop(), name="planner-big")
        try:
            while True:
                try:
                    batch = await self._consumer.getmany(timeout_ms=200, max_records=100)
                except Exception as exc:
                    log.warning("room-started fetch failed, will retry", error=describe(exc))
                    await asyncio.sleep(RETRY_BACKOFF_S)
                    continue
                for tp, records in batch.items():
                    for record in records:
                        self._book.begin(tp, record.offset)
                        if self._records.read(record, room_started_record) is None:
                            self._book.finish(tp, record.offset)  # skipped and counted
                            continue
                        if await self._is_big(record.value or b""):
                            self._big.put_nowait((tp, record))
                        else:
                            await self._plan_record(tp, record)
                await self._commit(force=not batch)
        finally:
            await cancel(big)

    async def _big_loop(self) -> None:
        while True:
            tp, record = await self._big.get()
            await self._plan_record(tp, record)

    async def _is_big(self, value: bytes) -> bool:
        try:
            host = events_pb2.RoomStarted.FromString(value).room.host_id
        except DecodeError:
            return False
        if not host or not self._placement.owns_followee(host):
            return False
        return await self._store.count(host) > self._threshold

    async def _plan_record(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            await self.plan(record.value or b"")
        except Exception as exc:
            # Not finished, so not committed: rewind the partition to it and try again.
            log.warning(
                "planning failed, will retry",
                partition=tp.partition,
                offset=record.offset,
                error=describe(exc),
            )
            with contextlib.suppress(Exception):
                self._consumer.seek(tp, self._book.oldest_unfinished(tp) or record.offset)
            await asyncio.sleep(RETRY_BACKOFF_S)
            return
        self._book.finish(tp, record.offset)

    async def plan(self, value: bytes) -> Plan:
        """Writes the tasks of one serialised RoomStarted and waits for their acks."""
        try:
            notification = room_started(events_pb2.RoomStarted.FromString(value))
        except (DecodeError, TownhallError) as exc:
            # A poison record must not block the partition: skipped, counted and logged.
            FANOUT_EVENTS.labels("invalid").inc()
            log.warning("room-started event skipped", error=str(exc))
            return Plan("", 0, 0)
        room, host, started = notification.room_id, notification.host_id, notification.started_at_ms
        owns_host = self._placement.owns_followee(host)
        count = await self._store.count(host) if owns_host else 0
        lane = "bulk" if count > self._threshold else "fast"
        # A host big enough for the bulk lane draws a crowd: followers join on admission's crowd lane.
        notification.crowd = notification.crowd or lane == "bulk"
        encoded = notification.SerializeToString()
        tasks = users = 0
        if owns_host:
            n, u = await self._write(
                self._store.stored_blocks(host), encoded, room, started, "f", lane, count
            )
            tasks, users = tasks + n, users + u
        if self._placement.owns_room(room):
            n, u = await self._write(self._store.reminded(room), encoded, room, started, "r", "fast", 0)
            tasks, users = tasks + n, users + u
        FANOUT_EVENTS.labels("done").inc()
        if started > 0:
            FANOUT_LAG.observe(max(0.0, time.time() - started / 1000))
        if tasks:
            log.info("room fan-out planned", room=room, host=host, tasks=tasks, users=users)
        return Plan(room, tasks, users)

    async def _write(
        self,
        blocks: AsyncIterator[np.ndarray],
        encoded: bytes,
        room: str,
        started: int,
        part: str,
        lane: str,
        part_users: int,
    ) -> tuple[int, int]:
        topic = self._topics.fanout_bulk if lane == "bulk" else self._topics.fanout_fast
        in_flight: list[asyncio.Future[object]] = []
        index = users = 0
        now = int(time.time() * 1000)
        async for block in blocks:
            for start in range(0, len(block), self._task_users):
                ids = block[start : start + self._task_users]
                tid = task_id(room, started, part, index)
                value = encode_task(tid, encoded, index, part_users, ids, now)
                key = tid.encode()
                headers = self._signer.headers(topic, key, value)
                try:
                    in_flight.append(await self._producers[lane].send(topic, value, key=key, headers=headers))
                except Exception:
                    KAFKA_PRODUCE_ERRORS.labels(topic).inc()
                    raise
                index += 1
                users += len(ids)
                if len(in_flight) >= MAX_IN_FLIGHT:
                    await _settle(in_flight, topic)
        await _settle(in_flight, topic)
        FANOUT_TASKS.labels(lane, "planned").inc(index)
        return index, users

    async def commit_now(self, partitions: set[TopicPartition]) -> None:
        """Commits the finished events of `partitions` at once, then forgets them (a rebalance)."""
        offsets = {tp: o for tp, o in self._book.committable().items() if tp in partitions}
        if offsets:
            try:
                await self._consumer.commit(offsets)
            except Exception as exc:
                log.warning("planner commit on revoke failed", error=describe(exc))
        self._book.forget(partitions)

    async def _commit(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < COMMIT_EVERY_S:
            return
        self._last_commit = now
        offsets = self._book.committable()
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
            self._book.committed(offsets)
        except Exception as exc:
            # Lost the partition in a rebalance: its new owner replays; the task ids repeat.
            log.warning("planner commit failed", error=describe(exc))
            self._book.forget(set(offsets) - self._consumer.assignment())


class PlannerCommitOnRevoke(ConsumerRebalanceListener):
    """Commits the events a planner finished before a rebalance moves their partitions."""

    def __init__(self, planner: Planner) -> None:
        self._planner = planner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Commits what is finished on the revoked partitions."""
        await self._planner.commit_now(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Nothing to do: a new partition resumes from its committed offset."""


async def _settle(in_flight: list[asyncio.Future[object]], topic: str) -> None:
    """Waits for every future (not just the first failure, so nothing is left in flight)."""
    if not in_flight:
        return
    results = await asyncio.gather(*in_flight, return_exceptions=True)
    in_flight.clear()
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        KAFKA_PRODUCE_ERRORS.labels(topic).inc(len(failures))
        raise failures[0]
