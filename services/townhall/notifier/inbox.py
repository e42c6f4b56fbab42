"""Inbox delivery: who is connected here, their bounded queues, and de-duplication.

A user holds at most `streams_per_user` Inbox streams on a process (their devices); one more ends the
oldest with FAILED_PRECONDITION, so an app that reconnects before its old stream is seen dead gets in,
and one token cannot hold unlimited streams.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Iterable

import numpy as np

from townhall.core.errors import FailedPrecondition, Reason, TownhallError
from townhall.notifier.metrics import (
    DUPLICATES_DROPPED,
    INBOX_CONNECTIONS,
    INBOX_DROPPED,
    INBOX_REPLACED,
    NOTIFICATIONS,
)
from townhall.v1 import inbox_pb2

SUBSCRIBER_QUEUE = 256
DEDUP_KEYS = 10_000
STREAMS_PER_USER = 4


class InboxStream:
    """One Inbox stream: a bounded queue whose oldest notification is dropped when full."""

    def __init__(self, user: int, capacity: int = SUBSCRIBER_QUEUE) -> None:
        self.user = user
        self.dropped = 0
        self._capacity = capacity
        self._queue: deque[inbox_pb2.Notification] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        # Why the stream ends with an error rather than OK (set by `close`).
        self.error: TownhallError | None = None

    def put(self, notification: inbox_pb2.Notification) -> None:
        """Queues a notification, dropping (and counting) the oldest if the queue is full."""
        if len(self._queue) >= self._capacity:
            self._queue.popleft()
            self.dropped += 1
            INBOX_DROPPED.inc()
        self._queue.append(notification)
        self._wake.set()

    def close(self, error: TownhallError | None = None) -> None:
        """Ends the stream once what is queued has been taken (with `error`, if given)."""
        self._closed = True
        self.error = error
        self._wake.set()

    async def get(self) -> inbox_pb2.Notification | None:
        """The next notification, or None once closed and empty."""
        while not self._queue:
            if self._closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        return self._queue.popleft()


class Deduper:
    """Remembers which users got each (room_id, kind), for the most recent `max_keys` keys (LRU)."""

    def __init__(self, max_keys: int = DEDUP_KEYS) -> None:
        self._max_keys = max_keys
        self._seen: OrderedDict[tuple[str, int], set[int]] = OrderedDict()

    def fresh(self, room_id: str, kind: int, users: Iterable[int]) -> list[int]:
        """The users that have not had this (room_id, kind) yet; they are remembered as having it."""
        key = (room_id, kind)
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = set()
            if len(self._seen) > self._max_keys:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(key)
        new = [u for u in users if u not in seen]
        seen.update(new)
        return new


class InboxDelivery:
    """The Inbox streams connected to this process, by user, and delivery to them."""

    def __init__(
        self,
        queue: int = SUBSCRIBER_QUEUE,
        dedup_keys: int = DEDUP_KEYS,
        streams_per_user: int = STREAMS_PER_USER,
    ) -> None:
        self._queue = queue
        # Per user, the open streams, oldest first.
        self._subs: dict[int, list[InboxStream]] = {}
        self._dedup = Deduper(dedup_keys)
        self._per_user = streams_per_user
        self.closed = False

    def connect(self, user: int) -> InboxStream:
        """A new stream for `user`; ends the user's oldest if they hold `streams_per_user` already."""
        sub = InboxStream(user, self._queue)
        subs = self._subs.setdefault(user, [])
        while len(subs) >= self._per_user:
            old = subs.pop(0)
            old.close(
                FailedPrecondition(
                    f"user {user} opened a newer Inbox stream (at most {self._per_user} per user): "
                    "this one is closed",
                    reason=Reason.STREAM_REPLACED,
                )
            )
            INBOX_REPLACED.inc()
            INBOX_CONNECTIONS.dec()
        subs.append(sub)
        INBOX_CONNECTIONS.inc()
        return sub

    def disconnect(self, sub: InboxStream) -> None:
        """Forgets a stream that ended."""
        subs = self._subs.get(sub.user)
        if subs is None or sub not in subs:
            return
        subs.remove(sub)
        if not subs:
            del self._subs[sub.user]
        INBOX_CONNECTIONS.dec()

    @property
    def streams(self) -> int:
        """Inbox streams open here."""
        return sum(len(subs) for subs in self._subs.values())

    @property
    def empty(self) -> bool:
        """No stream is connected here."""
        return not self._subs

    def present(self, ids: np.ndarray) -> list[int]:
        """Which of the uint64 `ids` have a stream here."""
        if not self._subs or not len(ids):
            return []
        if 8 * len(self._subs) < len(ids):
            # Few users here, a big batch: look ours up in the batch without a Python int per id.
            here = np.fromiter(self._subs, dtype=np.uint64, count=len(self._subs))
            return [int(u) for u in here[np.isin(here, ids)]]
        return list(self._subs.keys() & set(ids.tolist()))

    def deliver(self, notification: inbox_pb2.Notification, ids: np.ndarray) -> int:
        """Queues `notification` for the connected users among `ids` not yet given it; returns how many."""
        present = self.present(ids)
        if not present:
            return 0
        fresh = self._dedup.fresh(notification.room_id, notification.kind, present)
        if len(fresh) < len(present):
            DUPLICATES_DROPPED.inc(len(present) - len(fresh))
        for user in fresh:
            for sub in self._subs[user]:
                sub.put(notification)
        if fresh:
            NOTIFICATIONS.labels("inbox").inc(len(fresh))
        return len(fresh)

    def close(self) -> None:
        """Ends every stream (drain); later connections are refused by the servicer."""
        self.closed = True
        for subs in self._subs.values():
            for sub in subs:
                sub.close()
