"""Durable rooms: every change is acknowledged by Kafka (acks=all) before it is applied or answered.

Every process keeps a replica of every room by following the compacted room-state topic (committed
records only). A room's changes are written through the room's own transactional producer
(admission/fencing.py): the first change a process makes to a room fences every other writer of it,
and the process then reads the topic to its end offsets before building on its replica, so it never
builds a change on a stale version. Until another process fences it, nobody else writes the room, so
its replica stays current; once fenced, its writes are refused (ABORTED) and never seen by readers.
See docs/ownership.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from townhall.admission.fencing import RoomWriters
from townhall.admission.metrics import ROOM_CHANGES, ROOMS_LIVE
from townhall.admission.rooms import RoomBook
from townhall.core import logging
from townhall.core.config import KafkaConfig
from townhall.core.errors import AlreadyExists, Reason, ResourceExhausted, Unavailable
from townhall.core.kafka import Follower, Topics, consumer, read_to_end
from townhall.core.locks import KeyedLocks
from townhall.core.metrics import KAFKA_PRODUCE_ERRORS, from_zero
from townhall.core.provenance import RecordSigner
from townhall.core.records import INVALID, STALE, Record, skipped
from townhall.core.room_records import RoomRecords
from townhall.internal.v1.events_pb2 import RoomStarted
from townhall.v1.common_pb2 import Room, RoomState

log = logging.get(__name__)

# How long a change may wait for Kafka (catching up, then writing) before the caller is told to
# retry (UNAVAILABLE); the client's own deadline is longer.
COMMIT_TIMEOUT_S = 10.0
HOUR_MS = 3_600_000


def now_ms() -> int:
    """Wall-clock Unix milliseconds."""
    return time.time_ns() // 1_000_000


class RoomStore:
    """Rooms held in memory, written through to the compacted room-state topic."""

    def __init__(
        self,
        kafka: KafkaConfig,
        producer: AIOKafkaProducer,
        signer: RecordSigner,
        records: RoomRecords,
        rooms_per_host_per_hour: int = 0,
        client_id: str = "admission",
    ) -> None:
        self.book = RoomBook()
        self._signer = signer
        self._records = records
        # Rooms one host may create per hour (0: no limit), counted from the replica on the new room's owner.
        self._per_host = rooms_per_host_per_hour
        self._kafka = kafka
        self._topics = Topics(kafka.topic_prefix)
        from_zero(KAFKA_PRODUCE_ERRORS, self._topics.room_state, self._topics.room_started)
        self._producer = producer
        # One change at a time per room here (a lock exists only while in use); across processes the
        # room's transactional producer (fencing) makes it one writer at a time.
        self.locks = KeyedLocks()
        self.writers = RoomWriters(kafka, client_id, self.locks.locked)
        self._ends: dict[TopicPartition, int] = {}
        self._follower: Follower | None = None
        # Asks for the end offsets (caught_up) on a connection of its own: on the follower's, the
        # request waits behind the follower's long-polling fetch (up to its fetch_max_wait_ms).
        self._offsets: AIOKafkaConsumer | None = None
        # Called with each room version read from the topic while following (after `load`).
        self.on_change: Callable[[Room], None] | None = None

    async def load(self) -> int:
        """Rebuilds every room from the room-state topic; returns how many records were read."""
        count = 0

        def apply(record: Record) -> None:
            nonlocal count
            count += 1
            self._read(record)

        self._ends = await read_to_end(self._kafka, self._topics.room_state, apply)
        self._update_gauge()
        log.info("rooms rebuilt from kafka", records=count, rooms=len(self.book))
        return count

    async def follow(self) -> None:
        """Keeps applying the topic from where `load` stopped: every process holds a replica of every room."""
        follower = Follower(self._kafka, self._ends, self._followed, "room-state-follower")
        await follower.start()
        self._follower = follower
        offsets = consumer(self._kafka, enable_auto_commit=False)
        await offsets.start()
        self._offsets = offsets

    async def stop(self) -> None:
        """Stops following the topic and closes the rooms' producers."""
        follower, self._follower = self._follower, None
        if follower is not None:
            await follower.close()
        offsets, self._offsets = self._offsets, None
        if offsets is not None:
            with contextlib.suppress(Exception):
                await offsets.stop()
        await self.writers.close()

    def _followed(self, record: Record) -> None:
        room = self._read(record)
        if room is not None and self.on_change is not None:
            # Also for versions already applied (this process's own or forwarded changes).
            self.on_change(room)

    def _read(self, record: Record) -> Room | None:
        """Applies one record: a room version, or a deleted room; None if it changed nothing here."""
        if record.value is None:
            # A deleted room (an ended room's retention is over): every process forgets it.
            room_id = self._records.deleted(record)
            held = self.book.find(room_id) if room_id else None
            if held is not None and held.state != RoomState.ROOM_STATE_ENDED:
                skipped(record, INVALID, f"room {room_id} is not ended: it is not deleted")
            elif room_id and self.book.forget(room_id):
                self._update_gauge()
            return None
        room = self._records.read(record)
        if room is None:
            return None
        held = self.book.find(room.room_id)
        if held is not None and held.version > room.version:
            skipped(record, STALE, f"room {room.room_id} version {room.version} is older than {held.version}")
            return None
        if self.book.apply(room):
            self._update_gauge()
        return room

    async def caught_up(self, deadline: float) -> None:
        """Returns once the replica holds every room change committed before this call (or UNAVAILABLE)."""
        follower, offsets = self._follower, self._offsets
        if follower is None or offsets is None:
            raise Unavailable("this process is not following the room-state topic yet: retry")
        try:
            # Read committed: the last stable offsets (a transaction still open ends the wait before it).
            ends = await asyncio.wait_for(
                offsets.end_offsets(list(self._ends)), max(0.0, deadline - time.monotonic())
            )
        except (KafkaError, TimeoutError) as exc:
            raise Unavailable("Kafka did not say how far the room-state topic goes: retry") from exc
        while not await follower.reached(ends):
            if time.monotonic() > deadline:
                raise Unavailable("this replica is behind the room-state topic: retry")
            await asyncio.sleep(0.01)

    async def _claim(self, room_id: str, deadline: float) -> None:
        """Makes this process the room's writer (caller holds the room's lock): a producer just made for
        the room has fenced any other writer, and the replica then catches up with what they wrote."""
        if await self.writers.claim(room_id, deadline):
            try:
                await self.caught_up(deadline)
            except BaseException:
                # Not caught up: the next change must claim (and catch up) again, not build on this replica.
                self.writers.drop(room_id)
                raise

    async def quiesce(self, timeout_s: float = COMMIT_TIMEOUT_S) -> None:
        """Waits until no change is being written here (hand-over on SIGTERM)."""

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.locks.quiet(), timeout_s)

    async def create(
        self,
        host: int,
        title: str,
        speakers: list[int],
        listener_limit: int,
        room_id: str,
        replay: bool = False,
    ) -> Room:
        """Creates and durably records a room with the id the servicer picked.

        With `replay` (the id was derived from the host's request id) a room that already exists
        with this id and host is the answer of an earlier attempt, and is returned as it is.
        """
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        async with self.locks.hold(room_id):
            await self._claim(room_id, deadline)
            existing = self.book.find(room_id)
            if existing is not None:
                if replay and existing.host_id == host:
                    return existing
                raise AlreadyExists(f"room {room_id} already exists")
            now = now_ms()
            if self._per_host:
                recent = self.book.created_since(host, now - HOUR_MS)
                if len(recent) >= self._per_host:
                    retry_ms = max(1_000, recent[-self._per_host] + HOUR_MS - now)
                    raise ResourceExhausted(
                        f"host {host} created {len(recent)} rooms in the last hour; at most "
                        f"{self._per_host} per hour: retry after {retry_ms // 1000} s",
                        retry_ms,
                        Reason.RATE_LIMITED,
                    )
            room = self.book.created(host, title, speakers, listener_limit, now, room_id)
            await self._commit(room, "created", deadline)
        return room

    async def start(self, room_id: str, caller: int) -> Room:
        """Starts the caller's room and announces it (followers are notified) once.

        Three writes: the room live, its room-started event, the room announced. An owner that
        fails between them leaves a live room not yet announced, which the next owner announces
        (`announce_pending`): a start the caller was not answered for is completed, never half made.
        Starting a room that is live and announced returns it with no write: repeating StartRoom
        is safe and never notifies the followers again.
        """
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        async with self.locks.hold(room_id):
            await self._claim(room_id, deadline)
            room = self.book.started(room_id, caller, now_ms())
            if room is not self.book.get(room_id):
                await self._commit(room, "started", deadline)
            elif room.announced:
                return room
            return await self._announce(room, deadline)

    async def announce_pending(self, owns: Callable[[str], bool]) -> int:
        """Announces the live rooms owned here whose room-started event may be missing."""
        done = 0
        for room in self.book.unannounced():
            if not owns(room.room_id) or self.locks.locked(room.room_id):
                continue
            async with self.locks.hold(room.room_id):
                deadline = time.monotonic() + COMMIT_TIMEOUT_S
                await self._claim(room.room_id, deadline)
                current = self.book.get(room.room_id)
                if current.state == RoomState.ROOM_STATE_LIVE and not current.announced:
                    log.info("announcing a room started by an earlier owner", room=room.room_id)
                    await self._announce(current, deadline)
                    done += 1
        return done

    async def _announce(self, room: Room, deadline: float) -> Room:
        await self._send(self._topics.room_started, str(room.host_id), RoomStarted(room=room), deadline)
        announced = self.book.announced(room.room_id)
        if announced is not self.book.get(room.room_id):
            await self._commit(announced, "announced", deadline)
        return announced

    async def schedule(self, room_id: str, caller: int, start_at_ms: int) -> Room:
        """Durably schedules the caller's room to start at `start_at_ms`."""
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        async with self.locks.hold(room_id):
            await self._claim(room_id, deadline)
            room = self.book.scheduled(room_id, caller, start_at_ms)
            await self._commit(room, "scheduled", deadline)
        return room

    async def end(self, room_id: str, caller: int) -> Room:
        """Ends the caller's room."""
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        async with self.locks.hold(room_id):
            await self._claim(room_id, deadline)
            room = self.book.ended(room_id, caller, now_ms())
            if room is not self.book.get(room_id):
                await self._commit(room, "ended", deadline)
        return room

    async def expire(self, owns: Callable[[str], bool], retention_ms: int, unstarted_ms: int) -> int:
        """Releases what rooms nobody uses any more hold; returns the rooms forgotten here.

        A room never started `unstarted_ms` after its creation is ended by its owner. A room ended
        `retention_ms` ago (every ticket issued for it has expired by then) is deleted from the
        room-state topic by its owner (a tombstone, so compaction removes it and no process reads it
        at start again) and forgotten by every process.
        """
        now = now_ms()
        for room_id in self.book.unstarted_before(now - unstarted_ms):
            if owns(room_id):
                await self.change(room_id, "expired", lambda room: self.book.expired(room.room_id, now))
        forgotten = 0
        for room_id in self.book.ended_before(now - retention_ms):
            if owns(room_id):
                deadline = time.monotonic() + COMMIT_TIMEOUT_S
                async with self.locks.hold(room_id):
                    await self._claim(room_id, deadline)
                    await self._write(room_id, None, deadline)
                    ROOM_CHANGES.labels("deleted").inc()
                self.writers.drop(room_id)
            forgotten += self.book.forget(room_id)
        self.book.prune_created(now - HOUR_MS)
        if forgotten:
            self._update_gauge()
            log.info("ended rooms forgotten", rooms=forgotten)
        return forgotten

    async def mark_crowd(self, room_id: str) -> Room:
        """Durably marks a live room as drawing a crowd (its clients then join on the crowd lane)."""
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        async with self.locks.hold(room_id):
            await self._claim(room_id, deadline)
            room = self.book.crowded(room_id)
            if room is not self.book.get(room_id):
                await self._commit(room, "crowd", deadline)
        return room

    async def change(self, room_id: str, change: str, make: Callable[[Room], Room]) -> Room:
        """Applies a pure rule (admission/stage.py) to the room and durably records what it returns.

        A rule that returns the room it was given changed nothing: nothing is written.
        """
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        async with self.locks.hold(room_id):
            await self._claim(room_id, deadline)
            held = self.book.get(room_id)
            room = make(held)
            if room is not held:
                await self._commit(room, change, deadline)
        return room

    async def _commit(self, room: Room, change: str, deadline: float) -> None:
        await self._write(room.room_id, room, deadline)
        self.book.apply(room)
        ROOM_CHANGES.labels(change).inc()
        self._update_gauge()
        log.info("room changed", room=room.room_id, change=change, version=room.version)

    async def _write(self, room_id: str, room: Room | None, deadline: float) -> RecordMetadata:
        """Commits a room version (None: the room deleted) through the room's producer (claimed first)."""
        topic = self._topics.room_state
        value = room.SerializeToString() if room is not None else None
        key = room_id.encode()
        # A tombstone is signed too: readers act on no unsigned deletion.
        headers = self._signer.headers(topic, key, value or b"")
        try:
            return await self.writers.write(room_id, topic, key, value, headers, deadline)
        except Unavailable:
            KAFKA_PRODUCE_ERRORS.labels(topic).inc()
            log.warning("kafka write failed", topic=topic, key=room_id)
            raise

    async def _send(
        self, topic: str, key: str, message: Room | RoomStarted | None, deadline: float
    ) -> RecordMetadata:
        value = message.SerializeToString() if message is not None else None
        record_key = key.encode()
        # A tombstone (None: a deleted room) is signed too: readers act on no unsigned deletion.
        headers = self._signer.headers(topic, record_key, value or b"")
        try:
            return await asyncio.wait_for(
                self._producer.send_and_wait(topic, value, key=record_key, headers=headers),
                max(0.0, deadline - time.monotonic()),
            )
        except (KafkaError, TimeoutError) as exc:
            KAFKA_PRODUCE_ERRORS.labels(topic).inc()
            log.warning("kafka write failed", topic=topic, key=key, error=repr(exc))
            # The record may still reach Kafka later; every room change is safe to repeat.
            raise Unavailable("Kafka did not acknowledge the change in time; retrying it is safe") from exc

    def _update_gauge(self) -> None:
        ROOMS_LIVE.set(self.book.live_count())
