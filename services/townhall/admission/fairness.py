"""A process-wide admit budget shared fairly between rooms, pure: a hot room cannot starve cold ones.

One token bucket refills at `rate` admits/s. Each room's recent admits are a decaying count
(time constant TAU_S). A room below its fair share (the budget over the active rooms, plus one
for a newcomer) may take any token; a room at or over it only tokens above a reserve. A hot room
therefore drains the bucket down to the reserve and no further, and the reserve, refilled at the
full rate, is what cold rooms admit from. A hot room alone still gets the whole rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

TAU_S = 1.0
RESERVE_S = 0.1  # the reserve: this many seconds of the budget
PRUNE_EVERY_S = 1.0


class FairBudget:
    """Admits per second for the whole process, split fairly between active rooms."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._clock = clock
        self._reserve = rate * RESERVE_S
        self._burst = max(1.0, 2 * self._reserve)
        self._tokens = self._burst
        self._last = self._pruned = clock()
        self._rooms: dict[str, tuple[float, float]] = {}  # room -> (updated at, decayed admits)

    def take(self, room_id: str) -> bool:
        """Takes one admit for the room, or False when the room is past its fair share."""
        if self._rate <= 0:
            return True
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if now - self._pruned >= PRUNE_EVERY_S:
            self._prune(now)
        at, score = self._rooms.get(room_id, (now, 0.0))
        score *= math.exp((at - now) / TAU_S)
        fair = self._rate * TAU_S / (len(self._rooms) + 1)
        floor = self._reserve if score >= fair else 0.0
        if self._tokens - 1 < floor:
            self._rooms[room_id] = (now, score)
            return False
        self._tokens -= 1
        self._rooms[room_id] = (now, score + 1)
        return True

    def _prune(self, now: float) -> None:
        self._pruned = now
        for room_id, (at, score) in list(self._rooms.items()):
            if score * math.exp((at - now) / TAU_S) < 0.5:
                del self._rooms[room_id]
