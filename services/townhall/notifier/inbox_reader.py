"""The Inbox reader: every partition of the notifications topic, from the end, into the Hub."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from townhall.core import logging
from townhall.core.records import Reader, Record, guarded
from townhall.notifier.clients import describe
from townhall.notifier.inbox import Hub
from townhall.notifier.records import batch_record, checked_batch, decode_batch

log = logging.get(__name__)

RETRY_BACKOFF_S = 1.0
ASSIGN_POLL_S = 0.1


async def from_end(consumer: AIOKafkaConsumer) -> list[TopicPartition]:
    """Waits until a started group-less consumer holds every partition of its topic, then fixes
    each position at the current end, so nothing produced after this returns is missed.
    """
    # Without a group, aiokafka assigns every partition of the subscribed topic once its metadata
    # is known; right after the topic is created that can take a few metadata refreshes.
    # aiokafka has no public event for that, hence the polling.
    while True:
        partitions = sorted(consumer.assignment())
        if partitions:
            break
        await asyncio.sleep(ASSIGN_POLL_S)
    await consumer.seek_to_end(*partitions)
    for tp in partitions:
        await consumer.position(tp)  # waits for the end offset to be resolved
    return partitions


class InboxReader:
    """Delivers each NotificationBatch record to the users connected to this process."""

    def __init__(self, consumer: AIOKafkaConsumer, hub: Hub, records: Reader) -> None:
        self._consumer = consumer
        self._hub = hub
        # Delivered only if a notifier signed them and they pass batch_record's checks.
        self._records = records

    async def run(self) -> None:
        """Reads until cancelled."""
        apply = guarded(self.apply)
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=1000)
            except Exception as exc:
                log.warning("notifications fetch failed, will retry", error=describe(exc))
                await asyncio.sleep(RETRY_BACKOFF_S)
                continue
            for records in batches.values():
                for record in records:
                    apply(record)

    def apply(self, record: Record) -> int:
        """Delivers one record's notification; returns how many users got it here."""
        if self._hub.empty:
            return 0  # nobody to deliver to, and de-duplication only tracks delivered users
        try:
            note, ids = decode_batch(record.value or b"")
        except Exception:  # does not parse: the Reader counts it
            batch = self._records.read(record, batch_record)
            return 0 if batch is None else self._hub.deliver(*batch)
        if not self._hub.present(ids):
            # Nobody here gets it, so it is not acted on here: most records of a big fan-out are for
            # users connected elsewhere, and are not worth a signature check on every notifier.
            return 0
        batch = self._records.read(record, lambda _record, _writer: checked_batch(note, ids))
        if batch is None:
            return 0  # skipped and counted (core/records.py)
        return self._hub.deliver(*batch)
