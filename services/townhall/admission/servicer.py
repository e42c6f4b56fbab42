"""Thin gRPC servicers for Rooms and Admission: validate, call the logic, map the result."""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from townhall.admission.capacity import MAX_MORE_ROOMS, Capacity
from townhall.admission.cluster import FORWARD_TIMEOUT_S, OWNER_CREATE, ROOMS, AdmissionCluster
from townhall.admission.joins import Admitter
from townhall.admission.metrics import (
    FORWARD_RETRIES,
    JOINS_ADMITTED,
    JOINS_REJECTED,
    JOINS_SHED,
    JOINS_WAITING,
)
from townhall.admission.rooms import MAX_LISTENER_LIMIT, MAX_SPEAKERS, live_order, new_room_id, room_id_for
from townhall.admission.stage import basic, shown_to
from townhall.admission.store import RoomStore
from townhall.admission.watch import BANNED, DRAINING, GONE, WatchHub, drain_error
from townhall.core import pages, validation
from townhall.core.auth import HOST
from townhall.core.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    TownhallError,
    Unavailable,
)
from townhall.core.forwarding import on_owner
from townhall.core.identity import caller, principal, require, service_caller
from townhall.internal.v1 import internal_pb2_grpc
from townhall.internal.v1.internal_pb2 import AcquireRequest, AcquireResponse, ForwardedCreate
from townhall.v1 import admission_pb2, admission_pb2_grpc, rooms_pb2, rooms_pb2_grpc
from townhall.v1.common_pb2 import Room

LIST_DEFAULT, LIST_MAX = 50, 500
# What a ListLiveRooms page token belongs to (core/pages.py): the list, in its one view (BASIC).
LIVE_ROOMS = "townhall.v1.Rooms/ListLiveRooms"
WATCH_ROOM = "townhall.v1.Rooms/WatchRoom"


# Admits one member may say it holds of one room (a sanity bound, not a limit anyone reaches).
MAX_HELD = 2**40
# How far ahead a room may be scheduled: 30 days.
MAX_SCHEDULE_AHEAD_MS = 30 * 24 * 3600 * 1000


class RoomsServicer(rooms_pb2_grpc.RoomsServicer):
    """Room lifecycle: owner-only changes run on the room's owner (forwarded there if need be)."""

    def __init__(
        self, store: RoomStore, admitter: Admitter, peers: AdmissionCluster, watches: WatchHub
    ) -> None:
        self._store = store
        self._admitter = admitter
        self._peers = peers
        self._watches = watches

    async def CreateRoom(
        self, request: rooms_pb2.CreateRoomRequest, context: grpc.aio.ServicerContext
    ) -> Room:
        host = require(context, HOST)
        title = validation.title(request.title)
        speakers = validation.user_ids(request.speaker_ids, "speaker_ids", MAX_SPEAKERS)
        if host in speakers:
            raise InvalidArgument("speaker_ids must not include the host (the caller)", "speaker_ids")
        limit = validation.bounded(request.listener_limit, "listener_limit", 0, MAX_LISTENER_LIMIT)
        key = validation.request_id(request.request_id)
        # The id decides the owner, so it is picked here, before the room exists anywhere; with an
        # idempotency key it is the same on every attempt, so a repeated create finds the first room.
        room_id = room_id_for(host, key) if key else new_room_id()
        forward = ForwardedCreate(room_id=room_id, host_id=host, request=request)
        room = await change_on_owner(
            self._peers,
            self._store,
            room_id,
            lambda: self._store.create(host, title, speakers, limit, room_id, replay=bool(key)),
            lambda owner, timeout: self._peers.owner_api(owner).CreateRoom(
                forward, metadata=self._peers.forwarding.internal(owner, OWNER_CREATE), timeout=timeout
            ),
        )
        return shown(context, room)

    async def StartRoom(self, request: rooms_pb2.StartRoomRequest, context: grpc.aio.ServicerContext) -> Room:
        user = require(context, HOST)
        room_id = validation.room_id(request.room_id)
        return await self._owner_only(
            room_id,
            context,
            lambda: self._store.start(room_id, user),
            lambda owner, timeout: self._peers.rooms(owner).StartRoom(
                request,
                metadata=self._peers.forwarding.forward(context, owner, ROOMS + "StartRoom"),
                timeout=timeout,
            ),
        )

    async def ScheduleRoom(
        self, request: rooms_pb2.ScheduleRoomRequest, context: grpc.aio.ServicerContext
    ) -> Room:
        user = require(context, HOST)
        room_id = validation.room_id(request.room_id)
        now = int(time.time() * 1000)
        validation.bounded(request.start_at_ms, "start_at_ms", now + 1, now + MAX_SCHEDULE_AHEAD_MS)
        return await self._owner_only(
            room_id,
            context,
            lambda: self._store.schedule(room_id, user, request.start_at_ms),
            lambda owner, timeout: self._peers.rooms(owner).ScheduleRoom(
                request,
                metadata=self._peers.forwarding.forward(context, owner, ROOMS + "ScheduleRoom"),
                timeout=timeout,
            ),
        )

    async def EndRoom(self, request: rooms_pb2.EndRoomRequest, context: grpc.aio.ServicerContext) -> Room:
        user = require(context, HOST)
        room_id = validation.room_id(request.room_id)
        room = await self._owner_only(
            room_id,
            context,
            lambda: self._store.end(room_id, user),
            lambda owner, timeout: self._peers.rooms(owner).EndRoom(
                request,
                metadata=self._peers.forwarding.forward(context, owner, ROOMS + "EndRoom"),
                timeout=timeout,
            ),
        )
        self._admitter.forget_ended()
        return room

    async def _owner_only(
        self,
        room_id: str,
        context: grpc.aio.ServicerContext,
        here: Callable[[], Awaitable[Room]],
        there: Callable[[str, float], Awaitable[Room]],
    ) -> Room:
        """A change of an existing room: served here if forwarded here, else on the room's owner."""
        if self._peers.forwarding.check(context):
            # A member that takes this process for the owner sent it: serve it, unless handing over.
            # The whole room: the member applies it to its replica, and shows the caller its part.
            return await serve_as_owner(self._peers, here)
        return shown(context, await change_on_owner(self._peers, self._store, room_id, here, there))

    async def GetRoom(self, request: rooms_pb2.GetRoomRequest, context: grpc.aio.ServicerContext) -> Room:
        # The view is a RoomView: core/decoding.py refuses a number the enum does not define.
        room = self._store.book.get(validation.room_id(request.room_id))
        shown_room = basic(room) if request.view == rooms_pb2.ROOM_VIEW_BASIC else shown(context, room)
        return self._counted(shown_room)

    async def ListLiveRooms(
        self, request: rooms_pb2.ListLiveRoomsRequest, context: grpc.aio.ServicerContext
    ) -> rooms_pb2.ListLiveRoomsResponse:
        if request.view == rooms_pb2.ROOM_VIEW_FULL:
            raise InvalidArgument(
                "view ROOM_VIEW_FULL is for GetRoom only: lists carry no bans, removals, hands or "
                "invitations",
                "view",
            )
        # The deprecated limit (0.1.0's field) stands in for page_size when a client sends only it.
        size = pages.page_size(request.page_size or request.limit, LIST_DEFAULT, LIST_MAX)
        after = _live_key(pages.unseal(request.page_token, LIVE_ROOMS)) if request.page_token else None
        rooms, more = self._store.book.live_page(after, size)
        token = pages.seal(LIVE_ROOMS, _live_token_key(rooms[-1])) if more else ""
        return rooms_pb2.ListLiveRoomsResponse(
            rooms=[self._counted(basic(r)) for r in rooms], next_page_token=token
        )

    async def WatchRoom(  # type: ignore[override]
        self, request: rooms_pb2.WatchRoomRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Streams the room's updates, serialised once per room and view (admission/watch.py)."""
        room_id = validation.room_id(request.room_id)
        watches = self._watches
        watch = watches.open(room_id, principal(context))
        try:
            while True:
                data = watches.take(watch)
                if data is None:
                    if watch.reason is not None:
                        break
                    await watch.wait()
                    continue
                yield data
        finally:
            watches.close(watch)
        if watch.reason == BANNED:
            raise PermissionDenied(f"user {watch.user} is banned from room {room_id}")
        if watch.reason == DRAINING:
            raise drain_error()
        if watch.reason == GONE:
            raise NotFound(f"room {room_id} does not exist any more")

    def _counted(self, room: Room) -> Room:
        """A copy of the room with its live counts."""
        counted = Room()
        counted.CopyFrom(room)
        counted.counts.CopyFrom(self._watches.counts(room))
        return counted


class AdmissionServicer(admission_pb2_grpc.AdmissionServicer):
    """Joins and leaves, decided from local state only."""

    def __init__(self, admitter: Admitter) -> None:
        self._admitter = admitter

    async def Join(
        self, request: admission_pb2.JoinRequest, context: grpc.aio.ServicerContext
    ) -> admission_pb2.JoinResponse:
        # Each outcome is counted here, once; the RPC interceptor times the call.
        try:
            who = principal(context)
            response = self._admitter.join(validation.room_id(request.room_id), who, request.min_room_version)
        except ResourceExhausted:
            JOINS_SHED.inc()
            raise
        except TownhallError:
            JOINS_REJECTED.inc()
            raise
        (JOINS_ADMITTED if response.HasField("grant") else JOINS_WAITING).inc()
        return response

    async def Leave(
        self, request: admission_pb2.LeaveRequest, context: grpc.aio.ServicerContext
    ) -> admission_pb2.LeaveResponse:
        user = caller(context)
        self._admitter.leave(validation.room_id(request.room_id), user)
        return admission_pb2.LeaveResponse()


class OwnerServicer(internal_pb2_grpc.OwnerServicer):
    """Room creations forwarded by other members to this one, the owner of the new room's id."""

    def __init__(self, store: RoomStore, peers: AdmissionCluster) -> None:
        self._store = store
        self._peers = peers

    async def CreateRoom(self, request: ForwardedCreate, context: grpc.aio.ServicerContext) -> Room:
        create = request.request
        room_id = validation.room_id(request.room_id)
        host = validation.user_id(request.host_id, "host_id")
        speakers = validation.user_ids(create.speaker_ids, "request.speaker_ids", MAX_SPEAKERS)
        if host in speakers:
            raise InvalidArgument(
                "request.speaker_ids must not include the host (host_id)", "request.speaker_ids"
            )
        title = validation.title(create.title, "request.title")
        limit = validation.bounded(create.listener_limit, "request.listener_limit", 0, MAX_LISTENER_LIMIT)
        replay = bool(validation.request_id(create.request_id))
        return await serve_as_owner(
            self._peers,
            lambda: self._store.create(host, title, speakers, limit, room_id, replay=replay),
        )


class LeasesServicer(internal_pb2_grpc.LeasesServicer):
    """Capacity leases of the rooms this member owns."""

    def __init__(self, capacity: Capacity) -> None:
        self._capacity = capacity

    async def Acquire(self, request: AcquireRequest, context: grpc.aio.ServicerContext) -> AcquireResponse:
        validation.room_id(request.room_id)
        validation.address(request.member, "member")
        calling = service_caller()
        if request.member != calling.member:
            # The book counts admits per member: a member reports its own, never another's.
            raise PermissionDenied(
                f"member is {request.member!r}, but the service credential is "
                f"{calling.kind}@{calling.member}'s"
            )
        # count is a uint32; held counts listeners of one room: far below 2^40 in any deployment.
        validation.bounded(request.held, "held", 0, MAX_HELD)
        if len(request.more) > MAX_MORE_ROOMS:
            raise InvalidArgument(f"more names {len(request.more)} rooms; at most {MAX_MORE_ROOMS}", "more")
        rooms = {request.room_id}
        for index, ask in enumerate(request.more):
            validation.room_id(ask.room_id, f"more[{index}].room_id")
            validation.bounded(ask.held, f"more[{index}].held", 0, MAX_HELD)
            if ask.room_id in rooms:
                # The book takes `held` as the member's whole holding: a room twice would drop a grant.
                raise InvalidArgument(f"more[{index}]: room {ask.room_id} is asked for twice", "more")
            rooms.add(ask.room_id)
        return self._capacity.grant_all(request)


def _live_token_key(room: Room) -> bytes:
    """A live room's place in ListLiveRooms (rooms.live_order) as a page token's key."""
    started, room_id = live_order(room)
    return struct.pack(">q", started) + room_id.encode("ascii")


def _live_key(key: bytes) -> tuple[int, str]:
    """The place in ListLiveRooms a page token's key names (checked: the token could be any we made)."""
    if len(key) < 8:
        raise InvalidArgument(
            "page_token does not name a place in the live rooms: start again without it", "page_token"
        )
    (started,) = struct.unpack(">q", key[:8])
    return started, key[8:].decode("ascii", "replace")


def shown(context: grpc.aio.ServicerContext, room: Room) -> Room:
    """The room as the caller may see it: bans, raised hands and invitations only to its moderators."""
    who = principal(context)
    return shown_to(room, who.user_id, who.grants)


async def change_on_owner(
    peers: AdmissionCluster,
    store: RoomStore,
    room_id: str,
    here: Callable[[], Awaitable[Room]],
    there: Callable[[str, float], Awaitable[Room]],
) -> Room:
    """Runs a room change on the room's owner: here, or forwarded under the one forwarding policy
    (core/forwarding.py: retried at the owner of the moment while it answers UNAVAILABLE, for up to
    FORWARD_TIMEOUT_S); the owner's answer is applied to this replica at once."""

    def owner() -> str | None:
        member = peers.owner(room_id)
        return None if member == peers.me else member

    async def forwarded(member: str, timeout_s: float) -> Room:
        room = await there(member, timeout_s)
        # Applied here at once, so the caller reads its own change from this process.
        store.book.apply(room)
        return room

    return await on_owner(owner, here, forwarded, FORWARD_TIMEOUT_S, FORWARD_RETRIES.inc)


async def serve_as_owner(peers: AdmissionCluster, change: Callable[[], Awaitable[Room]]) -> Room:
    """Makes a change sent here by another member, unless this process is handing its rooms over."""
    if peers.leaving:
        # The sender tries again and, once it sees this process go, sends it to the next owner.
        raise Unavailable(
            "this admission process is handing its rooms over to the next owner; retry",
            reason=Reason.DRAINING,
        )
    return await change()
