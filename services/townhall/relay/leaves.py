"""Leaves on a relay: a listener who gave its seat back (Admission.Leave) loses its older tickets here.

Admission records a listener's Leave on the presence topic, addressed to the relays its tickets were for,
with the time it left; this relay follows the topic from its end (from when it starts serving) and hands
each leave addressed to it to the Guard, which ends the listener's streams opened with older tickets and
refuses those tickets from then on. No call per join or per chunk: only leaves are looked at.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import ConsumerRecord
from google.protobuf.message import DecodeError

from townhall.core import logging
from townhall.core.config import KafkaConfig
from townhall.core.kafka import Topics, end_offsets, follow
from townhall.core.tasks import cancel
from townhall.relay import metrics
from townhall.relay.guard import Guard
from townhall.v1.events_pb2 import PresenceEvent

log = logging.get(__name__)

# A leave stamped further ahead of this relay's clock counts as made now (a clock that is wrong, or a
# record that is, must not void a user's tickets for the future).
MAX_AHEAD_MS = 60_000


class LeaveFollower:
    """Feeds the Guard the leaves addressed to this relay (or to every relay)."""

    def __init__(self, kafka: KafkaConfig, guard: Guard, relay: str) -> None:
        self._kafka = kafka
        self._topic = Topics(kafka.topic_prefix).presence
        self._guard = guard
        self._relay = relay
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Follows the presence topic from its current end."""
        positions = await end_offsets(self._kafka, self._topic)
        self._task = asyncio.create_task(follow(self._kafka, positions, self._record), name="leaves")

    async def close(self) -> None:
        """Stops following."""
        await cancel(self._task)

    def _record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if not record.value:
            return
        try:
            event = PresenceEvent.FromString(record.value)
        except DecodeError as exc:
            log.warning("bad presence record", topic=self._topic, error=str(exc))
            return
        if (
            event.kind != PresenceEvent.KIND_LEAVE
            or not event.left_at_ms
            or event.relay not in ("", self._relay)
        ):
            return
        if len(event.left_at_ms) != len(event.user_ids):
            log.warning("bad presence record", topic=self._topic, error="left_at_ms does not match user_ids")
            return
        now_ms = time.time_ns() // 1_000_000
        latest = now_ms + MAX_AHEAD_MS
        leaves = [
            (user, min(at_ms, latest)) for user, at_ms in zip(event.user_ids, event.left_at_ms, strict=True)
        ]
        cut = self._guard.left(event.room_id, leaves, now_ms)
        metrics.LEAVES.set(self._guard.leaves)
        for watch, reason in cut:
            metrics.STREAMS_REVOKED.labels(reason).inc()
            log.info(
                "stream revoked", room=watch.room_id, user=watch.user_id, stream=watch.kind, reason=reason
            )
