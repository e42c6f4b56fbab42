"""The room state machine: pure rules for create, start, end, with no I/O."""

from __future__ import annotations

import base64
import bisect
import hashlib
import secrets
from collections import deque
from collections.abc import Callable, Iterable

from townhall.core.errors import AlreadyExists, FailedPrecondition, NotFound, PermissionDenied, Reason
from townhall.core.validation import MAX_LISTENER_LIMIT as MAX_LISTENER_LIMIT
from townhall.core.validation import MAX_SPEAKERS as MAX_SPEAKERS
from townhall.v1.common_pb2 import ROLE_COHOST, ROLE_HOST, ROLE_LISTENER, ROLE_SPEAKER, Role, Room, RoomState


def new_room_id() -> str:
    """A fresh room id: 16 URL-safe characters (96 random bits), never starting with '-'."""
    return _room_id(lambda _: secrets.token_bytes(12))


def room_id_for(host: int, request_id: str) -> str:
    """The room id a host's create with this idempotency key gets: the same on every attempt.

    16 URL-safe characters like a fresh id; the host is part of the hash, so two hosts using the
    same key get different rooms.
    """
    key = f"{host}\x00{request_id}"
    return _room_id(
        lambda attempt: hashlib.blake2b(
            f"{key}\x00{attempt}".encode() if attempt else key.encode(), digest_size=12
        ).digest()
    )


def _room_id(draw: Callable[[int], bytes]) -> str:
    """The base64url text of the first of `draw(0)`, `draw(1)`, ... whose text does not start with '-':
    a command line would take such an id for an option (`townhall room start -x...`)."""
    attempt = 0
    while (text := base64.urlsafe_b64encode(draw(attempt)).decode()).startswith("-"):
        attempt += 1
    return text


class RoomBook:
    """The rooms this process knows, keyed by id; every change yields a new Room version.

    Changes are proposed (`created`, `started`, `ended` return a new Room without storing it)
    and applied with `apply` once Kafka has acknowledged them, so memory never holds a change
    that was not durably written.
    """

    def __init__(self) -> None:
        self._rooms: dict[str, Room] = {}
        # Live rooms whose room-started event is not known to be acknowledged (usually none).
        self._unannounced: set[str] = set()
        # Each room's bans as a set: the join path checks one with a lookup, not a scan of the list.
        self._banned: dict[str, frozenset[int]] = {}
        # Per host, when their rooms known here were created (Unix ms, oldest first; pruned past an hour).
        self._created: dict[int, deque[int]] = {}
        # The live rooms' keys in ListLiveRooms order (live_order), and each live room's key: a page is a
        # bisection and a slice, not a sort of every room on every call.
        self._live: list[tuple[int, str]] = []
        self._live_keys: dict[str, tuple[int, str]] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def get(self, room_id: str) -> Room:
        """The room, or NOT_FOUND."""
        room = self._rooms.get(room_id)
        if room is None:
            raise NotFound(f"room {room_id} does not exist", reason=Reason.ROOM_NOT_FOUND)
        return room

    def find(self, room_id: str) -> Room | None:
        """The room, or None."""
        return self._rooms.get(room_id)

    def apply(self, room: Room) -> bool:
        """Stores a room version if it is newer than the one held; True if it was."""
        held = self._rooms.get(room.room_id)
        if held is not None and held.version >= room.version:
            return False
        if held is None and room.created_at_ms:
            self._created.setdefault(room.host_id, deque()).append(room.created_at_ms)
        self._rooms[room.room_id] = room
        self._index(room.room_id, live_order(room) if room.state == RoomState.ROOM_STATE_LIVE else None)
        if room.state == RoomState.ROOM_STATE_LIVE and not room.announced:
            self._unannounced.add(room.room_id)
        else:
            self._unannounced.discard(room.room_id)
        if room.banned_ids:
            self._banned[room.room_id] = frozenset(room.banned_ids)
        else:
            self._banned.pop(room.room_id, None)
        return True

    def forget(self, room_id: str) -> bool:
        """Drops a room (its record was deleted from the room-state topic, or it ended long ago)."""
        if self._rooms.pop(room_id, None) is None:
            return False
        self._index(room_id, None)
        self._unannounced.discard(room_id)
        self._banned.pop(room_id, None)
        return True

    def ended_before(self, cutoff_ms: int) -> list[str]:
        """Rooms that ended before `cutoff_ms` (Unix ms)."""
        return [
            r.room_id
            for r in self._rooms.values()
            if r.state == RoomState.ROOM_STATE_ENDED and r.ended_at_ms < cutoff_ms
        ]

    def unstarted_before(self, cutoff_ms: int) -> list[str]:
        """Rooms created before `cutoff_ms` (Unix ms) that were never started or scheduled."""
        return [
            r.room_id
            for r in self._rooms.values()
            if r.state == RoomState.ROOM_STATE_CREATED and r.created_at_ms < cutoff_ms
        ]

    def created_since(self, host: int, since_ms: int) -> list[int]:
        """When the host's rooms created at or after `since_ms` were created (Unix ms, oldest first)."""
        times = self._created.get(host)
        if times is None:
            return []
        while times and times[0] < since_ms:
            times.popleft()
        if not times:
            del self._created[host]
            return []
        return sorted(t for t in times if t >= since_ms)

    def prune_created(self, since_ms: int) -> None:
        """Forgets creation times before `since_ms` of every host."""
        for host in list(self._created):
            self.created_since(host, since_ms)

    def banned(self, room_id: str, user: int) -> bool:
        """Whether the user is banned from the room (a set lookup: this is on the join path)."""
        banned = self._banned.get(room_id)
        return banned is not None and user in banned

    def live(self) -> list[Room]:
        """Live rooms, most recently started first (then by id)."""
        return [self._rooms[room_id] for _, room_id in self._live]

    def live_page(self, after: tuple[int, str] | None, size: int) -> tuple[list[Room], bool]:
        """Up to `size` live rooms in `live` order that come after the key `after` (a room's live_order),
        and whether more follow. By key, not position: rooms started since do not shift the page."""
        first = 0 if after is None else bisect.bisect_right(self._live, after)
        keys = self._live[first : first + size + 1]
        return [self._rooms[room_id] for _, room_id in keys[:size]], len(keys) > size

    def live_count(self) -> int:
        """How many rooms are live."""
        return len(self._live)

    def _index(self, room_id: str, key: tuple[int, str] | None) -> None:
        """Files a room under its live key (None: not live) in the live index."""
        held = self._live_keys.get(room_id)
        if held == key:
            return
        if held is not None:
            del self._live[bisect.bisect_left(self._live, held)]
            del self._live_keys[room_id]
        if key is not None:
            bisect.insort(self._live, key)
            self._live_keys[room_id] = key

    def created(
        self,
        host: int,
        title: str,
        speakers: Iterable[int],
        listener_limit: int,
        now_ms: int,
        room_id: str | None = None,
    ) -> Room:
        """A new room hosted by `host` (not yet stored); `room_id` if given, else a fresh one."""
        if room_id is not None and room_id in self._rooms:
            raise AlreadyExists(f"room {room_id} already exists")
        while room_id is None or room_id in self._rooms:
            room_id = new_room_id()
        return Room(
            room_id=room_id,
            host_id=host,
            title=title,
            state=RoomState.ROOM_STATE_CREATED,
            speaker_ids=[s for s in speakers if s != host],
            listener_limit=listener_limit,
            created_at_ms=now_ms,
            version=1,
        )

    def started(self, room_id: str, caller: int, now_ms: int) -> Room:
        """The room after its host starts it; starting a live room returns it unchanged."""
        room = self._owned(room_id, caller, "start")
        if room.state == RoomState.ROOM_STATE_LIVE:
            return room
        if room.state == RoomState.ROOM_STATE_ENDED:
            raise FailedPrecondition(
                f"room {room_id} has ended and cannot start again", reason=Reason.ROOM_ENDED
            )
        return _next(room, state=RoomState.ROOM_STATE_LIVE, started_at_ms=now_ms, announced=False)

    def announced(self, room_id: str) -> Room:
        """The live room once its room-started event is acknowledged (unchanged if it was already)."""
        room = self.get(room_id)
        if room.announced or room.state != RoomState.ROOM_STATE_LIVE:
            return room
        return _next(room, announced=True)

    def unannounced(self) -> list[Room]:
        """Live rooms whose room-started event is not known to be acknowledged."""
        return [self._rooms[room_id] for room_id in sorted(self._unannounced)]

    def ended(self, room_id: str, caller: int, now_ms: int) -> Room:
        """The room after its host ends it; ending an ended room returns it unchanged."""
        room = self._owned(room_id, caller, "end")
        if room.state == RoomState.ROOM_STATE_ENDED:
            return room
        return _next(room, state=RoomState.ROOM_STATE_ENDED, ended_at_ms=now_ms)

    def expired(self, room_id: str, now_ms: int) -> Room:
        """A room never started, ended by the owner (unchanged if it has started or been scheduled since)."""
        room = self.get(room_id)
        if room.state != RoomState.ROOM_STATE_CREATED:
            return room
        return _next(room, state=RoomState.ROOM_STATE_ENDED, ended_at_ms=now_ms)

    def scheduled(self, room_id: str, caller: int, start_at_ms: int) -> Room:
        """The room after its host schedules it to start at `start_at_ms` (created or scheduled only)."""
        room = self._owned(room_id, caller, "schedule")
        if room.state not in (RoomState.ROOM_STATE_CREATED, RoomState.ROOM_STATE_SCHEDULED):
            raise FailedPrecondition(
                f"room {room_id} is {RoomState.Name(room.state)} and cannot be scheduled"
            )
        return _next(room, state=RoomState.ROOM_STATE_SCHEDULED, scheduled_start_ms=start_at_ms)

    def crowded(self, room_id: str) -> Room:
        """The live room marked as drawing a crowd; a room already marked (or not live) is returned as is."""
        room = self.get(room_id)
        if room.crowd or room.state != RoomState.ROOM_STATE_LIVE:
            return room
        return _next(room, crowd=True)

    def due(self, now_ms: int) -> list[Room]:
        """Scheduled rooms whose start time has come, earliest first."""
        rooms = [
            r
            for r in self._rooms.values()
            if r.state == RoomState.ROOM_STATE_SCHEDULED and r.scheduled_start_ms <= now_ms
        ]
        return sorted(rooms, key=lambda r: r.scheduled_start_ms)

    def _owned(self, room_id: str, caller: int, action: str) -> Room:
        room = self.get(room_id)
        if room.host_id != caller:
            raise PermissionDenied(f"only the host of room {room_id} may {action} it")
        return room


def live_order(room: Room) -> tuple[int, str]:
    """A live room's place in ListLiveRooms: most recently started first, then by id (a total order)."""
    return -room.started_at_ms, room.room_id


def role_of(room: Room, user: int) -> Role.ValueType:
    """The role a user joins a room in."""
    if user == room.host_id:
        return ROLE_HOST
    if user in room.cohost_ids:
        return ROLE_COHOST
    if user in room.speaker_ids:
        return ROLE_SPEAKER
    return ROLE_LISTENER


def _next(room: Room, **changes: int | bool) -> Room:
    changed = Room()
    changed.CopyFrom(room)
    for name, value in changes.items():
        setattr(changed, name, value)
    changed.version = room.version + 1
    return changed
