"""Capacity leases, pure: the owner's book of admits handed out, and a member's local allowance.

A room's listener limit is split into admits that members lease from the room's owner in
batches. A member admits from its allowance with no call; the sum of all allowances never
exceeds the limit, so the limit holds across processes. After an owner change (the owner died or
left, or the owner started) the new owner rebuilds the book from the members' reports: every member
reports its holding as soon as it sees the change, and the new owner grants nothing more until every
live member has reported, however long that takes (a member that goes down meanwhile is not waited
for). A time limit would hand out again the admits of a member whose report is merely late (a busy
machine), passing the limit. Members keep admitting from what they hold meanwhile, so joins go on;
only new leases wait. See docs/faults.md (Capacity) for what the limit holds across.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

# A member that has not reported a holding for this long is taken to be gone.
HOLDING_TTL_S = 20.0
# Seconds of joins a lease should cover: the owner then sees ~1/REFILL_HORIZON_S asks/s per room and member
# (in fewer calls: a call carries every room of its owner that runs low, capacity.Capacity._companions).
REFILL_HORIZON_S = 0.5
DEMAND_TAU_S = 2.0


@dataclass
class _Holding:
    admits: int
    seen: float
    # Whether the holder was a live member when it last reported (the crowd lane leases, but is none).
    member: bool = False


@dataclass
class RoomLeases:
    """One room's admits, by member, and how fast members ask for more."""

    holdings: dict[str, _Holding] = field(default_factory=dict)
    # Admits asked for, exponentially decayed with DEMAND_TAU_S: about the room's join attempts/s
    # over every member, since each member asks for REFILL_HORIZON_S of its own join rate at a time.
    demand: float = 0.0
    demand_at: float = 0.0
    # Taken over from another owner: live members yet to report their holdings.
    awaiting: set[str] = field(default_factory=set)

    def leased(self) -> int:
        """Admits held by all members."""
        return sum(h.admits for h in self.holdings.values())


class LeaseBook:
    """The owner's side: who holds how many admits of each room it owns."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._rooms: dict[str, RoomLeases] = {}
        self._clock = clock

    def acquire(
        self,
        room_id: str,
        member: str,
        count: int,
        held: int,
        limit: int,
        members: Collection[str] = (),
    ) -> tuple[int, int]:
        """Records `member`'s holding, grants up to `count` more within `limit`: (granted, available).

        `members` are the live members: the only ones a take-over waits for; a member that is no longer
        one has its holding dropped. A lessee that never was one (the crowd lane) keeps its holding
        until it is HOLDING_TTL_S old.
        """
        now = self._clock()
        live = set(members)
        room = self._rooms.setdefault(room_id, RoomLeases())
        for name, holding in list(room.holdings.items()):
            gone = bool(live) and holding.member and name not in live and name != member
            if gone or now - holding.seen > HOLDING_TTL_S:
                del room.holdings[name]
        holding = room.holdings.setdefault(member, _Holding(0, now))
        holding.admits, holding.seen, holding.member = held, now, member in live
        room.demand = room.demand * math.exp((room.demand_at - now) / DEMAND_TAU_S) + count / DEMAND_TAU_S
        room.demand_at = now
        room.awaiting.discard(member)
        if members:
            room.awaiting.intersection_update(members)
        if room.awaiting:
            # Still rebuilding after a take-over: a live member not yet heard from may hold admits.
            return 0, max(0, limit - room.leased())
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
        """Rebuilds the book of a room this member now owns: nothing is granted until every other live
        member has reported what it holds (a member asks the owner it sees, and a member that is not
        the owner yet grants nothing and records nothing: Capacity.grant)."""
        room = self._rooms.setdefault(room_id, RoomLeases())
        room.holdings = {}
        room.awaiting = set(members) - {me}

    def rebuilding(self, room_id: str) -> bool:
        """Whether the room's book still waits for members' reports after a take-over."""
        room = self._rooms.get(room_id)
        return room is not None and bool(room.awaiting)

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
        # The owner changed while a call was in flight: report to the new one when it ends.
        self.report_due = False
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

    def below_lease(self) -> bool:
        """Whether fewer than a lease are spare (at the lease size last worked out: no clock read), and the
        owner has not said the room is full for now: worth topping up in a call made for another room."""
        return self.held - len(self.listeners) < self._lease and self._clock() >= self.exhausted_until

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
