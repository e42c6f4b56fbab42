"""Follows the compacted relay-load topic into the placer, so joins are placed on fresh relay loads."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from townhall.admission.placement import Load, Placer
from townhall.core import logging
from townhall.core.config import KafkaConfig
from townhall.core.kafka import Topics
from townhall.core.tasks import cancel
from townhall.v1.events_pb2 import RelayLoad

log = logging.get(__name__)


def to_load(value: bytes | RelayLoad) -> Load:
    """A RelayLoad record as the placer's Load (times in Unix seconds)."""
    report = value if isinstance(value, RelayLoad) else RelayLoad.FromString(value)
    return Load(
        report.relay,
        report.listeners,
        report.capacity,
        report.at_ms / 1000,
        dict(report.rooms),
        frozenset(report.origins),
    )


class RelayLoadFollower:
    """Reads every relay's latest report (from the beginning, no consumer group) and keeps following."""

    def __init__(
        self, kafka: KafkaConfig, placer: Placer, on_report: Callable[[RelayLoad], None] | None = None
    ) -> None:
        self._kafka = kafka
        self._topic = Topics(kafka.topic_prefix).relay_load
        self._placer = placer
        # Also given every report (host failover reads who of each room's hosts is connected).
        self._on_report = on_report
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts following in the background; until reports arrive, placement is by rendezvous alone."""
        self._task = asyncio.create_task(self._run(), name="relay-load-follower")

    async def close(self) -> None:
        """Stops following."""
        await cancel(self._task)

    async def _run(self) -> None:
        while True:
            consumer = AIOKafkaConsumer(
                self._topic,
                bootstrap_servers=self._kafka.bootstrap,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                metadata_max_age_ms=5_000,
            )
            try:
                await consumer.start()
                async for record in consumer:
                    if record.value is None:
                        continue
                    try:
                        report = RelayLoad.FromString(record.value)
                        self._placer.observe(to_load(report))
                        if self._on_report is not None:
                            self._on_report(report)
                    except ValueError as exc:  # DecodeError is a ValueError: skip a bad record
                        log.warning("bad relay load report", topic=self._topic, error=str(exc))
            except KafkaError as exc:
                log.warning("relay load reports unavailable", topic=self._topic, error=str(exc))
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()
            await asyncio.sleep(2.0)
