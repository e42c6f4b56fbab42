"""Capacity leases, pure: the owner's book of admits handed out, and a member's local allowance.

A room's listener limit is split into admits that members lease from the room's owner in
batches. A member admits from its allowance with no call; the sum of all allowances never
exceeds the limit, so the limit holds across processes. After an owner change (the owner died or
left) the new owner rebuilds the book from the members' reports: every member reports its
holding as soon as it sees the change, and the new owner grants nothing more until every live
member has reported or HANDOVER_S has passed. Members keep admitting from what they hold
meanwhile, so joins go on; only new leases wait.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

# A member that has not reported a holding for this long is taken to be gone.
HOLDING_TTL_S = 20.0
# Seconds of joins a lease should cover: the owner then sees ~1/REFILL_HORIZON_S calls/s per room.
REFILL_HORIZON_S = 0.5
DEMAND_TAU_S = 2.0
# After taking a room over, the longest a new owner waits for members' reports before granting.
HANDOVER_S = 2.0


@dataclass
class _Holding:
    admits: int
    seen: float


@dataclass
class RoomLeases:
    """One room's admits, by member, and how fast members ask for more."""

    holdings: dict[str, _Holding] = field(default_factory=dict)
    # Admits asked for, exponentially decayed with DEMAND_TAU_S: about the room's join attempts/s
    # over every member, since each member asks for REFILL_HORIZON_S of its own join rate at a time.
    demand: float = 0.0
    demand_at: float = 0.0
    # Taken over from another owner: members yet to report, and until when to wait for them.
    awaiting: set[str] = field(default_factory=set)
    rebuild_until: float = 0.0

    def leased(self) -> int:
        """Admits held by all members."""
        return sum(h.admits for h in self.holdings.values())


class LeaseBook:
    """The owner's side: who holds how many admits of each room it owns."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._rooms: dict[str, RoomLeases] = {}
        self._clock = clock

    def acquire(
        self, room_id: str, member: str, count: int, held: int, limit: int, members: Collection[str] = ()
    ) -> tuple[int, int]:
        """Records `member`'s holding, grants up to `count` more within `limit`: (granted, available)."""
        now = self._clock()
        room = self._rooms.setdefault(room_id, RoomLeases())
        for name, holding in list(room.holdings.items()):
            gone = members and name not in members and name != member
            if gone or now - holding.seen > HOLDING_TTL_S:
                del room.holdings[name]
        holding = room.holdings.setdefault(member, _Holding(0, now))
        holding.admits, holding.seen = held, now
        room.demand = room.demand * math.exp((room.demand_at - now) / DEMAND_TAU_S) + count / DEMAND_TAU_S
        room.demand_at = now
        room.awaiting.discard(member)
        if room.awaiting and now < room.rebuild_until:
            # Still rebuilding after a take-over: a member not yet heard from may hold admits.
            return 0, max(0, limit - room.leased())
        room.awaiting.clear()
        granted = max(0, min(count, limit - room.leased()))
        holding.admits += granted
        return granted, max(0, limit - room.leased())

    def demand(self, room_id: str) -> float:
        """The room's recent join attempts per second over every member (from what they ask for)."""
        room = self._rooms.get(room_id)
        if room is None:
            return 0.0
        return room.demand * math.exp((room.demand_at - self._clock()) / DEMAND_TAU_S)

    def takeover(self, room_id: str, members: Collection[str], me: str) -> None:
        """Rebuilds the book of a room this member now owns: waits for the others' reports.

        Reports that came in before this member saw the change (members notice it at slightly
        different times) are kept and count as heard from.
        """
        now = self._clock()
        room = self._rooms.setdefault(room_id, RoomLeases())
        heard = {name for name, h in room.holdings.items() if now - h.seen <= HANDOVER_S}
        room.holdings = {name: h for name, h in room.holdings.items() if name in heard}
        room.awaiting = set(members) - {me} - heard
        room.rebuild_until = now + HANDOVER_S

    def rebuilding(self, room_id: str) -> bool:
        """Whether the room's book still waits for members' reports after a take-over."""
        room = self._rooms.get(room_id)
        return room is not None and bool(room.awaiting) and self._clock() < room.rebuild_until

    def forget(self, room_id: str) -> None:
        """Drops a room (ended, or now owned by another member)."""
        self._rooms.pop(room_id, None)

    def leased(self, room_id: str) -> int:
        """Admits of a room held by all members."""
        room = self._rooms.get(room_id)
        return room.leased() if room else 0


class Allowance:
    """A member's side for one room: admits held, listeners admitted, and when to refill."""

    def __init__(self, lease_min: int, lease_max: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.held = 0
        # Admitted listeners -> the relays their tickets were for (bits, see Admitter; -1: any relay).
        self.listeners: dict[int, int] = {}
        self.refilling = False
        # The owner said the room had nothing left: do not ask again before this time.
        self.exhausted_until = 0.0
        # Until then the owner could not grant for another reason (unreachable, just took the room
        # over): joins without a spare admit are told to wait, not that the room is full.
        self.owner_busy_until = 0.0
        self.last_report = 0.0
        self._min = lease_min
        self._max = lease_max
        self._clock = clock
        self._rate = 0.0  # join attempts/s, exponentially smoothed
        self._window_start = clock()
        self._window_admits = 0
        self._lease = lease_min  # the lease size for the current rate, kept up to date by _count

    @property
    def spare(self) -> int:
        """Admits held but not in use."""
        return self.held - len(self.listeners)

    def admit(self, user: int) -> None:
        """Seats `user` on a spare admit (decision.decide said ADMIT: one is spare, the user has none)."""
        self.listeners[user] = 0

    def demand(self) -> None:
        """Counts one join attempt: leases follow the rate users ask at, not the rate they got in."""
        self._count()

    def leave(self, user: int) -> bool:
        """Frees the user's admit for reuse here; True if the user was admitted here."""
        return self.listeners.pop(user, None) is not None

    def lease_size(self) -> int:
        """How many admits to ask for: about REFILL_HORIZON_S of joins at the recent rate."""
        self._count(0)
        return self._lease

    def wants_refill(self) -> bool:
        """Whether to ask the owner now: spare below half a lease and none in flight."""
        # Checked on every join: the cheap tests first, the clock only when a refill is due.
        if self.refilling or self.held - len(self.listeners) >= max(1, self._lease // 2):
            return False
        return self._clock() >= self.exhausted_until and self.spare < max(1, self.lease_size() // 2)

    def give_back(self) -> int:
        """Spare admits beyond two leases, returned on the next report so idle processes hoard none."""
        extra = self.spare - 2 * self.lease_size()
        if extra <= 0:
            return 0
        self.held -= extra
        return extra

    def _count(self, n: int = 1) -> None:
        self._window_admits += n
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed >= 0.25:
            self._rate = 0.5 * self._rate + 0.5 * self._window_admits / elapsed
            self._window_start, self._window_admits = now, 0
            self._lease = int(min(self._max, max(self._min, self._rate * REFILL_HORIZON_S)))
