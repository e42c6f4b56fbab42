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
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from townhall.core.errors import Reason, Unavailable
from townhall.core.sharding import ranked

MAX_CACHED_ROOMS = 100_000
NO_RELAY = "no relay is serving: none is configured and none has been found serving yet; retry"
LIVE_EVERY_S = 0.25


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
    ) -> None:
        if degree < 2 or edge_target < 1:
            raise ValueError("degree must be at least 2 and edge_target at least 1")
        self._relays = list(relays)
        self._edge_target = edge_target
        self._degree = degree
        self._default_capacity = default_capacity
        self._stale_s = stale_s
        self._loads: dict[str, Load] = {}
        # Placed by this process since the relay's last report: listeners not yet in any report.
        self._placed: dict[str, dict[str, int]] = {}
        self._placed_total: dict[str, int] = {}
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
        self._placed.pop(relay, None)
        self._placed_total.pop(relay, None)
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
        """Takes a relay's load report; it supersedes this process's count of placements on it."""
        previous = self._loads.get(load.relay)
        if previous is not None and previous.at > load.at:
            return
        self._loads[load.relay] = load
        self._live = None
        self._placed.pop(load.relay, None)
        self._placed_total.pop(load.relay, None)
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
        """The room's listeners on the relay: last reported plus placed here since."""
        load = self._loads.get(relay)
        reported = load.rooms.get(room_id, 0) if load is not None else 0
        return reported + self._placed.get(relay, {}).get(room_id, 0)

    def total(self, relay: str) -> int:
        """All listeners on the relay: last reported plus placed here since."""
        load = self._loads.get(relay)
        reported = load.listeners if load is not None else 0
        return reported + self._placed_total.get(relay, 0)

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
        placed = self._placed.setdefault(relay, {})
        placed[room_id] = placed.get(room_id, 0) + 1
        self._placed_total[relay] = self._placed_total.get(relay, 0) + 1
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
