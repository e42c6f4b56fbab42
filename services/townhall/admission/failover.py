"""Host failover, on each room's owner: a co-host takes over a room whose host has gone; a room with
neither ends.

Who is connected comes from the relays: each relay's load report (topic relay-load, every
relay.load_report_s) lists, per room, the host and co-hosts with a Publish or Subscribe stream open on
it. A lead missing from every fresh report is gone. Once the host has been gone for
admission.host_grace_s, the first connected co-host becomes host (the old host takes their co-host
place); once the host and every co-host have been gone that long, the room ends. Both are room changes
acknowledged by Kafka like any other.

The owner judges only while it hears from the relays: with no fresh report from any relay (reports
off, the topic unreadable) it cannot tell a dropped host from a broken report path, and its clocks
wait. A process that has just taken a room over starts the room's clocks afresh.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from townhall.admission import stage
from townhall.admission.metrics import HOST_FAILOVERS
from townhall.admission.store import RoomStore, now_ms
from townhall.core import logging
from townhall.core.errors import TownhallError
from townhall.core.tasks import Ticker
from townhall.internal.v1.events_pb2 import RelayLoad
from townhall.v1.common_pb2 import Room

log = logging.get(__name__)

HAND_OVER, END = "handed_over", "ended"
# The room change each verdict is recorded as (townhall_room_changes_total's label).
_CHANGES = {HAND_OVER: "handed_over", END: "abandoned"}


class StagePresence:
    """The host and co-hosts each relay reports connected, per room (pure; times in Unix seconds)."""

    def __init__(self, fresh_s: float) -> None:
        # A relay's report counts for this long (a few report periods); then its relay is taken as gone.
        self._fresh_s = fresh_s
        self._reports: dict[str, tuple[float, dict[str, frozenset[int]]]] = {}

    def observe(self, relay: str, at_s: float, leads: Mapping[str, Iterable[int]]) -> None:
        """Takes a relay's report (an older one than held is ignored)."""
        held = self._reports.get(relay)
        if held is not None and held[0] > at_s:
            return
        self._reports[relay] = (at_s, {room: frozenset(users) for room, users in leads.items()})

    def observe_report(self, report: RelayLoad) -> None:
        """Takes a RelayLoad record."""
        self.observe(
            report.relay, report.at_ms / 1000, {room: leads.user_ids for room, leads in report.leads.items()}
        )

    def present(self, room_id: str, now_s: float) -> set[int] | None:
        """The room's leads connected to any relay; None when no relay has reported lately."""
        fresh = [rooms for at, rooms in self._reports.values() if now_s - at <= self._fresh_s]
        if not fresh:
            return None
        return set().union(*(rooms.get(room_id, ()) for rooms in fresh))


@dataclass(frozen=True)
class Verdict:
    """What the owner does about a room: hand it to `cohost`, or end it."""

    action: str
    cohost: int = 0


class HostWatch:
    """Since when each room's host, and all its leads, have been gone; a verdict when too long (pure).

    Absence counts from the first look that finds a lead missing, which is after they left (the report
    that says so was made after their stream ended): a verdict never comes before the grace period,
    and at most a tick and a report period after it.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        # room -> (since when the host is gone, since when the host and every co-host are), monotonic.
        self._gone: dict[str, tuple[float | None, float | None]] = {}

    def verdict(self, room: Room, present: set[int] | None, now: float) -> Verdict | None:
        """The action due for the room now, if any. `present` None: nobody can tell (the clocks wait)."""
        if present is None:
            self._gone[room.room_id] = (None, None)
            return None
        host_gone, leads_gone = self._gone.get(room.room_id, (None, None))
        cohosts = [c for c in room.cohost_ids if c in present]
        host_here = room.host_id in present
        host_gone = None if host_here else (now if host_gone is None else host_gone)
        leads_gone = None if host_here or cohosts else (now if leads_gone is None else leads_gone)
        self._gone[room.room_id] = (host_gone, leads_gone)
        if host_gone is not None and now - host_gone >= self.grace_s and cohosts:
            return Verdict(HAND_OVER, cohosts[0])
        if leads_gone is not None and now - leads_gone >= self.grace_s:
            return Verdict(END)
        return None

    def keep(self, rooms: Iterable[str]) -> None:
        """Forgets every room but these (rooms no longer live or owned here)."""
        wanted = set(rooms)
        for room_id in [r for r in self._gone if r not in wanted]:
            del self._gone[room_id]


class Failover(Ticker):
    """Every tick, the owner's verdicts for its live rooms, carried out as room changes."""

    def __init__(
        self,
        store: RoomStore,
        presence: StagePresence,
        owns: Callable[[str], bool],
        grace_s: float,
        tick_s: float = 1.0,
    ) -> None:
        super().__init__("host-failover", min(tick_s, grace_s / 4))
        self._store = store
        self._presence = presence
        self._owns = owns
        self.watch = HostWatch(grace_s)

    async def tick(self) -> int:
        """Judges every live room owned here; returns how many changes were made."""
        rooms = [r for r in self._store.book.live() if self._owns(r.room_id)]
        self.watch.keep(r.room_id for r in rooms)
        now, wall = time.monotonic(), time.time()
        changed = 0
        for room in rooms:
            verdict = self.watch.verdict(room, self._presence.present(room.room_id, wall), now)
            if verdict is None:
                continue
            try:
                await self._store.change(room.room_id, _CHANGES[verdict.action], _rule(verdict))
            except TownhallError as exc:  # Kafka away: the verdict stands, and is carried out next tick
                log.warning("host failover not recorded", room=room.room_id, error=str(exc))
                continue
            HOST_FAILOVERS.labels(verdict.action).inc()
            changed += 1
            log.info(
                "host failover",
                room=room.room_id,
                action=verdict.action,
                old_host=room.host_id,
                new_host=verdict.cohost or None,
                grace_s=self.watch.grace_s,
            )
        return changed


def _rule(verdict: Verdict) -> Callable[[Room], Room]:
    """The room change that carries out a verdict."""
    if verdict.action == HAND_OVER:
        return functools.partial(stage.hand_over, cohost=verdict.cohost)
    return lambda room: stage.abandoned(room, now_ms())
