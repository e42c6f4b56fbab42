"""Fenced room writers: a room's changes reach Kafka only through the room's own transactional producer.

Each room has a transactional.id of its own (`<topic prefix>.room-<room id>`). The process that writes a
room makes a producer with it; making one (InitProducerId) bumps the id's epoch, which fences every
earlier producer of the room: whatever such a zombie writes afterwards is refused by the broker, and a
transaction it has open is aborted first. Readers read committed records only, so a fenced write is
never seen, and the new writer catches up with the room-state topic after its producer is made, so it
builds on every change acknowledged before it. See docs/ownership.md for the argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.structs import RecordMetadata

from townhall.admission.metrics import ROOM_WRITES_FENCED
from townhall.core import logging
from townhall.core.config import KafkaConfig
from townhall.core.errors import Aborted, Unavailable
from townhall.core.kafka import Topics, producer

log = logging.get(__name__)

# Producers kept open between changes (each holds its own connections); the least recently used room's
# producer that no change is using is closed beyond this. A room whose producer was closed makes a new
# one at its next change (one InitProducerId and a catch-up: a few milliseconds).
MAX_WRITERS = 64
# A transaction left open by a writer that died or lost Kafka stops readers of its partition at the
# last stable offset until the broker aborts it: at most this long after it began, plus the broker's
# transaction.abort.timed.out.transaction.cleanup.interval.ms (1 s in the local and bundled brokers,
# 10 s by default), or until the room's next writer claims it. A change gives Kafka 10 s at most anyway
# (store.COMMIT_TIMEOUT_S).
TRANSACTION_TIMEOUT_MS = 10_000


def transactional_id(prefix: str, room_id: str) -> str:
    """The room's transactional.id: one per room, the same in every admission process."""
    return Topics(prefix).room_writers + room_id


class RoomWriters:
    """The transactional producers of the rooms this process writes, at most MAX_WRITERS idle ones."""

    def __init__(
        self, kafka: KafkaConfig, client_id: str, busy: Callable[[str], bool], capacity: int = MAX_WRITERS
    ) -> None:
        self._kafka = kafka
        self._client_id = client_id
        # Whether a change of the room is under way (its producer is not closed while it is).
        self._busy = busy
        self._capacity = capacity
        self._producers: OrderedDict[str, AIOKafkaProducer] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._producers)

    async def claim(self, room_id: str, deadline: float) -> bool:
        """Makes sure this process holds a producer for the room; True if it was just made.

        A producer just made has fenced every other writer of the room: the caller must then read the
        room-state topic to its end before building a change (RoomStore.caught_up).
        """
        if room_id in self._producers:
            self._producers.move_to_end(room_id)
            return False
        made = producer(
            self._kafka,
            client_id=self._client_id,
            transactional_id=transactional_id(self._kafka.topic_prefix, room_id),
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
        )
        try:
            await asyncio.wait_for(made.start(), max(0.0, deadline - time.monotonic()))
        except BaseException as exc:
            self._close(made)
            if isinstance(exc, KafkaError | TimeoutError):
                raise Unavailable(
                    f"Kafka did not register a writer for room {room_id} in time: retry"
                ) from exc
            raise
        self._producers[room_id] = made
        self._evict()
        return True

    async def write(
        self,
        room_id: str,
        topic: str,
        key: bytes,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        deadline: float,
    ) -> RecordMetadata:
        """Writes one record in a transaction of the room's producer (claimed first) and commits it.

        ABORTED if another process has written the room since this one claimed it (this producer is
        fenced); UNAVAILABLE if Kafka did not commit in time. Either way the producer is dropped, so the
        next change of the room here claims it again.
        """
        made = self._producers[room_id]
        try:
            return await asyncio.wait_for(
                self._transact(made, topic, key, value, headers), max(0.0, deadline - time.monotonic())
            )
        except BaseException as exc:
            self.drop(room_id)
            if _fenced(exc):
                ROOM_WRITES_FENCED.inc()
                log.warning("room write fenced: another process wrote the room since", room=room_id)
                raise Aborted(
                    f"room {room_id} was changed by another admission process, which owns it now; this "
                    "change was not made: retry it (it goes to the room's owner)"
                ) from exc
            if isinstance(exc, KafkaError | TimeoutError | AssertionError):
                # AssertionError: aiokafka's transaction state machine after a failed request.
                raise Unavailable(
                    "Kafka did not acknowledge the change in time; retrying it is safe"
                ) from exc
            raise

    @staticmethod
    async def _transact(
        made: AIOKafkaProducer, topic: str, key: bytes, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> RecordMetadata:
        await made.begin_transaction()
        # Waiting for the record before committing raises a fence as ProducerFenced from the send.
        written = await (await made.send(topic, value, key=key, headers=headers))
        await made.commit_transaction()
        return written

    def drop(self, room_id: str) -> None:
        """Closes the room's producer (in the background), if this process holds one."""
        made = self._producers.pop(room_id, None)
        if made is not None:
            self._close(made)

    def keep_owned(self, owns: Callable[[str], bool]) -> int:
        """Closes the producers of rooms this process no longer owns (the members changed); returns how
        many. Another process will claim those rooms, fencing them; should a room come back here, its
        next change claims it again instead of being refused ABORTED first."""
        gone = [room_id for room_id in self._producers if not owns(room_id) and not self._busy(room_id)]
        for room_id in gone:
            self.drop(room_id)
        return len(gone)

    def _evict(self) -> None:
        for room_id in list(self._producers):
            if len(self._producers) <= self._capacity:
                return
            if not self._busy(room_id):
                self.drop(room_id)

    def _close(self, made: AIOKafkaProducer) -> None:
        task = asyncio.get_running_loop().create_task(_stop(made), name="room-writer-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Closes every producer."""
        for room_id in list(self._producers):
            self.drop(room_id)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=10)


async def _stop(made: AIOKafkaProducer) -> None:
    with contextlib.suppress(Exception):
        await made.stop()


def _fenced(exc: BaseException | None) -> bool:
    """Whether the broker refused the producer because a newer one of its transactional.id exists."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ProducerFenced):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
