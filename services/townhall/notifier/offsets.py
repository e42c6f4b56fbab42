"""At-least-once bookkeeping: which consumed offsets are finished, and what is safe to commit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from townhall.core.kafka import KAFKA_ERRORS


class OffsetBook:
    """Offsets begun and finished per partition, finished out of order.

    The commit point of a partition is its oldest unfinished offset (or one past the newest
    begun once all are finished), so a crash replays everything not yet acknowledged.
    """

    def __init__(self) -> None:
        self._pending: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def begin(self, tp: TopicPartition, offset: int) -> None:
        """An offset was handed to the work (again, after a rewind, is fine)."""
        self._pending.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        """The work for an offset is acknowledged."""
        self._pending.get(tp, set()).discard(offset)

    def oldest_unfinished(self, tp: TopicPartition) -> int | None:
        """Where to rewind `tp` to after a failure, or None if nothing is pending."""
        pending = self._pending.get(tp)
        return min(pending) if pending else None

    def busy(self) -> int:
        """Offsets begun and not finished."""
        return sum(len(p) for p in self._pending.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Commit points that moved since the last call (marked as committed)."""
        out: dict[TopicPartition, int] = {}
        for tp, nxt in self._next.items():
            pending = self._pending.get(tp)
            point = min(pending) if pending else nxt
            if point > self._committed.get(tp, -1):
                out[tp] = point
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Records that `offsets` were committed."""
        self._committed.update(offsets)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drops partitions this member no longer owns (their new owner resumes from the commit)."""
        for tp in partitions:
            self._pending.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)


async def rewind(
    book: OffsetBook,
    failed: set[TopicPartition],
    consumer_of: Callable[[TopicPartition], AIOKafkaConsumer],
    in_flight: Iterable[asyncio.Task[None]],
    backoff_s: float,
) -> None:
    """After failed work: lets the work in flight end, moves each failed partition still assigned back to
    its oldest unfinished offset (fetched again from there, with what follows it), then pauses."""
    pending = list(in_flight)
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for tp in failed:
        consumer = consumer_of(tp)
        offset = book.oldest_unfinished(tp)
        if offset is None or tp not in consumer.assignment():
            continue
        with contextlib.suppress(*KAFKA_ERRORS):
            consumer.seek(tp, offset)
    await asyncio.sleep(backoff_s)
