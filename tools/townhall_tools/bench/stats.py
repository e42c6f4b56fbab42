"""Pure statistics for benchmarks: a mergeable latency histogram, counts per second, percentiles, gaps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


class LatencyHistogram:
    """Latencies counted in fixed-width buckets, so many processes' samples merge exactly.

    Percentiles are exact to one bucket (0.1 ms by default); latencies past the last bucket
    are counted in it, so the top percentile reads as "at least" that.
    """

    def __init__(self, resolution_us: int = 100, max_us: int = 10_000_000) -> None:
        self.resolution_us = resolution_us
        self._last = max_us // resolution_us
        self.counts: dict[int, int] = {}
        self.count = 0

    def add_us(self, latency_us: int) -> None:
        """Counts one latency (negative values, from clock noise, count as zero)."""
        bucket = latency_us // self.resolution_us
        if bucket < 0:
            bucket = 0
        elif bucket > self._last:
            bucket = self._last
        counts = self.counts
        counts[bucket] = counts.get(bucket, 0) + 1
        self.count += 1

    def merge(self, counts: Mapping[int, int]) -> None:
        """Adds another histogram's bucket counts (same resolution)."""
        for bucket, n in counts.items():
            self.counts[int(bucket)] = self.counts.get(int(bucket), 0) + n
            self.count += n

    def percentile_ms(self, q: float) -> float | None:
        """The latency (ms, bucket upper bound) below which a fraction q of samples lie."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return (bucket + 1) * self.resolution_us / 1000
        raise AssertionError("unreachable: rank <= count")


class PerSecond:
    """Events counted by outcome in one-second slots of a window, so many processes' counts merge exactly.

    The window is `seconds` long from `start` (Unix seconds); an event outside it is not counted,
    so a series has at most ceil(seconds) slots per outcome whatever the load.
    """

    def __init__(self, start: float, seconds: float) -> None:
        self.start = start
        self.slots = max(1, math.ceil(seconds))
        self.counts: dict[str, list[int]] = {}

    def add(self, at: float, outcome: str, n: int = 1) -> None:
        """Counts `n` events with `outcome` at Unix time `at`."""
        slot = math.floor(at - self.start)
        if 0 <= slot < self.slots:
            if outcome not in self.counts:
                self.counts[outcome] = [0] * self.slots
            self.counts[outcome][slot] += n

    def merge(self, counts: Mapping[str, Sequence[int]]) -> None:
        """Adds another window's counts (same start and length; extra slots are left out)."""
        for outcome, series in counts.items():
            mine = self.counts.setdefault(outcome, [0] * self.slots)
            for slot, n in enumerate(series[: self.slots]):
                mine[slot] += n


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile of `values` (q in 0..1), or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def gap(previous: int, sequence: int) -> int:
    """Chunks missing between two consecutive sequence numbers received (0 when contiguous)."""
    if previous <= 0 or sequence <= previous:
        return 0
    return sequence - previous - 1
