"""Inbox resume: what a reconnecting client missed, read back from the notifications topic.

A user's notifications are all on one partition of the notifications topic (records are keyed by the
user's shard), so the cursor of a notification is where its record is: the topic's partition count, the
partition and the offset, sealed with the shard (core/pages.py). Resuming reads that partition from the
next offset to its end and keeps the records that name the user. Nothing is stored per user: what is kept
is what the topic keeps, within two bounds (config `notifier.inbox_resume_records` records read back,
`notifier.inbox_resume_notifications` notifications answered); past either, or past the topic's retention,
the client gets a NOTIFICATION_KIND_MISSED marker first (docs/notifications.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from google.protobuf.message import DecodeError

from townhall.core import pages
from townhall.core.config import KafkaConfig
from townhall.core.errors import InvalidArgument, Unavailable
from townhall.core.kafka import consumer
from townhall.core.records import Reader, Record
from townhall.notifier.records import checked_batch, decode_batch, key_shard, shard_key, shard_of
from townhall.v1 import inbox_pb2

# Resumes reading the topic at once on one process (each holds a consumer); later ones wait their turn.
RESUMES_AT_ONCE = 4
# A resume that has not read its records by then fails with UNAVAILABLE (the client retries).
RESUME_TIMEOUT_S = 15.0
_KEY = struct.Struct(">HHq")  # partitions, partition, offset (-1: before the first record)


def _scope(shard: int) -> str:
    return f"townhall.v1.Inbox/{shard}"


def cursor(shard: int, partitions: int, partition: int, offset: int) -> str:
    """The resume cursor of the record at `offset` of `partition` (of `partitions`) for users of `shard`."""
    return pages.seal(_scope(shard), _KEY.pack(partitions, partition, offset))


def partition_of(shard: int, partitions: int) -> int:
    """The partition a shard's records are on: the producers' default partitioner (murmur2 of the key, the
    default of every Kafka client)."""
    return int(DefaultPartitioner()(shard_key(shard), list(range(partitions)), []))


def checked_stamped(
    record: Record, note: inbox_pb2.Notification, ids: np.ndarray, partitions: int
) -> tuple[inbox_pb2.Notification, np.ndarray]:
    """A decoded notifications record checked (checked_batch, its key a user shard), its notification
    given its id and its cursor (the same for every user it names); InvalidArgument if it fails a check."""
    note, ids = checked_batch(note, ids)
    note.notification_id = f"{note.kind}.{note.room_id}"
    note.cursor = cursor(key_shard(record.key), partitions, record.partition, record.offset)
    return note, ids


def position(resume_cursor: str, user: int) -> tuple[int, int, int]:
    """(partitions, partition, offset) of a cursor of the user's inbox; INVALID_ARGUMENT naming
    resume_cursor if it is not one."""
    key = pages.unseal(resume_cursor, _scope(shard_of(user)), "resume_cursor")
    if len(key) != _KEY.size:
        raise InvalidArgument(
            "resume_cursor does not name a place in an inbox: connect without it", "resume_cursor"
        )
    partitions, partition, offset = _KEY.unpack(key)
    return partitions, partition, offset


class Backlog:
    """Reads back what a user was sent after a cursor, within the bounds."""

    def __init__(self, kafka: KafkaConfig, topic: str, records: Reader, scan: int, most: int) -> None:
        self._kafka = kafka
        self._topic = topic
        self._records = records
        self._scan = scan
        self._most = most
        self._turns = asyncio.Semaphore(RESUMES_AT_ONCE)

    async def since(self, user: int, resume_cursor: str) -> list[inbox_pb2.Notification]:
        """The user's notifications after the cursor, oldest first and one per id, led by a MISSED marker
        if some are no longer kept."""
        partitions, partition, offset = position(resume_cursor, user)
        async with self._turns:
            try:
                return await asyncio.wait_for(
                    self._read(user, partitions, partition, offset), RESUME_TIMEOUT_S
                )
            except TimeoutError:
                raise Unavailable(
                    f"the missed notifications could not be read within {RESUME_TIMEOUT_S:.0f} s; "
                    "reconnect with the same resume_cursor"
                ) from None

    async def _read(
        self, user: int, partitions: int, partition: int, offset: int
    ) -> list[inbox_pb2.Notification]:
        # A record deleted by retention while it is read: go on from the oldest kept, not from the end.
        reader = consumer(
            self._kafka, enable_auto_commit=False, fetch_max_wait_ms=100, auto_offset_reset="earliest"
        )
        await reader.start()
        try:
            tp = TopicPartition(self._topic, partition)
            reader.assign([tp])
            first = (await reader.beginning_offsets([tp]))[tp]
            end = (await reader.end_offsets([tp]))[tp]
            # Known once the offsets were asked for (the consumer asks for the metadata of its topics).
            if len(reader.partitions_for_topic(self._topic) or ()) != partitions:
                # The topic was given more partitions: the user's records are on another one now.
                return [inbox_pb2.Notification(kind=inbox_pb2.NOTIFICATION_KIND_MISSED)]
            start = max(offset + 1, first, end - self._scan)
            found = await self._scan_for(reader, tp, user, partitions, start, end)
        finally:
            with contextlib.suppress(Exception):
                await reader.stop()
        missed = start > offset + 1 or len(found) > self._most
        kept = found[-self._most :]
        notes = [note for _, note in kept]
        if missed:
            # Its cursor is just before the first one kept: resuming from it gets them again, no marker.
            since = kept[0][0] - 1 if kept else end - 1
            marker = cursor(shard_of(user), partitions, partition, since)
            notes.insert(0, inbox_pb2.Notification(kind=inbox_pb2.NOTIFICATION_KIND_MISSED, cursor=marker))
        return notes

    async def _scan_for(
        self, reader: AIOKafkaConsumer, tp: TopicPartition, user: int, partitions: int, start: int, end: int
    ) -> list[tuple[int, inbox_pb2.Notification]]:
        """(offset, notification) naming `user` in records start..end-1, oldest first; the first of an id."""
        found: dict[str, tuple[int, inbox_pb2.Notification]] = {}
        if start >= end:
            return []
        reader.seek(tp, start)
        key, wanted = shard_key(shard_of(user)), np.uint64(user)
        while True:
            batch = await reader.getmany(tp, timeout_ms=1_000)
            for record in batch.get(tp, ()):
                if record.offset >= end:
                    return list(found.values())
                if record.key == key:
                    note = self._naming(record, wanted, partitions)
                    if note is not None:
                        found.setdefault(note.notification_id, (record.offset, note))
                if record.offset + 1 >= end:
                    return list(found.values())

    def _naming(self, record: Record, user: np.uint64, partitions: int) -> inbox_pb2.Notification | None:
        try:
            note, ids = decode_batch(record.value or b"")
        except DecodeError:
            return None  # the live reader counted it
        if not (ids == user).any():
            return None
        batch = self._records.read(
            record, lambda _record, _writer: checked_stamped(record, note, ids, partitions)
        )
        return None if batch is None else batch[0]
