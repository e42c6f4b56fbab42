"""The join path: admit a user to a live room from local state, with no Kafka or owner round trip."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from townhall.admission.metrics import JOINS, LISTENERS
from townhall.admission.rooms import RoomBook, role_of
from townhall.core.errors import FailedPrecondition, NotFound, ResourceExhausted
from townhall.core.kafka import EventQueue, Topics
from townhall.core.sharding import owner
from townhall.core.tickets import TicketSigner
from townhall.v1.admission_pb2 import Grant, JoinResponse
from townhall.v1.common_pb2 import Role, Room, RoomState
from townhall.v1.events_pb2 import PresenceEvent

RETRY_AFTER_MS = (1_000, 3_000)  # jittered, so shed clients do not come back in step


class Admitter:
    """Admits listeners to live rooms up to each room's listener limit, and issues tickets."""

    def __init__(
        self,
        book: RoomBook,
        signer: TicketSigner,
        relays: Sequence[str],
        events: EventQueue,
        topics: Topics,
        member: str,
        default_limit: int,
    ) -> None:
        self._book = book
        self._signer = signer
        self._relays = list(relays)
        self._events = events
        self._topic = topics.presence
        self._member = member
        self._default_limit = default_limit
        self._listeners: dict[str, set[int]] = {}

    def join(self, room_id: str, user: int) -> JoinResponse:
        """A grant for a live room, or RESOURCE_EXHAUSTED with a retry-after when it is full."""
        room = self._book.get(room_id)
        if room.state != RoomState.ROOM_STATE_LIVE:
            JOINS.labels("rejected").inc()
            raise FailedPrecondition(f"room {room_id} is {RoomState.Name(room.state)[11:].lower()}, not live")
        role = role_of(room, user)
        if role == Role.ROLE_LISTENER:
            self._admit_listener(room, user)
        relay = owner(room_id, self._relays)
        ticket = self._signer.issue(room_id, user, role, relay)
        self._presence(PresenceEvent.KIND_JOIN, room_id, user, role)
        JOINS.labels("admitted").inc()
        return JoinResponse(
            grant=Grant(
                ticket=self._signer.sign(ticket),
                relay_address=relay,
                role=role,
                expires_at_ms=ticket.expires_at * 1000,
            )
        )

    def leave(self, room_id: str, user: int) -> None:
        """Forgets a listener; leaving twice or without joining is accepted."""
        listeners = self._listeners.get(room_id)
        if listeners is not None and user in listeners:
            listeners.discard(user)
            LISTENERS.dec()
        self._presence(PresenceEvent.KIND_LEAVE, room_id, user, Role.ROLE_UNSPECIFIED)

    def forget_ended(self) -> None:
        """Drops the listener sets of rooms that are no longer live."""
        for room_id in list(self._listeners):
            try:
                live = self._book.get(room_id).state == RoomState.ROOM_STATE_LIVE
            except NotFound:
                live = False
            if not live:
                LISTENERS.dec(len(self._listeners.pop(room_id)))

    def listeners(self, room_id: str) -> int:
        """How many listeners this process has admitted to the room."""
        return len(self._listeners.get(room_id, ()))

    def _admit_listener(self, room: Room, user: int) -> None:
        listeners = self._listeners.setdefault(room.room_id, set())
        if user in listeners:
            return
        limit = room.listener_limit or self._default_limit
        if len(listeners) >= limit:
            JOINS.labels("shed").inc()
            retry = random.randint(*RETRY_AFTER_MS)
            raise ResourceExhausted(
                f"room {room.room_id} is full ({limit} listeners); retry after {retry} ms", retry
            )
        listeners.add(user)
        LISTENERS.inc()

    def _presence(
        self, kind: PresenceEvent.Kind.ValueType, room_id: str, user: int, role: Role.ValueType
    ) -> None:
        event = PresenceEvent(
            kind=kind,
            room_id=room_id,
            user_id=user,
            role=role,
            at_ms=time.time_ns() // 1_000_000,
            member=self._member,
        )
        self._events.offer(self._topic, room_id.encode(), event.SerializeToString())
