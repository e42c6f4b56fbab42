"""Moderation on a relay: each room's rules from the room-state topic, and the streams they end (pure).

The relay checks a ticket's signature alone (core/tickets.py); the Guard adds what the room says since
the ticket was issued: a banned user, a user removed after the ticket's room version, a speaker moved off
the stage, an ended room. It is asked when a stream opens (`admit`) and, for every new room version read
from Kafka, re-checks the streams open on this relay (`apply`), ending those that lost their right at
once. A room this relay has not read yet, or a ticket newer than its copy of the room, is let through:
the ticket was signed by an admission process that had the newer version, and the relay re-checks
when the version arrives.

Every stream also has an owner and a bound: a user holds at most `streams_per_user` Publish streams and
as many Subscribe streams of a room on this relay; one more ends the oldest (`replaced`), so a client
that reconnects after a network failure (its old stream not yet noticed dead) always gets back in, and
one ticket cannot open unlimited streams. A Leave recorded by admission (`left`, from the presence
topic) voids the user's listener tickets issued before it: the seat it freed cannot keep streaming.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from townhall.core.errors import FailedPrecondition, PermissionDenied, Reason, TownhallError
from townhall.core.tickets import Ticket, void_after_s
from townhall.v1.common_pb2 import ROLE_COHOST, ROLE_HOST, ROLE_LISTENER, Room, RoomState

# What a stream does: publish audio, listen as the stage (each frame, at the origin), listen as audience.
PUBLISH, STAGE, LISTEN = "publish", "stage", "listen"
# Why a stream was refused or ended (the metric label).
ENDED, BANNED, REMOVED, DEMOTED = "ended", "banned", "removed", "demoted"
# Ended by a newer stream of the same user and room, or by the user's Leave.
REPLACED, LEFT = "replaced", "left"
# Leaves remembered (each voids older listener tickets until they expire); past it the oldest go.
MAX_LEAVES = 200_000


@dataclass(frozen=True, slots=True)
class Rules:
    """What one room version says about who may hold a stream."""

    room_id: str
    version: int
    ended: bool = False
    stage: frozenset[int] = frozenset()
    leads: frozenset[int] = frozenset()  # the host and co-hosts
    muted: frozenset[int] = frozenset()
    banned: frozenset[int] = frozenset()
    removed: Mapping[int, int] = field(default_factory=dict)  # user -> the room version that removed them
    ended_at_ms: int = 0

    @classmethod
    def of(cls, room: Room) -> Rules:
        """The rules of a room version."""
        if room.state == RoomState.ROOM_STATE_ENDED:
            return cls(room.room_id, room.version, ended=True, ended_at_ms=room.ended_at_ms)
        leads = frozenset((room.host_id, *room.cohost_ids))
        return cls(
            room.room_id,
            room.version,
            stage=leads | frozenset(room.speaker_ids),
            leads=leads,
            muted=frozenset(room.muted_ids),
            banned=frozenset(room.banned_ids),
            removed={r.user_id: r.version for r in room.removals},
        )

    def refusal(self, user: int, ticket_version: int, kind: str) -> tuple[str, TownhallError] | None:
        """Why a stream of `user` on a ticket of `ticket_version` may not go on (None: it may)."""
        room = self.room_id
        if self.ended:
            return ENDED, FailedPrecondition(f"room {room} has ended", reason=Reason.ROOM_ENDED)
        if ticket_version > self.version:
            return None  # issued from a newer version than this relay has read: checked when it arrives
        if user in self.banned:
            return BANNED, PermissionDenied(f"user {user} is banned from room {room}", reason=Reason.BANNED)
        removed_at = self.removed.get(user)
        if removed_at is not None and ticket_version < removed_at:
            return REMOVED, PermissionDenied(
                f"user {user} was removed from room {room}; tickets issued before that are void "
                "(join the room again)",
                reason=Reason.REMOVED,
            )
        if kind != LISTEN and user not in self.stage:
            return DEMOTED, PermissionDenied(
                f"user {user} is no longer on the stage of room {room}; join the room again to listen",
                reason=Reason.NOT_ON_STAGE,
            )
        return None


class Watch:
    """One open Publish or Subscribe stream as the Guard sees it; `error` is set when it is cut."""

    __slots__ = (
        "error",
        "issued_ms",
        "kind",
        "muted",
        "on_cut",
        "role",
        "room_id",
        "ticket_version",
        "user_id",
    )

    def __init__(self, ticket: Ticket, kind: str) -> None:
        self.room_id = ticket.room_id
        self.user_id = ticket.user_id
        self.role = ticket.role
        self.ticket_version = ticket.room_version
        self.issued_ms = ticket.issued_ms
        self.kind = kind
        # Publish only: frames of a muted speaker are dropped (read per frame, so kept as a flag).
        self.muted = False
        self.error: TownhallError | None = None
        # How the stream is ended from outside its handler (close the subscriber, cancel the reader).
        self.on_cut: Callable[[], object] | None = None

    def cut(self, error: TownhallError) -> None:
        """Ends the stream with `error`."""
        if self.error is not None:
            return
        self.error = error
        if self.on_cut is not None:
            self.on_cut()


class Guard:
    """The rules of every room this relay has read, and the streams open on it by room and user."""

    def __init__(
        self,
        streams_per_user: int = 2,
        ticket_ttl_s: float = 3600.0,
        on_replaced: Callable[[Watch], object] | None = None,
    ) -> None:
        self._rules: dict[str, Rules] = {}
        # Per room and user, the open streams, oldest first.
        self._streams: dict[str, dict[int, list[Watch]]] = {}
        self._per_user = streams_per_user
        # Leaves and an ended room's rules are kept until every ticket they judge has expired.
        self._keep_ms = int(void_after_s(ticket_ttl_s) * 1000)
        self._on_replaced = on_replaced
        # (room, user) -> when the user left (Unix ms), oldest first: listener tickets issued before are void.
        self._left: OrderedDict[tuple[str, int], int] = OrderedDict()

    @property
    def rooms(self) -> int:
        """Rooms whose rules this relay has read."""
        return len(self._rules)

    def rules(self, room_id: str) -> Rules | None:
        """The newest rules read for the room."""
        return self._rules.get(room_id)

    def apply(self, room: Room) -> list[tuple[Watch, str]]:
        """Takes a room version (older ones are ignored); cuts the streams it revokes, with why."""
        held = self._rules.get(room.room_id)
        if held is not None and held.version >= room.version:
            return []
        rules = self._rules[room.room_id] = Rules.of(room)
        cut: list[tuple[Watch, str]] = []
        for user, watches in self._streams.get(room.room_id, {}).items():
            for watch in list(watches):
                refusal = rules.refusal(user, watch.ticket_version, watch.kind)
                if refusal is not None:
                    watch.cut(refusal[1])
                    cut.append((watch, refusal[0]))
                else:
                    watch.muted = user in rules.muted
        return cut

    def admit(self, ticket: Ticket, kind: str, per_user: int = 0) -> Watch:
        """A watch for a new stream, or PERMISSION_DENIED / FAILED_PRECONDITION saying why not.

        The user's oldest stream of the same kind (publish, or subscribe) in the room ends if the
        user already holds `per_user` (by default `streams_per_user`) of them here.
        """
        watch = Watch(ticket, kind)
        rules = self._rules.get(ticket.room_id)
        if rules is not None:
            refusal = rules.refusal(ticket.user_id, ticket.room_version, kind)
            if refusal is not None:
                raise refusal[1]
            watch.muted = ticket.user_id in rules.muted
        left = self._left_refusal(ticket.room_id, ticket.user_id, ticket.role, ticket.issued_ms, kind)
        if left is not None:
            raise left
        watches = self._streams.setdefault(ticket.room_id, {}).setdefault(ticket.user_id, [])
        # Streams already cut (ending, not yet released) do not count.
        same = [w for w in watches if _publishes(w.kind) == _publishes(kind) and w.error is None]
        for old in same[: max(0, len(same) - (per_user or self._per_user) + 1)]:
            watches.remove(old)
            what = "Publish" if _publishes(kind) else "Subscribe"
            old.cut(
                FailedPrecondition(
                    f"user {ticket.user_id} opened a newer {what} stream of room {ticket.room_id} on this "
                    f"relay (at most {self._per_user} per user): this one is closed",
                    reason=Reason.STREAM_REPLACED,
                )
            )
            if self._on_replaced is not None:
                self._on_replaced(old)
        watches.append(watch)
        return watch

    def holds(self, ticket: Ticket, kind: str) -> int:
        """How many streams of this kind (publish, or subscribe) the ticket's user holds in its room here."""
        watches = self._streams.get(ticket.room_id, {}).get(ticket.user_id, ())
        return sum(_publishes(w.kind) == _publishes(kind) and w.error is None for w in watches)

    def left(self, room_id: str, leaves: Iterable[tuple[int, int]], now_ms: int) -> list[tuple[Watch, str]]:
        """Records that users left the room at the given times (user, Unix ms); cuts their listener
        streams opened with a ticket issued before that, with why."""
        self._expire_leaves(now_ms)
        users = self._streams.get(room_id, {})
        cut: list[tuple[Watch, str]] = []
        for user, at_ms in leaves:
            key = (room_id, user)
            if self._left.get(key, -1) >= at_ms:
                continue
            self._left[key] = at_ms
            self._left.move_to_end(key)
            for watch in list(users.get(user, ())):
                refusal = self._left_refusal(room_id, user, watch.role, watch.issued_ms, watch.kind)
                if refusal is not None:
                    watch.cut(refusal)
                    cut.append((watch, LEFT))
        while len(self._left) > MAX_LEAVES:
            self._left.popitem(last=False)
        return cut

    def _left_refusal(
        self, room_id: str, user: int, role: int, issued_ms: int, kind: str
    ) -> TownhallError | None:
        if kind != LISTEN or role != ROLE_LISTENER or not self._left:
            return None
        at_ms = self._left.get((room_id, user))
        if at_ms is None or issued_ms > at_ms:
            return None
        return PermissionDenied(
            f"user {user} left room {room_id}; listener tickets issued before that are void "
            "(join the room again)",
            reason=Reason.SEAT_GIVEN_BACK,
        )

    def _expire_leaves(self, now_ms: int) -> None:
        """Forgets leaves older than a ticket's lifetime: every ticket they void has expired."""
        oldest = now_ms - self._keep_ms
        while self._left:
            key, at_ms = next(iter(self._left.items()))
            if at_ms >= oldest:
                break
            del self._left[key]

    def expire(self, now_ms: int) -> int:
        """Forgets the rules of rooms that ended a ticket lifetime ago, and old leaves; returns rooms dropped.

        Every ticket of such a room has expired, so its signature check refuses it without the rules.
        """
        self._expire_leaves(now_ms)
        oldest = now_ms - self._keep_ms
        gone = [
            room_id
            for room_id, rules in self._rules.items()
            if rules.ended and rules.ended_at_ms < oldest and room_id not in self._streams
        ]
        for room_id in gone:
            del self._rules[room_id]
        return len(gone)

    def forget(self, room_id: str) -> None:
        """Drops a room's rules (its record was deleted from the room-state topic)."""
        rules = self._rules.get(room_id)
        if rules is not None and rules.ended:
            del self._rules[room_id]

    @property
    def leaves(self) -> int:
        """Leaves remembered."""
        return len(self._left)

    def release(self, watch: Watch) -> None:
        """Forgets a stream that ended."""
        users = self._streams.get(watch.room_id)
        if users is None:
            return
        watches = users.get(watch.user_id)
        if watches is not None:
            if watch in watches:
                watches.remove(watch)
            if not watches:
                del users[watch.user_id]
        if not users:
            del self._streams[watch.room_id]

    def streams(self, room_id: str) -> int:
        """Streams open on this relay in the room (publish and subscribe)."""
        return sum(len(w) for w in self._streams.get(room_id, {}).values())

    def leads(self) -> dict[str, list[int]]:
        """Per room, the host and co-hosts with a stream open here (for the load report: host failover).

        From the room's rules when read, else from the tickets' roles.
        """
        present: dict[str, list[int]] = {}
        for room_id, users in self._streams.items():
            rules = self._rules.get(room_id)
            found = [
                user
                for user, watches in users.items()
                if watches
                and (
                    user in rules.leads
                    if rules is not None
                    else any(w.role in (ROLE_HOST, ROLE_COHOST) for w in watches)
                )
            ]
            if found:
                present[room_id] = sorted(found)
        return present


def _publishes(kind: str) -> bool:
    return kind == PUBLISH
