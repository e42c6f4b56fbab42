"""A room's bounded waiting line on one process, pure: first come, first admitted when capacity frees."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class WaitingLine:
    """Users told to wait, in arrival order; an entry lapses if its user does not come back in time."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._clock = clock
        self._entries: dict[int, tuple[int, float]] = {}  # user -> (ticket, lapses at)
        self._order: deque[tuple[int, int]] = deque()  # (ticket, user), stale entries skipped
        self._next = 1

    def __len__(self) -> int:
        self._prune()
        return len(self._entries)

    def ahead(self, user: int) -> int:
        """How many waiting users come before `user` (all of them if `user` is not waiting)."""
        self._prune()
        entry = self._entries.get(user)
        if entry is None:
            return len(self._entries)
        # Tickets are handed out in order; users who left in the middle make this an upper bound.
        return entry[0] - self._order[0][0]

    def wait(self, user: int, hold_s: float) -> int:
        """Puts (or keeps) `user` in line for `hold_s`; their 1-based position, or 0 if the line is full."""
        self._prune()
        entry = self._entries.get(user)
        if entry is None:
            if len(self._entries) >= self._capacity:
                return 0
            entry = (self._next, 0.0)
            self._order.append((self._next, user))
            self._next += 1
        self._entries[user] = (entry[0], self._clock() + hold_s)
        return entry[0] - self._order[0][0] + 1

    def remove(self, user: int) -> None:
        """Takes `user` out of line (admitted)."""
        self._entries.pop(user, None)

    def _prune(self) -> None:
        now = self._clock()
        while self._order:
            ticket, user = self._order[0]
            entry = self._entries.get(user)
            if entry is not None and entry[0] == ticket:
                if entry[1] >= now:
                    return
                del self._entries[user]
            self._order.popleft()
