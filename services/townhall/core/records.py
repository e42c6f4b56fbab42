"""Records read from Kafka: one policy for every consumer of the project's topics.

A consumer reads each record through a `Reader`: the writer's signature and role are checked first
(core/provenance.py), then the value is parsed and validated by the consumer's own `parse`. A record
that fails is skipped, counted in `townhall_kafka_records_skipped_total{topic, reason}` and logged (at
most once per topic and reason every LOG_EVERY_S); it never stops a consumer, and a compacted topic
that keeps it does not stop the next start either. Reasons:

- malformed: the value does not parse (garbage, truncated, a field of the wrong wire type);
- invalid: it parses but is out of range (ids, enums, sizes, a key that does not match the value);
- unsigned / forged: no writer signature, a signature that does not verify, or a writer whose role may
  not write the topic (or, for room-state, the room: admission/ownership.py);
- stale: stamped too far from the reader's clock, or a version older than the one held;
- failed: the consumer's own error while applying a record that passed the checks (a bug; counted so
  it shows, skipped so it cannot stop the consumer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from prometheus_client import Counter

from townhall.core import logging
from townhall.core.errors import InvalidArgument
from townhall.core.provenance import Forged, RecordVerifier, Unsigned, Writer

log = logging.get(__name__)

MALFORMED, INVALID, UNSIGNED, FORGED, STALE, FAILED = (
    "malformed",
    "invalid",
    "unsigned",
    "forged",
    "stale",
    "failed",
)
REASONS = (MALFORMED, INVALID, UNSIGNED, FORGED, STALE, FAILED)
RECORDS_SKIPPED = Counter(
    "townhall_kafka_records_skipped_total",
    "Kafka records a consumer skipped instead of acting on them, by topic and reason (malformed, invalid, "
    "unsigned, forged, stale, failed; see core/records.py).",
    ["topic", "reason"],
)
LOG_EVERY_S = 10.0
T = TypeVar("T")


class Record(Protocol):
    """What a consumer sees of a record (aiokafka's ConsumerRecord has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...
    @property
    def timestamp(self) -> int: ...


class BadRecord(ValueError):
    """A record that must not take effect; `reason` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_logged: dict[tuple[str, str], tuple[float, int]] = {}


def skipped(record: Record, reason: str, error: str) -> None:
    """Counts a skipped record, and logs it unless this topic and reason were logged lately."""
    RECORDS_SKIPPED.labels(record.topic, reason).inc()
    now = time.monotonic()
    last, quiet = _logged.get((record.topic, reason), (-LOG_EVERY_S, 0))
    if now - last < LOG_EVERY_S:
        _logged[(record.topic, reason)] = (last, quiet + 1)
        return
    _logged[(record.topic, reason)] = (now, 0)
    log.warning(
        "kafka record skipped",
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        reason=reason,
        error=error[:300],
        skipped_since_last_log=quiet,
    )


class Reader:
    """Reads the records of one topic under the policy above.

    `roles` are the writer roles that may write the topic. With `refuse_unsigned` false, a record
    without a signature is read with writer None (a topic written before records were signed); a bad
    signature never is.
    """

    def __init__(self, roles: frozenset[str], verifier: RecordVerifier, refuse_unsigned: bool = True) -> None:
        self._roles = roles
        self._verifier = verifier
        self._refuse_unsigned = refuse_unsigned

    def writer(self, record: Record) -> Writer | None:
        """Who wrote the record (None: unsigned, read during a migration); BadRecord if it may not take
        effect."""
        try:
            writer = self._verifier.writer(record.topic, record.key, record.value or b"", record.headers)
        except Unsigned as exc:
            if self._refuse_unsigned:
                raise BadRecord(UNSIGNED, str(exc)) from exc
            return None
        except Forged as exc:
            raise BadRecord(FORGED, str(exc)) from exc
        if writer.role not in self._roles:
            raise BadRecord(FORGED, f"a {writer.role} ({writer.member}) may not write {record.topic}")
        return writer

    def read(self, record: Record, parse: Callable[[Record, Writer | None], T]) -> T | None:
        """`parse(record, writer)` of a record that passes, or None (skipped and counted).

        A tombstone (no value) is None without a count here: see `deleted`.
        """
        if record.value is None:
            return None
        return self._checked(record, parse)

    def deleted(self, record: Record, parse: Callable[[Record, Writer | None], T]) -> T | None:
        """`parse(record, writer)` of a tombstone that passes (signed like any record: a deletion steers
        every reader), or None (skipped and counted)."""
        return self._checked(record, parse)

    def _checked(self, record: Record, parse: Callable[[Record, Writer | None], T]) -> T | None:
        try:
            return parse(record, self.writer(record))
        except BadRecord as exc:
            skipped(record, exc.reason, str(exc))
        except InvalidArgument as exc:  # core/validation.py's checks, reused on what Kafka holds
            skipped(record, INVALID, str(exc))
        except Exception as exc:  # a parser of untrusted bytes may raise anything: the record is bad
            skipped(record, MALFORMED, f"{type(exc).__name__}: {exc}")
        return None


def guarded(handle: Callable[[Record], object]) -> Callable[[Record], None]:
    """`handle` that never raises: an error applying a record is counted (failed) and the record skipped."""

    def run(record: Record) -> None:
        try:
            handle(record)
        except Exception as exc:
            skipped(record, FAILED, f"{type(exc).__name__}: {exc}")

    return run
