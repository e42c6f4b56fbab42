"""The relay's load report: listeners per room, every few seconds, to the compacted relay-load topic, and
at once when a room's upstream is lost (admission then places the room's listeners elsewhere)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence

from aiokafka.errors import KafkaError

from townhall.core import logging
from townhall.core.config import Config
from townhall.core.kafka import Topics, producer
from townhall.core.provenance import RELAY, RecordSigner, Writer
from townhall.core.tasks import cancel, supervise
from townhall.internal.v1.events_pb2 import Leads, RelayLoad
from townhall.relay.hub import RelayRooms

log = logging.get(__name__)

# A clean shutdown's goodbye (a tombstone for this relay's key) is best effort, and never holds it up longer.
GOODBYE_S = 3.0
# How long listeners of a room whose upstream was lost wait, at most, for the report naming the room to
# reach Kafka before they are sent to join again (Kafka away: they go after this, and may come back here).
ANNOUNCE_S = 0.5


class LoadReporter:
    """Publishes this relay's RelayLoad; Kafka being away delays reports but never the audio."""

    def __init__(
        self, config: Config, hub: RelayRooms, leads: Callable[[], Mapping[str, Sequence[int]]] | None = None
    ) -> None:
        self._hub = hub
        # Per room, the host and co-hosts connected here (the owner's host failover reads them).
        self._leads = leads
        self._relay = config.relay.address
        self._internal = config.relay.internal_address
        self._capacity = config.relay.listener_capacity
        self._every_s = config.relay.load_report_s
        self._topic = Topics(config.kafka.topic_prefix).relay_load
        self._kafka = config.kafka
        self._signer = RecordSigner(config.auth, Writer(RELAY, self._relay))
        self._task: asyncio.Task[None] | None = None
        self._reported = False  # a report reached Kafka: admission may know this relay
        self._wake = asyncio.Event()  # a report is wanted now (a room's upstream was lost)
        self._written = asyncio.Event()  # set when the next report made from now reaches Kafka

    def report(self) -> RelayLoad:
        """What the relay carries now."""
        rooms = self._hub.load()
        leads = self._leads() if self._leads is not None else {}
        return RelayLoad(
            relay=self._relay,
            internal=self._internal,
            listeners=sum(rooms.values()),
            capacity=self._capacity,
            at_ms=time.time_ns() // 1_000_000,
            rooms=rooms,
            origins=self._hub.origins(),
            lost=self._hub.lost(),
            leads={room: Leads(user_ids=users) for room, users in leads.items()},
        )

    async def announce(self) -> None:
        """Reports at once (a room's upstream was just lost) and waits until Kafka has that report, at most
        ANNOUNCE_S; returns at once when the relay does not report."""
        if self._task is None:
            return
        written = self._written
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(written.wait(), ANNOUNCE_S)

    def start(self) -> None:
        """Starts reporting in the background (no-op when load_report_s is 0)."""
        if self._every_s > 0:
            self._task = supervise(self._run(), "relay-load-report")

    async def close(self) -> None:
        """Stops reporting, then says goodbye: a tombstone for this relay, so admission forgets it at once
        (and compaction drops the relay from the topic) instead of after it has gone quiet."""
        if self._task is None:
            return
        await cancel(self._task)
        self._task = None
        if not self._reported:
            return  # never reported: no one knows this relay, and Kafka is likely away
        key = self._relay.encode()
        goodbye = producer(self._kafka, f"relay-{self._relay}", acks=1)
        try:
            async with asyncio.timeout(GOODBYE_S):
                await goodbye.start()
                # Signed like a report: only this relay can make admission forget it.
                headers = self._signer.headers(self._topic, key, b"")
                await goodbye.send_and_wait(self._topic, None, key=key, headers=headers)
        except (KafkaError, TimeoutError) as exc:
            log.warning(
                "relay goodbye not written: admission forgets the relay once it is quiet", error=str(exc)
            )
        finally:
            with contextlib.suppress(Exception):
                await goodbye.stop()

    async def _run(self) -> None:
        key = self._relay.encode()
        while True:
            # Not acks=all: a lost report is replaced by the next one a few seconds later.
            reports = producer(self._kafka, f"relay-{self._relay}", acks=1, linger_ms=0)
            try:
                await reports.start()
                while True:
                    self._wake.clear()
                    # Whoever waits for a report made from now on waits for this one.
                    written, self._written = self._written, asyncio.Event()
                    value = self.report().SerializeToString()
                    headers = self._signer.headers(self._topic, key, value)
                    await reports.send_and_wait(self._topic, value, key=key, headers=headers)
                    self._reported = True
                    written.set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._every_s)
            except KafkaError as exc:
                log.warning("relay load report failed", topic=self._topic, error=str(exc))
            finally:
                with contextlib.suppress(Exception):
                    await reports.stop()
            await asyncio.sleep(max(self._every_s, 1.0))
