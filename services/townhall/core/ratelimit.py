"""Token buckets, one per key (a user id, a client address), in bounded memory. Pure: the clock is given.

Each bucket is kept as one float, its "theoretical arrival time" (the GCRA form of a token bucket):
a call costs 1/rate seconds of it, and a call is allowed while the bucket is no more than `burst`
calls ahead of the clock. Keys live in two generations: a key not seen for a whole period (at least
the time a bucket takes to fill up again) is in neither, which is exactly a full bucket, so idle keys
cost nothing and are never swept one by one. Past `max_keys` within one period the least recently
seen keys are forgotten early, which only lets them start again with a full bucket.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class Buckets:
    """Token buckets of one rate and burst, keyed by anything hashable."""

    def __init__(
        self, rate: float, burst: float, max_keys: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 2:
            raise ValueError("rate must be positive, burst at least 1 and max_keys at least 2")
        self.rate = rate
        self.burst = burst
        self._interval = 1.0 / rate
        self._tolerance = burst * self._interval
        # A key unseen for a period is full again; at least a second, so generations do not churn.
        self._period = max(self._tolerance, 1.0)
        self._half = max_keys // 2
        self._clock = clock
        self._new: dict[Hashable, float] = {}
        self._old: dict[Hashable, float] = {}
        self._rotate_at = clock() + self._period

    def __len__(self) -> int:
        return len(self._new) + len(self._old)

    def take(self, key: Hashable) -> float:
        """0.0 if `key` may make a call now (and counts it); else the seconds until it may."""
        now = self._clock()
        if now >= self._rotate_at or len(self._new) >= self._half:
            self._rotate(now)
        tat = self._new.get(key)
        if tat is None:
            tat = self._old.pop(key, now)
        if tat < now:
            tat = now
        tat += self._interval
        wait = tat - now - self._tolerance
        if wait > 1e-9:
            self._new[key] = tat - self._interval  # a refused call costs nothing
            return wait
        self._new[key] = tat
        return 0.0

    def wait(self, key: Hashable) -> float:
        """What `take` would answer for `key` now, without counting a call."""
        tat = self._new.get(key)
        if tat is None:
            tat = self._old.get(key)
            if tat is None:
                return 0.0  # not seen for a period: a full bucket
        now = self._clock()
        wait = max(tat, now) + self._interval - now - self._tolerance
        return wait if wait > 1e-9 else 0.0

    def refund(self, key: Hashable) -> None:
        """Gives back the call `take` just counted for `key` (it turned out not to count)."""
        tat = self._new.get(key)
        if tat is not None:
            self._new[key] = tat - self._interval

    def _rotate(self, now: float) -> None:
        self._old, self._new = self._new, {}
        self._rotate_at = now + self._period
