"""WatchRoom on one admission process: one watcher per room, one serialisation per update and view.

Every admission process follows the room-state topic already (store.py); each version it reads is handed
to the room's watcher here, if anyone on this process watches the room. The watcher sends at most one
update per room every `interval_s` (changes within it are coalesced into one update whose events say
all of them) and otherwise at once. Counts are looked at every `counts_s` (1 s) and sent when they
moved (and with every room update): a big room's count moves all the time, and a count update to
every watcher each second is what one watch stream per listener costs at the most.

An update is serialised once for everyone who sees the room alike (the audience: stage.basic) and
once for each of the few users who see more (moderators; users with a raised hand or an invitation),
and the same bytes are queued on every stream (the RPC writes them as they are, see `preserialized`).
A stream's queue is bounded: a reader that falls `queue` updates behind loses them and gets one resync
update with the room as it is instead, so a slow reader costs one small queue, never a growing one.
Streams are bounded per user and per process (RESOURCE_EXHAUSTED past either).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from townhall.admission import changes
from townhall.admission.metrics import WATCH_RESYNCS, WATCH_STREAMS, WATCH_UPDATES
from townhall.admission.rooms import RoomBook
from townhall.admission.stage import basic, moderates, shown_to
from townhall.core.auth import Principal
from townhall.core.errors import PermissionDenied, Reason, ResourceExhausted, Unavailable
from townhall.core.tasks import cancel, supervise
from townhall.v1.common_pb2 import Room, RoomCounts, RoomState
from townhall.v1.rooms_pb2 import RoomUpdate

# Why a stream ends (Watch.reason): the room ended (after its last update), the caller was banned, the
# process drains, the room was deleted.
ENDED, BANNED, DRAINING, GONE = "ended", "banned", "draining", "gone"
UPDATE_QUEUE = 8
RETRY_MS = (500, 1_500)

Counts = tuple[int, int]
Handlers = dict[str, grpc.RpcMethodHandler]


class Watch:
    """One WatchRoom stream: a bounded queue of serialised updates."""

    __slots__ = ("_limit", "_queue", "_waiter", "behind", "grants", "reason", "room_id", "user")

    def __init__(self, room_id: str, user: int, grants: frozenset[str], limit: int) -> None:
        self.room_id = room_id
        self.user = user
        self.grants = grants
        self._limit = limit
        self._queue: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        # Updates were dropped: the next one written is a resync of the room as it is.
        self.behind = False
        self.reason: str | None = None

    def push(self, data: bytes) -> None:
        """Queues an update; a full queue is emptied and the stream marked behind instead."""
        if self.reason is not None:
            return
        if self.behind:
            return
        if len(self._queue) >= self._limit:
            self._queue.clear()
            self.behind = True
            WATCH_RESYNCS.inc()
        else:
            self._queue.append(data)
        self._wake()

    def pop(self) -> bytes | None:
        """The next queued update, or None."""
        return self._queue.popleft() if self._queue else None

    @property
    def queued(self) -> int:
        """Updates waiting to be written."""
        return len(self._queue)

    async def wait(self) -> None:
        """Returns once an update is queued, the stream falls behind, or it is closed."""
        if self._queue or self.behind or self.reason is not None:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        await waiter

    def close(self, reason: str, keep: bool = False) -> None:
        """Ends the stream for `reason`; with `keep`, what is queued is written first."""
        if self.reason is not None:
            return
        self.reason = reason
        if not keep:
            self._queue.clear()
            self.behind = False
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Room:
    """One watched room on this process: its streams and what they were last sent."""

    __slots__ = ("handle", "last_sent", "sent", "sent_counts", "snapshots", "watches")

    def __init__(self, room: Room, counts: Counts) -> None:
        self.watches: set[Watch] = set()
        self.sent = room
        self.sent_counts = counts
        self.last_sent = 0.0
        self.handle: asyncio.TimerHandle | None = None
        # Serialised first/resync updates of `sent` for the audience, by resync flag.
        self.snapshots: dict[bool, bytes] = {}


class WatchHub:
    """The WatchRoom streams of this process, by room."""

    def __init__(
        self,
        book: RoomBook,
        listeners: Callable[[str], int],
        interval_s: float,
        counts_s: float,
        max_streams: int,
        per_user: int,
        queue: int = UPDATE_QUEUE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._book = book
        self._listeners = listeners
        self.interval_s = interval_s
        self.counts_s = counts_s
        self.max_streams = max_streams
        self.per_user = per_user
        self._queue = queue
        self._clock = clock
        self._rooms: dict[str, _Room] = {}
        self._by_user: dict[int, int] = {}
        self.streams = 0
        self.draining = False
        self._ticker: asyncio.Task[None] | None = None

    def counts(self, room: Room) -> RoomCounts:
        """The room's live counts now."""
        listeners, speakers = self._counts(room)
        return RoomCounts(listeners=listeners, speakers=speakers)

    def _counts(self, room: Room) -> Counts:
        return self._listeners(room.room_id), 1 + len(room.cohost_ids) + len(room.speaker_ids)

    def open(self, room_id: str, who: Principal) -> Watch:
        """A new stream of the room for `who`, its first update queued; refused past the bounds."""
        room = self._book.get(room_id)
        user = who.user_id
        if user in room.banned_ids:
            raise PermissionDenied(f"user {user} is banned from room {room_id}", reason=Reason.BANNED)
        if self.draining:
            raise drain_error()
        if self.streams >= self.max_streams:
            raise ResourceExhausted(
                f"this admission process serves its limit of {self.max_streams} WatchRoom streams "
                f"(admission.max_watch_streams); retry after {(retry := _retry_ms())} ms (any admission "
                "process serves any room)",
                retry,
                Reason.TOO_MANY_CALLS,
            )
        held = self._by_user.get(user, 0)
        if held >= self.per_user:
            raise ResourceExhausted(
                f"user {user} has {held} WatchRoom streams open on this process; at most {self.per_user} "
                "(admission.max_watch_streams_per_user): close one, or retry after "
                f"{(retry := _retry_ms())} ms",
                retry,
                Reason.TOO_MANY_CALLS,
            )
        watched = self._rooms.get(room_id)
        if watched is None:
            watched = self._rooms[room_id] = _Room(room, self._counts(room))
            watched.last_sent = self._clock()
        watch = Watch(room_id, user, who.grants, self._queue)
        watched.watches.add(watch)
        self._by_user[user] = held + 1
        self.streams += 1
        WATCH_STREAMS.set(self.streams)
        watch.push(self._snapshot(watched, watch, resync=False))
        if watched.sent.state == RoomState.ROOM_STATE_ENDED:
            watch.close(ENDED, keep=True)
        return watch

    def take(self, watch: Watch) -> bytes | None:
        """The next update to write on the stream: a resync if it fell behind; None if none is due."""
        if watch.behind:
            watch.behind = False
            watched = self._rooms.get(watch.room_id)
            if watched is not None:
                return self._snapshot(watched, watch, resync=True)
        return watch.pop()

    def close(self, watch: Watch) -> None:
        """Forgets a stream that ended (for whatever reason)."""
        watched = self._rooms.get(watch.room_id)
        if watched is None or watch not in watched.watches:
            return
        watched.watches.discard(watch)
        held = self._by_user[watch.user] - 1
        if held:
            self._by_user[watch.user] = held
        else:
            del self._by_user[watch.user]
        self.streams -= 1
        WATCH_STREAMS.set(self.streams)
        if not watched.watches:
            if watched.handle is not None:
                watched.handle.cancel()
            del self._rooms[watch.room_id]

    def changed(self, room: Room) -> None:
        """A room version was read from the room-state topic: its watchers here get it."""
        watched = self._rooms.get(room.room_id)
        if watched is not None and room.version != watched.sent.version:
            self._schedule(watched)

    def recount(self) -> None:
        """Sends the counts of every watched room whose counts moved (called every counts_s)."""
        for room_id, watched in list(self._rooms.items()):
            room = self._book.find(room_id)
            if (
                room is None
                or room.version != watched.sent.version
                or self._counts(room) != watched.sent_counts
            ):
                self._schedule(watched)

    def start(self) -> None:
        """Starts looking at the counts every counts_s."""
        self._ticker = supervise(self._tick(), "watch-counts")

    async def close_all(self) -> None:
        """Stops the counts loop."""
        await cancel(self._ticker)

    def drain(self) -> None:
        """Ends every stream (UNAVAILABLE: watch again on another process) and refuses new ones."""
        self.draining = True
        for watched in list(self._rooms.values()):
            for watch in list(watched.watches):
                watch.close(DRAINING)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.counts_s)
            self.recount()

    def _schedule(self, watched: _Room) -> None:
        if watched.handle is not None:
            return
        delay = max(0.0, watched.last_sent + self.interval_s - self._clock())
        loop = asyncio.get_running_loop()
        watched.handle = loop.call_later(delay, self.flush, watched.sent.room_id)

    def flush(self, room_id: str) -> int:
        """Sends the room's watchers what changed since their last update; returns the streams written."""
        watched = self._rooms.get(room_id)
        if watched is None:
            return 0
        watched.handle = None
        room = self._book.find(room_id)
        if room is None:
            for watch in list(watched.watches):
                watch.close(GONE)
            return 0
        counts = self._counts(room)
        before = watched.sent
        if room.version != before.version:
            written = self._send_room(watched, before, room, counts, counts != watched.sent_counts)
        elif counts != watched.sent_counts:
            data = RoomUpdate(counts=RoomCounts(listeners=counts[0], speakers=counts[1])).SerializeToString()
            for watch in watched.watches:
                watch.push(data)
            written = len(watched.watches)
            WATCH_UPDATES.labels("counts").inc(written)
        else:
            return 0
        watched.sent, watched.sent_counts, watched.last_sent = room, counts, self._clock()
        watched.snapshots.clear()
        if room.state == RoomState.ROOM_STATE_ENDED:
            for watch in list(watched.watches):
                watch.close(ENDED, keep=True)
        return written

    def _send_room(self, watched: _Room, before: Room, after: Room, counts: Counts, moved: bool) -> int:
        shown = RoomCounts(listeners=counts[0], speakers=counts[1])
        audience = _update(basic(before), basic(after), shown, moved)
        # Who may see more than the audience does, in either version: the stage's leads (moderators),
        # raised hands and invitations (their own). Everyone else gets the audience's bytes.
        special = set(_seeing_more(before)).union(_seeing_more(after))
        banned = set(after.banned_ids).difference(before.banned_ids) if after.banned_ids else set()
        own: dict[tuple[int, bool], bytes | None] = {}
        written = 0
        for watch in list(watched.watches):
            user = watch.user
            if user in banned:
                watch.close(BANNED)
                continue
            data = audience
            if user in special:
                moderator = moderates(after, user, watch.grants)
                key = (user, moderator)
                if key not in own:
                    own[key] = _update(
                        _view(before, user, moderator), _view(after, user, moderator), shown, moved
                    )
                data = own[key]
            if data is not None:
                watch.push(data)
                written += 1
        WATCH_UPDATES.labels("room").inc(written)
        return written

    def _snapshot(self, watched: _Room, watch: Watch, resync: bool) -> bytes:
        """The room as last sent to the room's watchers, as `watch` may see it."""
        room, user = watched.sent, watch.user
        counts = RoomCounts(listeners=watched.sent_counts[0], speakers=watched.sent_counts[1])
        if user in _seeing_more(room):
            shown = _view(room, user, moderates(room, user, watch.grants))
            return RoomUpdate(room=shown, counts=counts, resync=resync).SerializeToString()
        data = watched.snapshots.get(resync)
        if data is None:
            data = watched.snapshots[resync] = RoomUpdate(
                room=basic(room), counts=counts, resync=resync
            ).SerializeToString()
        return data


def _update(before: Room, after: Room, counts: RoomCounts, moved: bool) -> bytes | None:
    """The update that takes a watcher from `before` to `after`; None if it would show nothing new (a
    change only others see, such as another user's raised hand to the audience: no update for 600k)."""
    happened = changes.events(before, after)
    if not happened and not moved and _alike(before, after):
        return None
    return RoomUpdate(room=after, counts=counts, events=happened).SerializeToString()


def _alike(before: Room, after: Room) -> bool:
    """Whether two views of a room differ in their version only."""
    if before.version == after.version:
        return before == after
    same = Room()
    same.CopyFrom(after)
    same.version = before.version
    return same == before


def _view(room: Room, user: int, moderator: bool) -> Room:
    # shown_to without grants never takes the user for a moderator: the user's own public view.
    return room if moderator else shown_to(room, user, ())


def _seeing_more(room: Room) -> Iterable[int]:
    return (room.host_id, *room.cohost_ids, *room.hand_ids, *room.invited_ids)


def _retry_ms() -> int:
    return random.randint(*RETRY_MS)


def drain_error() -> Unavailable:
    """The status of a stream ended, or refused, because this process drains."""
    return Unavailable(
        "this admission process is shutting down; watch the room again (any process serves it)",
        reason=Reason.DRAINING,
    )


def preserialized(server: grpc.aio.Server, methods: Sequence[str]) -> Any:
    """`server`, registering `methods` (service/method) with an identity response serializer, so their
    handlers write bytes serialised once for many streams."""
    return _PreSerialized(server, frozenset(methods))


class _PreSerialized:
    def __init__(self, server: grpc.aio.Server, methods: frozenset[str]) -> None:
        self._server = server
        self._methods = methods

    def _swap(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> dict[str, grpc.RpcMethodHandler]:
        return {
            name: handler._replace(response_serializer=_identity)
            if f"{service}/{name}" in self._methods
            else handler
            for name, handler in handlers.items()
        }

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(service, self._swap(service, handlers))

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_SwappedGeneric(h, self._methods) for h in handlers))


class _SwappedGeneric(grpc.GenericRpcHandler):
    def __init__(self, handler: grpc.GenericRpcHandler, methods: frozenset[str]) -> None:
        self._handler = handler
        self._methods = methods

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._handler.service(details)
        if handler is not None and details.method.lstrip("/") in self._methods:
            return handler._replace(response_serializer=_identity)
        return handler


def _identity(data: bytes) -> bytes:
    return data
