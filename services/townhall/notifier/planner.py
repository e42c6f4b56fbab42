"""The planner: room-started events in, fan-out tasks on the fast or bulk lane out, then commit."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord
from google.protobuf.message import DecodeError

from townhall.core import logging
from townhall.core.config import KafkaConfig
from townhall.core.errors import TownhallError
from townhall.core.kafka import KAFKA_ERRORS, Topics, client_options
from townhall.core.metrics import KAFKA_PRODUCE_ERRORS, from_zero
from townhall.core.provenance import RecordSigner
from townhall.core.records import Reader
from townhall.core.tasks import cancel, supervise
from townhall.internal.v1 import events_pb2
from townhall.notifier.clients import describe
from townhall.notifier.handover import Handover
from townhall.notifier.metrics import FANOUT_EVENTS, FANOUT_LAG, FANOUT_TASKS
from townhall.notifier.offsets import OffsetBook, rewind
from townhall.notifier.placement import ShardOwners
from townhall.notifier.records import encode_task, room_started, room_started_record
from townhall.notifier.store import STORE_ERRORS, Moved, SqliteFollowerStore, followee_key, room_key

log = logging.get(__name__)

# Task records in flight before waiting for their acks: bounds memory for any follower count.
MAX_IN_FLIGHT = 16
# Small hosts' room starts planned at once, each waiting for its own acks: one start waiting for its
# acks (slower while a celebrity's fan-out loads the brokers) does not hold up the starts behind it.
MAX_PLANS_IN_FLIGHT = 32
# How long a rebalance waits for the plans in flight before committing what is finished.
REVOKE_WAIT_S = 10.0
RETRY_BACKOFF_S = 1.0
COMMIT_EVERY_S = 0.2
# How far back a notifier plans again the keys it gains in a membership change: longer than any two
# planners' lag behind each other plus the time the notifiers take to see the change.
REPLAY_S = 60.0
START_ATTEMPTS = 5
# What planning one event may meet and retry (from the event, not committed): Kafka away (core/kafka.py
# KAFKA_ERRORS), the store's disk, a key's owner not answering its handover (UNAVAILABLE), a key handed
# to a newer view mid-plan. Anything else ends the planner loop under the supervisor.
PLAN_ERRORS: tuple[type[Exception], ...] = (*KAFKA_ERRORS, *STORE_ERRORS, TownhallError, Moved)


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
    placed here (each settled first: notifier/handover.py). An event is committed once all its
    tasks are acknowledged; big hosts are planned in the background so a small host's event behind
    them is not held up, and small hosts' events are planned side by side (at most
    MAX_PLANS_IN_FLIGHT), so neither is one behind another's acks. An event whose planning fails is
    fetched again, with everything after it (task ids repeat: readers drop the repeats).

    When the membership changes, a notifier that gains keys plans the events of the last REPLAY_S
    seconds again for those keys only (`replay`): a room start read by its old owner after that one
    had let the key go, and by its new owner before that one took it, is planned once after all.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producers: Mapping[str, AIOKafkaProducer],
        store: SqliteFollowerStore,
        topics: Topics,
        placement: ShardOwners,
        bulk_threshold: int,
        task_users: int,
        handover: Handover | None = None,
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
        from_zero(KAFKA_PRODUCE_ERRORS, topics.fanout_fast, topics.fanout_bulk)
        self._placement = placement
        self._threshold = bulk_threshold
        self._task_users = task_users
        self._book = OffsetBook()
        self._big: asyncio.Queue[tuple[TopicPartition, ConsumerRecord[bytes, bytes]]] = asyncio.Queue()
        self._planning: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_PLANS_IN_FLIGHT)
        # Partitions with an event whose planning failed: rewound by the run loop.
        self._failed: set[TopicPartition] = set()
        self._last_commit = 0.0
        self._handover = handover
        # A replay asked for (keys gained, since when), done by the run loop, which owns the consumer.
        self._replay_asked: tuple[Callable[[str], bool], int] | None = None
        # While replaying: per partition, the position before the replay, and the keys to plan below it.
        self._replay_until: dict[TopicPartition, int] = {}
        self._gained: Callable[[str], bool] | None = None

    def replay(self, gained: Callable[[str], bool], seconds: float = REPLAY_S) -> None:
        """Plans the events of the last `seconds` again, for the keys `gained` says are new here."""
        self._replay_asked = (gained, int((time.time() - seconds) * 1000))

    async def _start_replay(self) -> None:
        asked = self._replay_asked
        if asked is None:
            return
        gained, since_ms = asked
        partitions = self._consumer.assignment()
        if not partitions:
            return  # not assigned yet: asked again at the next fetch
        starts = await self._consumer.offsets_for_times(dict.fromkeys(partitions, since_ms))
        for tp in partitions:
            start = starts.get(tp)
            position = await self._consumer.position(tp)
            if start is not None and start.offset < position:
                self._replay_until[tp] = max(position, self._replay_until.get(tp, 0))
                self._consumer.seek(tp, start.offset)
        self._gained = gained
        if self._replay_asked is asked:
            self._replay_asked = None
        log.info("planning recent room starts again for keys gained", since_ms=since_ms)

    def _only(self, tp: TopicPartition, offset: int) -> Callable[[str], bool] | None:
        """During a replay, the keys an event below the pre-replay position is planned for."""
        until = self._replay_until.get(tp)
        if until is None:
            return None
        if offset >= until:
            del self._replay_until[tp]
            return None
        return self._gained or (lambda _key: False)

    async def run(self) -> None:
        """Plans events until cancelled."""
        big = supervise(self._big_loop(), "planner-big")
        try:
            while True:
                try:
                    await self._start_replay()
                    batch = await self._consumer.getmany(timeout_ms=200, max_records=100)
                except KAFKA_ERRORS as exc:
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
                            await self._slots.acquire()
                            plan = asyncio.create_task(self._plan_small(tp, record), name="planner-plan")
                            self._planning.add(plan)
                            plan.add_done_callback(self._planning.discard)
                if self._failed:
                    await self._rewind()
                await self._commit(force=not batch)
        finally:
            await cancel(big)
            for plan in list(self._planning):
                plan.cancel()

    async def _plan_small(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            await self._plan_record(tp, record)
        finally:
            self._slots.release()

    async def _rewind(self) -> None:
        """After a failed plan: let the plans in flight end, then fetch again from the oldest unfinished
        event of each partition that failed."""
        failed, self._failed = self._failed, set()
        await rewind(self._book, failed, lambda _tp: self._consumer, self._planning, RETRY_BACKOFF_S)

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
        try:
            return await self._store.count(host) > self._threshold
        except Moved:
            return False

    async def _plan_record(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            await self.plan(record.value or b"", self._only(tp, record.offset))
        except PLAN_ERRORS as exc:
            # Not finished, so not committed: the run loop rewinds the partition to it (_rewind).
            log.warning(
                "planning failed, will retry",
                partition=tp.partition,
                offset=record.offset,
                error=describe(exc),
            )
            self._failed.add(tp)
            return
        self._book.finish(tp, record.offset)

    async def plan(self, value: bytes, only: Callable[[str], bool] | None = None) -> Plan:
        """Writes the tasks of one serialised RoomStarted and waits for their acks (for the keys `only`
        allows, if given)."""
        try:
            notification = room_started(events_pb2.RoomStarted.FromString(value))
        except (DecodeError, TownhallError) as exc:
            # A poison record must not block the partition: skipped, counted and logged.
            FANOUT_EVENTS.labels("invalid").inc()
            log.warning("room-started event skipped", error=str(exc))
            return Plan("", 0, 0)
        room, host, started = notification.room_id, notification.host_id, notification.started_at_ms
        owns_host = await self._plans(followee_key(host), only)
        owns_room = await self._plans(room_key(room), only)
        try:
            count = await self._store.count(host) if owns_host else 0
        except Moved:
            owns_host, count = False, 0  # a newer view gave it away: its new owner plans it
        lane = "bulk" if count > self._threshold else "fast"
        # A host big enough for the bulk lane draws a crowd: followers join on admission's crowd lane.
        notification.crowd = notification.crowd or lane == "bulk"
        encoded = notification.SerializeToString()
        tasks = users = 0
        if owns_host:
            n, u = await self._write_owned(
                self._store.stored_blocks(host), encoded, room, started, "f", lane, count
            )
            tasks, users = tasks + n, users + u
        if owns_room:
            n, u = await self._write_owned(self._store.reminded(room), encoded, room, started, "r", "fast", 0)
            tasks, users = tasks + n, users + u
        FANOUT_EVENTS.labels("done").inc()
        if started > 0:
            FANOUT_LAG.observe(max(0.0, time.time() - started / 1000))
        if tasks:
            log.info("room fan-out planned", room=room, host=host, tasks=tasks, users=users)
        return Plan(room, tasks, users)

    async def _plans(self, key: str, only: Callable[[str], bool] | None) -> bool:
        """Whether this notifier plans `key` (it owns it, and a replay asks for it): settled first."""
        if not self._placement.owns(key) or (only is not None and not only(key)):
            return False
        if self._handover is not None:
            await self._handover.settle(key)
        return True

    async def _write_owned(self, blocks: AsyncIterator[np.ndarray], *args: Any) -> tuple[int, int]:
        try:
            return await self._write(blocks, *args)
        except Moved as moved:
            # Handed to a notifier with a newer view before the first block was read: it plans it.
            log.info("room fan-out left to the key's new owner", key=moved.key, owner=moved.owner)
            return 0, 0

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
                except KAFKA_ERRORS:
                    KAFKA_PRODUCE_ERRORS.labels(topic).inc()
                    raise
                index += 1
                users += len(ids)
                if len(in_flight) >= MAX_IN_FLIGHT:
                    await _settle(in_flight, topic)
        await _settle(in_flight, topic)
        FANOUT_TASKS.labels(lane, "planned").inc(index)
        return index, users

    async def start_at(self, partitions: Iterable[TopicPartition], at_ms: int) -> None:
        """Moves partitions this group never committed to the first event at or after `at_ms`."""
        try:
            fresh = [tp for tp in partitions if await self._consumer.committed(tp) is None]
            if not fresh:
                return
            starts = await self._consumer.offsets_for_times(dict.fromkeys(fresh, at_ms))
            for tp in fresh:
                found = starts.get(tp)
                if found is None:
                    await self._consumer.seek_to_end(tp)
                else:
                    self._consumer.seek(tp, found.offset)
        except KAFKA_ERRORS as exc:  # planning from the oldest event again beats skipping any
            log.warning("a new planner group starts at the oldest event", error=describe(exc))

    async def commit_now(self, partitions: set[TopicPartition]) -> None:
        """Commits the finished events of `partitions` at once (after the plans in flight, for at most
        REVOKE_WAIT_S), then forgets them (a rebalance)."""
        if self._planning:
            await asyncio.wait(list(self._planning), timeout=REVOKE_WAIT_S)
        offsets = {tp: o for tp, o in self._book.committable().items() if tp in partitions}
        if offsets:
            try:
                await self._consumer.commit(offsets)
            except KAFKA_ERRORS as exc:
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
        except KAFKA_ERRORS as exc:
            # Lost the partition in a rebalance: its new owner replays; the task ids repeat.
            log.warning("planner commit failed", error=describe(exc))
            self._book.forget(set(offsets) - self._consumer.assignment())


async def start_position(kafka: KafkaConfig, group: str, others: Iterable[str]) -> int | None:
    """Where a planner group that never committed starts: None for the oldest event (no notifier has
    planned anything yet, so nothing acknowledged is skipped), or REPLAY_S before now (Unix ms) when
    other planner groups have committed: this notifier joins others, which planned what came before."""
    for attempt in range(START_ATTEMPTS):
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap, **client_options(kafka))
        try:
            await admin.start()
            if await admin.list_consumer_group_offsets(group):
                return None
            for other in others:
                if await admin.list_consumer_group_offsets(other):
                    log.info("a new planner group joins the others", group=group, seconds_back=REPLAY_S)
                    return int((time.time() - REPLAY_S) * 1000)
            return None
        except KAFKA_ERRORS as exc:  # a group coordinator not there yet, Kafka away: try again, a few times
            if attempt + 1 == START_ATTEMPTS:
                # Planning everything again beats skipping anything.
                log.warning(
                    "planner groups not read; a new group starts at the oldest event", error=describe(exc)
                )
        finally:
            with contextlib.suppress(*KAFKA_ERRORS):
                await admin.close()
        await asyncio.sleep(RETRY_BACKOFF_S)
    return None


class PlannerCommitOnRevoke(ConsumerRebalanceListener):
    """Commits the events a planner finished before a rebalance moves their partitions; on the first
    assignment, starts partitions the group never committed at `start_at_ms` (Unix ms; None: the oldest)."""

    def __init__(self, planner: Planner, start_at_ms: int | None = None) -> None:
        self._planner = planner
        self._start_at_ms = start_at_ms

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Commits what is finished on the revoked partitions."""
        await self._planner.commit_now(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """A partition resumes from its committed offset; one never committed, from `start_at_ms`."""
        start_at, self._start_at_ms = self._start_at_ms, None
        if start_at is not None:
            await self._planner.start_at(assigned, start_at)


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
