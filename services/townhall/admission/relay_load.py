"""Follows the compacted relay-load topic into the placer, so joins are placed on fresh relay loads.

A report steers every admission process (where listeners go, which relay is a room's origin, who of a
room's hosts is connected, which relays there are: admission/relays.py), so it takes effect only if a relay
signed it for its own address and it is stamped within the reader's clock: a report from the future would
outrank every genuine one for good, and one older than the placer's staleness describes a relay that has
gone quiet. A tombstone (a relay's goodbye on a clean shutdown) counts only if that relay signed it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from townhall.admission.placement import Load, Placer
from townhall.core import logging, validation
from townhall.core.config import AuthConfig, KafkaConfig
from townhall.core.kafka import KAFKA_ERRORS, Follower, Topics, read_to_end, reader
from townhall.core.provenance import Writer
from townhall.core.records import FORGED, INVALID, STALE, BadRecord, Record
from townhall.core.tasks import cancel, supervise
from townhall.internal.v1.events_pb2 import RelayLoad

log = logging.get(__name__)

# Rooms one report may list (a relay carries at most its listener capacity, a few thousand).
MAX_ROOMS = 100_000
MAX_LEADS = 1 + validation.MAX_COHOSTS


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
        frozenset(report.lost),
    )


class ReportCheck:
    """Parses and checks one relay-load record (pure, with a clock): BadRecord if it must not steer."""

    def __init__(self, max_age_s: float, skew_s: float, clock: Callable[[], float] = time.time) -> None:
        self._max_age_s = max_age_s
        self._skew_s = skew_s
        self._clock = clock

    def __call__(self, record: Record, writer: Writer | None) -> RelayLoad:
        report = RelayLoad.FromString(record.value or b"")
        validation.address(report.relay, "relay")
        if report.internal:
            validation.address(report.internal, "internal")
        if record.key != report.relay.encode():
            raise BadRecord(INVALID, f"the record's key is not the reporting relay ({report.relay})")
        if writer is not None and writer.member != report.relay:
            raise BadRecord(FORGED, f"relay {writer.member} may not report for relay {report.relay}")
        age_s = self._clock() - report.at_ms / 1000
        if age_s > self._max_age_s or -age_s > self._skew_s:
            raise BadRecord(
                STALE,
                f"relay {report.relay}'s report is stamped {age_s:+.1f} s from now "
                f"(within {-self._skew_s:g}..{self._max_age_s:g} s takes effect)",
            )
        for name, rooms in (("rooms", report.rooms), ("origins", report.origins), ("leads", report.leads)):
            if len(rooms) > MAX_ROOMS:
                raise BadRecord(INVALID, f"{name} lists {len(rooms)} rooms; at most {MAX_ROOMS}")
            for room_id in rooms:
                validation.room_id(room_id, name)
        if len(report.lost) > validation.MAX_LOST_ROOMS:
            raise BadRecord(
                INVALID, f"lost lists {len(report.lost)} rooms; at most {validation.MAX_LOST_ROOMS}"
            )
        for room_id in report.lost:
            validation.room_id(room_id, "lost")
        for room_id, leads in report.leads.items():
            validation.user_ids(leads.user_ids, f"leads[{room_id}]", MAX_LEADS)
        return report


def goodbye(record: Record, writer: Writer | None) -> str:
    """The relay a tombstone says goodbye for: its key, signed by that relay."""
    relay = validation.address((record.key or b"").decode("utf-8", "replace"), "key")
    if writer is not None and writer.member != relay:
        raise BadRecord(FORGED, f"relay {writer.member} may not say goodbye for relay {relay}")
    return relay


class RelayLoadFollower:
    """Reads every relay's latest report (from the beginning, no consumer group) and keeps following.

    A relay's goodbye (a tombstone for its key) is handed to `on_gone`.
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        auth: AuthConfig,
        placer: Placer,
        on_report: Callable[[RelayLoad], None] | None = None,
        on_gone: Callable[[str], None] | None = None,
    ) -> None:
        self._kafka = kafka
        self._topic = Topics(kafka.topic_prefix).relay_load
        self._reader = reader(kafka, auth, self._topic)
        self._check = ReportCheck(placer.stale_s, kafka.max_clock_skew_s)
        self._placer = placer
        # Also given every report: relay discovery, and host failover (who of each room's hosts is connected).
        self._on_report = on_report
        self._on_gone = on_gone
        self._task: asyncio.Task[None] | None = None
        self._follower: Follower | None = None
        self._read = asyncio.Event()  # set once the topic was read to its end

    def start(self) -> None:
        """Starts following in the background; until reports arrive, placement is by rendezvous alone."""
        self._task = supervise(self._run(), "relay-load-reader")

    async def wait_read(self, timeout_s: float) -> bool:
        """Waits until every relay that reported is known (the topic read to its end); False on timeout."""
        try:
            await asyncio.wait_for(self._read.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stops following."""
        await cancel(self._task)
        if self._follower is not None:
            await self._follower.close()

    def _record(self, record: Record) -> None:
        if record.value is None:
            relay = self._reader.deleted(record, goodbye)
            if relay is not None and self._on_gone is not None:
                self._on_gone(relay)
            return
        report = self._reader.read(record, self._check)
        if report is None:
            return
        self._placer.observe(to_load(report))
        if self._on_report is not None:
            self._on_report(report)

    async def _run(self) -> None:
        while True:
            try:
                ends = await read_to_end(self._kafka, self._topic, self._record)
                self._read.set()
                follower = Follower(self._kafka, ends, self._record, "relay-load-follower")
                await follower.start()
                self._follower = follower
                return
            except KAFKA_ERRORS as exc:  # Kafka not there yet: placement goes on by rendezvous alone
                log.warning("relay load reports unavailable", topic=self._topic, error=repr(exc))
            await asyncio.sleep(2.0)
