"""Fan-out workers: tasks from the fast and bulk lanes in, acknowledged notification records out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from townhall.core import logging
from townhall.core.kafka import KAFKA_ERRORS, Topics
from townhall.core.metrics import KAFKA_PRODUCE_ERRORS, from_zero
from townhall.core.provenance import RecordSigner
from townhall.core.records import Reader
from townhall.notifier.blocks import shard_sorted
from townhall.notifier.clients import describe
from townhall.notifier.lanes import LaneChooser
from townhall.notifier.metrics import FANOUT_TASKS, NOTIFICATIONS, TASK_LAG
from townhall.notifier.offsets import OffsetBook, rewind
from townhall.notifier.records import SHARDS, Task, encode_batch, shard_key, task_record
from townhall.v1 import inbox_pb2

log = logging.get(__name__)

# Steps whose records are still waiting for acks while the next step is produced.
MAX_STEPS_IN_FLIGHT = 4
RETRY_BACKOFF_S = 1.0
COMMIT_EVERY_S = 0.1
# How long a rebalance waits for in-flight output before handing partitions over.
REVOKE_WAIT_S = 10.0
IDLE_WAIT_MS = 20


@dataclass
class Step:
    """Tasks taken together: their records are acknowledged, then their offsets finished, together."""

    lane: str
    offsets: list[tuple[TopicPartition, int]] = field(default_factory=list)
    futures: list[asyncio.Future[object]] = field(default_factory=list)
    users: int = 0
    tasks: int = 0
    started_ms: list[int] = field(default_factory=list)


def expand(tasks: list[Task], batch_users: int) -> list[tuple[bytes, bytes]]:
    """(key, NotificationBatch value) records for tasks: per room, users de-duplicated and grouped by
    user shard, at most `batch_users` per record."""
    by_room: dict[bytes, list[np.ndarray]] = {}
    for task in tasks:
        by_room.setdefault(task.notification, []).append(task.user_ids)
    out: list[tuple[bytes, bytes]] = []
    for notification, parts in by_room.items():
        ids, starts = shard_sorted(np.concatenate(parts), SHARDS)
        bounds = [*starts.tolist(), len(ids)]
        for shard in range(SHARDS):
            lo, hi = bounds[shard], bounds[shard + 1]
            for i in range(lo, hi, batch_users):
                out.append((shard_key(shard), encode_batch(notification, ids[i : min(hi, i + batch_users)])))
    return out


class Worker:
    """A fan-out worker: one consumer per lane (each lane its own consumer group).

    The fast lane is always read first; while it has work, the bulk lane gets at most
    `bulk_share` of the tasks run. Offsets are committed only once a task's records are
    acknowledged (acks=all); a crash replays the unacknowledged tasks, and readers drop the
    repeats by (room, user). Tasks are small (at most 4096 users), so no step comes near
    max.poll.interval.
    """

    def __init__(
        self,
        consumers: Mapping[str, AIOKafkaConsumer],
        producers: Mapping[str, AIOKafkaProducer],
        topics: Topics,
        batch_users: int,
        bulk_share: float,
        max_tasks: int,
        rate: float = 0.0,
        *,
        signer: RecordSigner,
        records: Reader,
    ) -> None:
        self._signer = signer
        # Tasks are run only if a notifier signed them and they pass task_record's checks.
        self._records = records
        # One consumer per lane (each its own group): a fetch of bulk tasks never delays a fast one.
        self._consumers = consumers
        # One producer per lane, and in-flight steps bounded per lane, so fast records never wait
        # behind bulk records in this process.
        self._producers = producers
        self._topics = topics
        from_zero(KAFKA_PRODUCE_ERRORS, topics.notifications)
        self._batch_users = batch_users
        self._lanes = LaneChooser(bulk_share)
        self._max_tasks = max_tasks
        self._rate = rate
        self._book = OffsetBook()
        self._steps: set[asyncio.Task[None]] = set()
        self._slots = {lane: asyncio.Semaphore(MAX_STEPS_IN_FLIGHT) for lane in ("fast", "bulk")}
        self._failed: set[TopicPartition] = set()
        self._last_commit = 0.0
        self._next_at = 0.0

    async def run(self) -> None:
        """Runs tasks until cancelled."""
        try:
            while True:
                try:
                    await self._once()
                except KAFKA_ERRORS as exc:
                    log.warning("fan-out worker step failed, will retry", error=describe(exc))
                    await asyncio.sleep(RETRY_BACKOFF_S)
                if self._failed:
                    await self._rewind()
                await self._commit()
        finally:
            for step in list(self._steps):
                step.cancel()

    async def _take(self, lane: str, limit: int, wait_ms: int = 0) -> list[ConsumerRecord[bytes, bytes]]:
        if limit <= 0:
            return []
        got = await self._consumers[lane].getmany(timeout_ms=wait_ms, max_records=limit)
        return [r for records in got.values() for r in records]

    async def _once(self) -> None:
        limit = self._limit()
        fast = await self._take("fast", limit)
        if fast:
            self._lanes.served(fast=len(fast))
            await self._start(fast, "fast")
            bulk = await self._take("bulk", min(limit, self._lanes.bulk_allowance()))
            if bulk:
                self._lanes.served(bulk=len(bulk))
                await self._start(bulk, "bulk")
            return
        self._lanes.idle()
        if not self._slots["bulk"].locked():
            bulk = await self._take("bulk", limit)
            if bulk:
                await self._start(bulk, "bulk")
                return
        # Nothing to start on the bulk lane (none waiting, or its output still being acknowledged):
        # long-poll the fast lane briefly, so a fast task is picked up the moment it lands.
        fast = await self._take("fast", limit, wait_ms=IDLE_WAIT_MS)
        if fast:
            await self._start(fast, "fast")

    def _limit(self) -> int:
        if self._rate <= 0:
            return self._max_tasks
        return max(1, min(self._max_tasks, int(self._rate / 10)))

    async def _pace(self, tasks: int) -> None:
        if self._rate <= 0:
            return
        now = time.monotonic()
        if self._next_at > now:
            await asyncio.sleep(self._next_at - now)
        self._next_at = max(now, self._next_at) + tasks / self._rate

    async def _start(self, records: list[ConsumerRecord[bytes, bytes]], lane: str) -> None:
        """Produces a step's records and leaves their acks to a background task."""
        await self._pace(len(records))
        step = Step(lane)
        tasks: list[Task] = []
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            self._book.begin(tp, record.offset)
            step.offsets.append((tp, record.offset))
            task = self._records.read(record, task_record)
            if task is None:
                # Skipped and counted (core/records.py): finished with the step, never blocking its lane.
                continue
            tasks.append(task)
            step.started_ms.append(inbox_pb2.Notification.FromString(task.notification).started_at_ms)
            step.users += len(task.user_ids)
        step.tasks = len(tasks)
        await self._slots[lane].acquire()
        try:
            topic = self._topics.notifications
            for key, value in expand(tasks, self._batch_users):
                headers = self._signer.headers(topic, key, value)
                step.futures.append(await self._producers[lane].send(topic, value, key=key, headers=headers))
        except KAFKA_ERRORS:
            KAFKA_PRODUCE_ERRORS.labels(self._topics.notifications).inc()
            self._slots[lane].release()
            self._fail(step)
            raise
        settle = asyncio.create_task(self._settle(step), name="worker-settle")
        self._steps.add(settle)
        settle.add_done_callback(self._steps.discard)

    async def _settle(self, step: Step) -> None:
        try:
            results = await asyncio.gather(*step.futures, return_exceptions=True)
        finally:
            self._slots[step.lane].release()
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            KAFKA_PRODUCE_ERRORS.labels(self._topics.notifications).inc(len(failures))
            log.warning("notification records not acknowledged, will retry", error=describe(failures[0]))
            self._fail(step)
            return
        for tp, offset in step.offsets:
            self._book.finish(tp, offset)
        self._last_commit = 0.0  # commit at the next turn: the smaller the window, the fewer repeats
        NOTIFICATIONS.labels("topic").inc(step.users)
        FANOUT_TASKS.labels(step.lane, "done").inc(step.tasks)
        now = time.time()
        for started in step.started_ms:
            if started > 0:
                TASK_LAG.labels(step.lane).observe(max(0.0, now - started / 1000))

    def _fail(self, step: Step) -> None:
        self._failed.update(tp for tp, _ in step.offsets)

    async def _rewind(self) -> None:
        """After a failed step: let the others settle, then fetch again from the oldest unfinished task."""
        failed, self._failed = self._failed, set()
        await rewind(self._book, failed, self._consumer_of, self._steps, RETRY_BACKOFF_S)

    async def _commit(self) -> None:
        now = time.monotonic()
        if now - self._last_commit < COMMIT_EVERY_S:
            return
        self._last_commit = now
        assigned = {tp for c in self._consumers.values() for tp in c.assignment()}
        self._book.forget({tp for tp in self._book.committable() if tp not in assigned})
        offsets = self._book.committable()
        for lane, consumer in self._consumers.items():
            mine = {tp: o for tp, o in offsets.items() if self._lane_of(tp) == lane}
            if not mine:
                continue
            try:
                await consumer.commit(mine)
                self._book.committed(mine)
            except KAFKA_ERRORS as exc:
                # Lost a partition in a rebalance: its new owner replays from the last commit.
                log.warning("fan-out commit failed", lane=lane, error=describe(exc))

    async def on_revoked(self, lane: str, revoked: set[TopicPartition]) -> None:
        """Before partitions move to another member: settle what is in flight and commit it, so the
        new owner does not repeat work that is done."""
        if self._steps:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*list(self._steps), return_exceptions=True), REVOKE_WAIT_S
                )
        offsets = {tp: o for tp, o in self._book.committable().items() if tp in revoked}
        if offsets:
            try:
                await self._consumers[lane].commit(offsets)
            except KAFKA_ERRORS as exc:
                log.warning("fan-out commit on revoke failed", lane=lane, error=describe(exc))
        self._book.forget(revoked)

    def _lane_of(self, tp: TopicPartition) -> str:
        return "fast" if tp.topic == self._topics.fanout_fast else "bulk"

    def _consumer_of(self, tp: TopicPartition) -> AIOKafkaConsumer:
        return self._consumers[self._lane_of(tp)]


class CommitOnRevoke(ConsumerRebalanceListener):
    """Lets a worker commit its finished tasks before a rebalance takes their partitions away."""

    def __init__(self, worker: Worker, lane: str) -> None:
        self._worker = worker
        self._lane = lane

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Settles and commits what this member finished on the revoked partitions."""
        await self._worker.on_revoked(self._lane, set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Nothing to do: a new partition resumes from its committed offset."""
