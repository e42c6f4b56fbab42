"""The Inbox reader: every partition of the notifications topic, from the end, into the InboxDelivery."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf.message import DecodeError

from townhall.core import logging
from townhall.core.config import KafkaConfig
from townhall.core.errors import Unavailable
from townhall.core.kafka import Follower, end_offsets
from townhall.core.records import Reader, Record
from townhall.notifier.inbox import InboxDelivery
from townhall.notifier.inbox_resume import checked_stamped, cursor, partition_of
from townhall.notifier.records import batch_record, decode_batch, shard_of

log = logging.get(__name__)


class InboxReader:
    """Delivers each NotificationBatch record to the users connected to this process.

    Reads every partition of the notifications topic from its end at start, with the one Kafka follow
    loop (core/kafka.py Follower: no consumer group, made again after a Kafka error, resuming where it
    stopped).
    """

    def __init__(self, kafka: KafkaConfig, topic: str, hub: InboxDelivery, records: Reader) -> None:
        self._kafka = kafka
        self._topic = topic
        self._hub = hub
        # Delivered only if a notifier signed them and they pass batch_record's checks.
        self._records = records
        self._follower: Follower | None = None
        # The topic's partitions when this reader started (part of every cursor: notifier/inbox_resume.py).
        self._partitions = 0

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The consumer in use (for its lag), if any."""
        return self._follower.consumer if self._follower is not None else None

    async def start(self) -> int:
        """Follows the topic from its current end, so nothing produced after this returns is missed;
        returns how many partitions it reads."""
        positions = await end_offsets(self._kafka, self._topic)
        self._partitions = len(positions)
        self._follower = Follower(self._kafka, positions, self.apply, "notifier-inbox")
        await self._follower.start()
        return len(positions)

    def start_cursor(self, user: int) -> str:
        """The cursor just before the next record this reader applies on the user's partition: a stream
        connected now gets every later record live, and a resume from here reads them back."""
        if self._follower is None:
            raise Unavailable("this notifier is not reading notifications yet; reconnect")
        shard = shard_of(user)
        partition = partition_of(shard, self._partitions)
        position = self._follower.positions[TopicPartition(self._topic, partition)]
        return cursor(shard, self._partitions, partition, position - 1)

    async def close(self) -> None:
        """Stops following."""
        follower, self._follower = self._follower, None
        if follower is not None:
            await follower.close()

    def apply(self, record: Record) -> int:
        """Delivers one record's notification; returns how many users got it here."""
        if self._hub.empty:
            return 0  # nobody to deliver to, and de-duplication only tracks delivered users
        try:
            note, ids = decode_batch(record.value or b"")
        except DecodeError:  # does not parse: the Reader counts it
            self._records.read(record, batch_record)  # parses no better: skipped and counted
            return 0
        if not self._hub.present(ids):
            # Nobody here gets it, so it is not acted on here: most records of a big fan-out are for
            # users connected elsewhere, and are not worth a signature check on every notifier.
            return 0
        batch = self._records.read(
            record, lambda _r, _w: checked_stamped(record, note, ids, self._partitions)
        )
        if batch is None:
            return 0  # skipped and counted (core/records.py)
        return self._hub.deliver(*batch)
