"""The join path: admit a user to a live room from local state, with no Kafka or owner round trip."""

from __future__ import annotations

import random
import time
from typing import NoReturn

from townhall.admission.capacity import Capacity
from townhall.admission.decision import ADMIT, REJOIN, WAIT, decide, wait_ms
from townhall.admission.fairness import FairBudget
from townhall.admission.leases import Allowance
from townhall.admission.metrics import LISTENERS
from townhall.admission.placement import NO_RELAY, Placer
from townhall.admission.presence import Presence
from townhall.admission.relays import RelayDirectory
from townhall.admission.rooms import RoomBook, role_of
from townhall.admission.waiting import WaitingLine
from townhall.core.auth import PUBLISH, SUBSCRIBE, Principal
from townhall.core.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from townhall.core.identity import missing
from townhall.core.tickets import TicketSigner
from townhall.internal.v1.events_pb2 import PresenceEvent
from townhall.v1.admission_pb2 import JoinResponse, Waiting
from townhall.v1.common_pb2 import ROLE_LISTENER, ROLE_UNSPECIFIED, ROOM_STATE_LIVE, Role, Room, RoomState

_STAGE_NAMES = {Role.ROLE_HOST: "host", Role.ROLE_COHOST: "co-host", Role.ROLE_SPEAKER: "speaker"}
# Plain ints: an enum wrapper's attribute lookup is a Python call, four of them per join.
KIND_JOIN = PresenceEvent.KIND_JOIN

RETRY_AFTER_MS = (1_000, 3_000)  # jittered, so shed clients do not come back in step
# A process behind the caller on a room: its room-state follower is normally milliseconds behind.
BEHIND_RETRY_MS = 200
# Relay paths whose internal addresses are remembered.
MAX_PATHS = 10_000
# The relays a listener's tickets were for are bits of one int per listener, a bit per relay known here;
# past this many relays (or for a listener whose placement failed) a Leave goes to every relay.
MAX_RELAY_BITS = 4096
ANY_RELAY = -1


class Admitter:
    """Admits listeners to live rooms within leased capacity and a fair process budget; issues tickets."""

    def __init__(
        self,
        book: RoomBook,
        signer: TicketSigner,
        directory: RelayDirectory,
        presence: Presence,
        capacity: Capacity,
        budget: FairBudget,
        waiting_room: int,
        placer: Placer,
    ) -> None:
        self._book = book
        self._placer = placer
        # A ticket names the relays above its relay by their internal address (the edge pulls there), as
        # the directory knows them (admission/relays.py): the process's one directory, seeds and discovered.
        self._directory = directory
        self._paths: dict[tuple[str, ...], tuple[str, ...]] = {(): ()}
        self._paths_version = self._directory.version
        self._signer = signer
        self._presence = presence
        self._capacity = capacity
        self._budget = budget
        self._waiting_room = waiting_room
        self._lines: dict[str, WaitingLine] = {}
        self._relay_bits: dict[str, int] = {}
        self._relay_names: list[str] = []

    def join(self, room_id: str, who: Principal, min_version: int = 0) -> JoinResponse:
        """A grant, a waiting answer, or RESOURCE_EXHAUSTED with a jittered retry-after.

        A listener ticket needs the token's "subscribe" grant; a stage ticket (host, co-host, speaker:
        publishing) needs "publish". A caller that has seen the room at `min_version` is not judged on
        an older copy (this process has not read the room-state topic that far): UNAVAILABLE, ask again.
        """
        user = who.user_id
        # One lookup on the join path: the version check and the join read the same copy.
        room = self._book.find(room_id)
        if room is None and not min_version:
            room = self._book.get(room_id)  # NOT_FOUND, in the book's words
        if room is None or room.version < min_version:
            have = f"version {room.version}" if room is not None else "no copy"
            raise Unavailable(
                f"this process has {have} of room {room_id}; the caller has seen version {min_version}:"
                " ask again (another process, or this one in a moment)",
                reason=Reason.ROOM_BEHIND,
                retry_after_ms=BEHIND_RETRY_MS,
            )
        if room.state != ROOM_STATE_LIVE:
            ended = room.state == RoomState.ROOM_STATE_ENDED
            raise FailedPrecondition(
                f"room {room_id} is {RoomState.Name(room.state)[11:].lower()}, not live",
                reason=Reason.ROOM_ENDED if ended else Reason.ROOM_NOT_LIVE,
            )
        if self._book.banned(room_id, user):
            raise PermissionDenied(f"user {user} is banned from room {room_id}", reason=Reason.BANNED)
        role = role_of(room, user)
        listener = role == ROLE_LISTENER
        needed = SUBSCRIBE if listener else PUBLISH
        if needed not in who.grants:
            as_role = "a listener" if listener else f"the {_STAGE_NAMES.get(role, 'speaker')}"
            raise PermissionDenied(
                missing(needed, who, f"joining room {room_id} as {as_role}"), reason=Reason.MISSING_GRANT
            )
        if not self._placer.available:
            # Checked before a listener takes an admit: no admit is spent on a join with nowhere to go.
            raise Unavailable(NO_RELAY, reason=Reason.NO_RELAY)
        allowance: Allowance | None = None
        if listener:
            admitted = self._admit_listener(room, user)
            if type(admitted) is JoinResponse:
                return admitted
            allowance = admitted
        relay = self._placer.place(room_id, not listener, time.time())
        if self._paths_version != self._directory.version:  # an internal address moved
            self._paths, self._paths_version = {(): ()}, self._directory.version
        upstream = self._paths.get(relay.upstream)
        if upstream is None:
            upstream = self._internal_path(relay.upstream)
        if allowance is not None:
            # The relays a listener holds tickets for: its Leave voids them there (relay/leaves.py).
            allowance.listeners[user] |= self._relay_bit(relay.relay)
        ticket = self._signer.issue(
            room_id, user, role, relay.relay, upstream=upstream, room_version=room.version
        )
        self._presence.record(KIND_JOIN, room_id, user, role)
        response = JoinResponse()
        grant = response.grant  # filled in place: building a Grant and copying it in costs twice as much
        grant.ticket = self._signer.sign(ticket)
        grant.relay_address = relay.relay
        grant.role = role
        grant.expires_at_ms = ticket.expires_at * 1000
        return response

    def _internal_path(self, path: tuple[str, ...]) -> tuple[str, ...]:
        """The internal addresses of a path of relays (remembered: a room has a handful of paths)."""
        if len(self._paths) >= MAX_PATHS:
            self._paths = {(): ()}
        internal = self._paths[path] = tuple(self._directory.internal(relay) for relay in path)
        return internal

    def _relay_bit(self, relay: str) -> int:
        bit = self._relay_bits.get(relay)
        if bit is None:
            if len(self._relay_names) >= MAX_RELAY_BITS:
                return ANY_RELAY
            bit = self._relay_bits[relay] = 1 << len(self._relay_names)
            self._relay_names.append(relay)
        return bit

    def leave(self, room_id: str, user: int) -> None:
        """Gives a listener's seat back and voids its tickets; leaving twice or without joining is accepted.

        The seat is given back only once the leave is recorded for the relays the listener's tickets
        were for (they cut its streams and refuse those tickets from then on): a seat given back while
        its ticket kept streaming would let any number of users through a full room.
        """
        allowance = self._capacity.get(room_id)
        relays = allowance.listeners.get(user) if allowance is not None else None
        if allowance is None or relays is None:
            self._presence.record(PresenceEvent.KIND_LEAVE, room_id, user, ROLE_UNSPECIFIED)
            return
        names = [""] if relays <= 0 else [name for i, name in enumerate(self._relay_names) if relays >> i & 1]
        if not self._presence.room_for(len(names)):
            retry = random.randint(*RETRY_AFTER_MS)
            raise ResourceExhausted(
                f"admission is too busy to record leaves; your seat in room {room_id} is kept: retry "
                f"after {retry} ms",
                retry,
                Reason.OVERLOADED,
            )
        self._presence.left(room_id, user, names, time.time_ns() // 1_000_000)
        allowance.leave(user)
        LISTENERS.dec()

    def forget(self, room_id: str) -> None:
        """Drops what this process holds for a room that is no longer live."""
        allowance = self._capacity.forget(room_id)
        self._lines.pop(room_id, None)
        if allowance is not None:
            LISTENERS.dec(len(allowance.listeners))

    def forget_ended(self) -> None:
        """Drops the listeners of every room that is no longer live."""
        for room_id in list(self._lines.keys() | self._capacity.rooms()):
            try:
                live = self._book.get(room_id).state == RoomState.ROOM_STATE_LIVE
            except NotFound:
                live = False
            if not live:
                self.forget(room_id)

    def listeners(self, room_id: str) -> int:
        """How many listeners this process has admitted to the room."""
        allowance = self._capacity.get(room_id)
        return len(allowance.listeners) if allowance else 0

    def _admit_listener(self, room: Room, user: int) -> Allowance | JoinResponse:
        """The room's allowance with `user` seated, or a waiting answer; RESOURCE_EXHAUSTED when shedding."""
        room_id = room.room_id
        allowance = self._capacity.allowance(room_id)
        decision = decide(allowance, user, time.monotonic())
        if decision is REJOIN:
            return allowance
        allowance.demand()
        line = self._lines.get(room_id)
        if decision is ADMIT:
            if not self._budget.take(room_id):
                # This process is at its admit budget and the room has had its fair share.
                _shed(f"admission is busy; room {room_id} has had its share; retry", Reason.OVERLOADED)
            allowance.admit(user)
            if line is not None:
                line.remove(user)
            LISTENERS.inc()
            return allowance
        if decision is WAIT:
            if line is None:
                line = self._lines[room_id] = WaitingLine(self._waiting_room)
            retry_ms = wait_ms(line.ahead(user), random.uniform(0.8, 1.2))
            position = line.wait(user, hold_s=retry_ms / 1000 + 1.0)
            if position:
                return JoinResponse(waiting=Waiting(position=position, retry_after_ms=retry_ms))
            _shed(f"room {room_id}'s waiting line is full; retry", Reason.WAITING_LINE_FULL)
        limit = room.listener_limit or self._capacity.default_limit
        _shed(f"room {room_id} is full ({limit} listeners); retry", Reason.ROOM_FULL)


def _shed(message: str, reason: Reason) -> NoReturn:
    retry = random.randint(*RETRY_AFTER_MS)
    raise ResourceExhausted(f"{message} after {retry} ms", retry, reason)
