"""Edge placement: which relay a user of a room is sent to, and the relay path above it (pure logic).

A room's relays are the live relays in rendezvous order for the room: the first is its origin
(speakers publish there), the next ones are its edges. A relay is live while it answers health
probes and reports its load; once a room's origin has moved (its relay failed), the relay that
reports being its origin stays first, so the room does not move back when the old one returns.
Every admission process computes the same order, so they all pack a room's listeners onto the
same edges without talking to each other: a listener goes to the first relay in that order that
carries fewer than `edge_target` of the room's listeners and is below its capacity, so a room adds
edges only as its audience grows.
The relays form a `degree`-ary tree in that order (relay i pulls from relay (i - 1) // degree):
the origin feeds at most `degree` relays, and larger rooms get mid-tier levels.
A relay whose report names the room as lost (its pull from upstream was given up: it cannot reach
the room's tree, a cut the health probes do not see) goes to the end of the room's order for listeners
while its report says so; it stays the origin if it is first (an edge whose origin died takes over).
A relay's count is its last report plus the listeners this process placed on it that the report may not
show yet: a listener connects after its Join, so a report made soon after its placement can miss it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from townhall.core.errors import Reason, Unavailable
from townhall.core.sharding import ranked

MAX_CACHED_ROOMS = 100_000
NO_RELAY = "no relay is serving: none is configured and none has been found serving yet; retry"
LIVE_EVERY_S = 0.25
# A placed listener connects to its relay after its Join (clients subscribe at once, backing off up to 1 s
# when refused): a report made this long after a placement shows that listener if it connected.
CONNECT_S = 5.0
# Placements one relay's reports may not show yet, at most (a relay takes up to its listener capacity, a
# few thousand); past it the oldest count as shown.
MAX_UNSEEN = 10_000


@dataclass(frozen=True)
class RelayPath:
    """Where a user connects, and the relays above it (origin first; empty when it is the origin)."""

    relay: str
    upstream: tuple[str, ...]


@dataclass(frozen=True)
class Load:
    """A relay's last load report."""

    relay: str
    listeners: int
    capacity: int
    at: float  # when it was made, seconds on the placer's clock
    rooms: Mapping[str, int] = field(default_factory=dict)
    origins: frozenset[str] = frozenset()  # rooms the relay is the origin of (speakers publish there)
    lost: frozenset[str] = frozenset()  # rooms whose upstream the relay lost recently


class Unseen:
    """Listeners this process placed on one relay that the relay's reports may not show yet.

    A placement counts until the relay reports `connect_s` after it (until then the listener may still be
    connecting), less the rise in what the relay reported since it was made: those of its listeners that
    did connect are in the report already, and counting them twice would add edges early. A rise made by
    another admission process's listeners is taken for as many of these: an undercount, never more than
    the count reports alone gave before."""

    def __init__(self) -> None:
        # In placement order: (when, room, the relay's reported listeners then).
        self._placed: deque[tuple[float, str, int]] = deque()
        # Per room, in placement order: the room's reported listeners on the relay when each was placed.
        self._rooms: dict[str, deque[int]] = {}

    def add(self, now: float, room_id: str, reported_room: int, reported_total: int) -> None:
        """One more listener of the room placed on the relay, when it reported these counts."""
        if len(self._placed) >= MAX_UNSEEN:
            self._drop_oldest()
        self._placed.append((now, room_id, reported_total))
        self._rooms.setdefault(room_id, deque()).append(reported_room)

    def settle(self, before: float) -> None:
        """A report made after every placement before `before` had time to connect: the report shows them."""
        while self._placed and self._placed[0][0] < before:
            self._drop_oldest()

    def room(self, room_id: str, reported: int) -> int:
        """The room's placements the relay's report (`reported` listeners of the room) does not show."""
        bases = self._rooms.get(room_id)
        return max(0, len(bases) - max(0, reported - bases[0])) if bases else 0

    def total(self, reported: int) -> int:
        """The placements the relay's report (`reported` listeners in all) does not show."""
        placed = self._placed
        return max(0, len(placed) - max(0, reported - placed[0][2])) if placed else 0

    def _drop_oldest(self) -> None:
        _, room_id, _ = self._placed.popleft()
        bases = self._rooms[room_id]
        bases.popleft()
        if not bases:
            del self._rooms[room_id]


def parent(index: int, degree: int) -> int:
    """The tree position a relay at `index` (0: origin) pulls from."""
    return (index - 1) // degree


def path(order: Sequence[str], index: int, degree: int) -> tuple[str, ...]:
    """The relays above order[index], origin first."""
    above: list[str] = []
    while index > 0:
        index = parent(index, degree)
        above.append(order[index])
    return tuple(reversed(above))


class Placer:
    """Places users on relays from the relays' load reports and this process's own recent placements."""

    def __init__(
        self,
        relays: Sequence[str],
        edge_target: int,
        degree: int,
        default_capacity: int,
        stale_s: float = 15.0,
        connect_s: float = CONNECT_S,
    ) -> None:
        if degree < 2 or edge_target < 1:
            raise ValueError("degree must be at least 2 and edge_target at least 1")
        self._relays = list(relays)
        self._edge_target = edge_target
        self._degree = degree
        self._default_capacity = default_capacity
        self._stale_s = stale_s
        self._connect_s = connect_s
        self._loads: dict[str, Load] = {}
        # Placed by this process and maybe not in the relay's reports yet (still connecting).
        self._unseen: dict[str, Unseen] = {}
        # A room's rendezvous order hashes every relay: cached per room while the live relays stay.
        self._orders: dict[str, tuple[list[str], list[str]]] = {}
        # The live relays, recomputed at most every LIVE_EVERY_S or when a report or member changes it.
        self._live: tuple[float, list[str]] | None = None
        # Relays the health probes find serving (None: not probed, every relay counts). Any other relay
        # (down, draining, or not probed yet) is never placed on, whatever it reported.
        self._up: frozenset[str] | None = None
        # Live rooms' origins as their relays report them: a room stays where its speakers are.
        self._origins: dict[str, str] = {}
        # Rooms -> relays whose last report names the room lost (bounded: MAX_LOST_ROOMS per relay).
        self._lost: dict[str, set[str]] = {}

    @property
    def stale_s(self) -> float:
        """How long a relay's report counts: a relay silent for longer has gone quiet."""
        return self._stale_s

    def set_relays(self, relays: Sequence[str]) -> None:
        """The relay members changed (configuration or membership)."""
        self._relays = list(relays)
        self._live = None

    def forget(self, relay: str) -> None:
        """Drops what is known of a relay that is gone for good (its load, the rooms it was origin of)."""
        load = self._loads.pop(relay, None)
        self._unseen.pop(relay, None)
        self._unmark_lost(relay, load.lost if load is not None else ())
        for room_id in load.origins if load is not None else ():
            if self._origins.get(room_id) == relay:
                del self._origins[room_id]
                self._orders.pop(room_id, None)
        self._live = None

    @property
    def available(self) -> bool:
        """Whether there is any relay to place on (none: no relay configured or found serving)."""
        return bool(self._relays)

    def set_up(self, up: Collection[str]) -> None:
        """The relays that health probes find serving; placements use only them from now on (a relay
        added by set_relays since is not placed on until a probe finds it serving)."""
        up = frozenset(up)
        if up != self._up:
            self._up = up
            self._live = None

    def observe(self, load: Load) -> None:
        """Takes a relay's load report; it supersedes this process's count of the placements on it that
        had time to connect before it was made."""
        previous = self._loads.get(load.relay)
        if previous is not None and previous.at > load.at:
            return
        self._loads[load.relay] = load
        self._live = None
        unseen = self._unseen.get(load.relay)
        if unseen is not None:
            unseen.settle(load.at - self._connect_s)
        lost_before = previous.lost if previous is not None else frozenset()
        self._unmark_lost(load.relay, lost_before - load.lost)
        for room_id in load.lost - lost_before:
            self._lost.setdefault(room_id, set()).add(load.relay)
        before = previous.origins if previous is not None else frozenset()
        for room_id in before - load.origins:
            if self._origins.get(room_id) == load.relay:
                del self._origins[room_id]
                self._orders.pop(room_id, None)
        for room_id in load.origins - before:
            self._origins[room_id] = load.relay
            self._orders.pop(room_id, None)

    def _unmark_lost(self, relay: str, rooms: Collection[str]) -> None:
        for room_id in rooms:
            relays = self._lost.get(room_id)
            if relays is not None:
                relays.discard(relay)
                if not relays:
                    del self._lost[room_id]

    def live(self, now: float) -> list[str]:
        """Relays that are members, answer probes and have not gone quiet (one yet to report is live)."""
        loads, up = self._loads, self._up
        serving = self._relays if up is None else [r for r in self._relays if r in up]
        relays = [r for r in serving if (load := loads.get(r)) is None or now - load.at < self._stale_s]
        return relays or serving or list(self._relays)

    def carried(self, relay: str, room_id: str) -> int:
        """The room's listeners on the relay: last reported plus placed here and not in the report yet."""
        load = self._loads.get(relay)
        reported = load.rooms.get(room_id, 0) if load is not None else 0
        unseen = self._unseen.get(relay)
        return reported + unseen.room(room_id, reported) if unseen is not None else reported

    def total(self, relay: str) -> int:
        """All listeners on the relay: last reported plus placed here and not in the report yet."""
        load = self._loads.get(relay)
        reported = load.listeners if load is not None else 0
        unseen = self._unseen.get(relay)
        return reported + unseen.total(reported) if unseen is not None else reported

    def capacity(self, relay: str) -> int:
        """The listener streams the relay says it is sized for."""
        load = self._loads.get(relay)
        return load.capacity if load is not None and load.capacity > 0 else self._default_capacity

    def origin(self, room_id: str, now: float) -> str:
        """The room's origin relay: where its stage publishes and listens."""
        return self._order(room_id, now)[0]

    def _order(self, room_id: str, now: float) -> list[str]:
        cached_live = self._live
        if cached_live is None or not 0 <= now - cached_live[0] < LIVE_EVERY_S:
            cached_live = self._live = (now, self.live(now))
        live = cached_live[1]
        if not live:
            raise Unavailable(NO_RELAY, reason=Reason.NO_RELAY)
        cached = self._orders.get(room_id)
        if cached is not None and cached[0] == live:
            return cached[1]
        if len(self._orders) >= MAX_CACHED_ROOMS:
            self._orders.clear()
        order = ranked(room_id, live)
        origin = self._origins.get(room_id)
        if origin is not None and origin != order[0] and origin in live:
            # The room's origin moved (its relay failed, or left, and came back): keep it where its
            # speakers publish now instead of sending new listeners to a relay without its audio.
            order.remove(origin)
            order.insert(0, origin)
        self._orders[room_id] = (live, order)
        return order

    def place(self, room_id: str, on_stage: bool, now: float) -> RelayPath:
        """The relay for one more user of the room (the stage always goes to the origin)."""
        order = self._order(room_id, now)
        if on_stage:
            return RelayPath(order[0], ())
        lost = self._lost.get(room_id)
        if lost:
            # Relays that cannot reach the room's tree go last: listeners only once every other relay holds
            # its share (when every edge lost the room, its origin died: the room's new tree needs them),
            # and no relay pulls the room through them.
            order = [
                order[0],
                *(relay for relay in order[1:] if relay not in lost),
                *(relay for relay in order[1:] if relay in lost),
            ]
        index = self._choose(order, room_id)
        relay = order[index]
        load = self._loads.get(relay)
        unseen = self._unseen.get(relay)
        if unseen is None:
            unseen = self._unseen[relay] = Unseen()
        if load is None:
            unseen.add(now, room_id, 0, 0)
        else:
            unseen.add(now, room_id, load.rooms.get(room_id, 0), load.listeners)
        return RelayPath(relay, path(order, index, self._degree))

    def _choose(self, order: list[str], room_id: str) -> int:
        for index, relay in enumerate(order):
            # Usually the first few relays: a room is packed from the front of its order.
            if self.carried(relay, room_id) < self._edge_target and self.total(relay) < self.capacity(relay):
                return index
        with_room = [i for i, relay in enumerate(order) if self.total(relay) < self.capacity(relay)]
        if with_room:
            # Every relay with room holds its target of this room: spread the excess evenly.
            return min(with_room, key=lambda i: (self.carried(order[i], room_id), i))
        # Every relay is full, as far as their last reports say: the least loaded one. It refuses the
        # listener if it really is full (relay.listener_capacity), and the listener joins again later.
        return min(range(len(order)), key=lambda i: (self.total(order[i]) / self.capacity(order[i]), i))
