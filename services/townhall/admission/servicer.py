"""Thin gRPC servicers for Rooms and Admission: validate, call the logic, map the result."""

from __future__ import annotations

import time
from collections.abc import Awaitable

import grpc

from townhall.admission.capacity import Capacity
from townhall.admission.cluster import FORWARD_TIMEOUT_S, Peers
from townhall.admission.joins import Admitter
from townhall.admission.metrics import JOIN_DURATION, JOINS_REJECTED
from townhall.admission.rooms import MAX_LISTENER_LIMIT, MAX_SPEAKERS, new_room_id
from townhall.admission.stage import listed
from townhall.admission.store import RoomStore
from townhall.core import validation
from townhall.core.auth import HOST
from townhall.core.errors import InvalidArgument, from_rpc
from townhall.core.identity import caller, principal, require
from townhall.v1 import admission_pb2, admission_pb2_grpc, internal_pb2_grpc, rooms_pb2, rooms_pb2_grpc
from townhall.v1.common_pb2 import Room
from townhall.v1.internal_pb2 import AcquireRequest, AcquireResponse, ForwardedCreate

LIST_DEFAULT, LIST_MAX = 50, 500
TIMEOUT = FORWARD_TIMEOUT_S


# How far ahead a room may be scheduled: 30 days.
MAX_SCHEDULE_AHEAD_MS = 30 * 24 * 3600 * 1000


class RoomsServicer(rooms_pb2_grpc.RoomsServicer):
    """Room lifecycle: owner-only changes run on the room's owner (forwarded there if need be)."""

    def __init__(self, store: RoomStore, admitter: Admitter, peers: Peers) -> None:
        self._store = store
        self._admitter = admitter
        self._peers = peers

    async def CreateRoom(
        self, request: rooms_pb2.CreateRoomRequest, context: grpc.aio.ServicerContext
    ) -> Room:
        host = require(context, HOST)
        title = validation.title(request.title)
        speakers = validation.user_ids(request.speaker_ids, "speaker_ids", MAX_SPEAKERS)
        if host in speakers:
            raise InvalidArgument("speaker_ids must not include the host (the caller)")
        limit = validation.bounded(request.listener_limit, "listener_limit", 0, MAX_LISTENER_LIMIT)
        # The id decides the owner, so it is picked here, before the room exists anywhere.
        room_id = new_room_id()
        owner = self._peers.owner(room_id)
        if owner == self._peers.me:
            return await self._store.create(host, title, speakers, limit, room_id)
        forward = ForwardedCreate(room_id=room_id, host_id=host, request=request)
        return self._learn(
            await _forward(
                self._peers.owner_api(owner).CreateRoom(
                    forward, metadata=self._peers.forwarding.internal(), timeout=TIMEOUT, wait_for_ready=True
                )
            )
        )

    async def StartRoom(self, request: rooms_pb2.StartRoomRequest, context: grpc.aio.ServicerContext) -> Room:
        user = require(context, HOST)
        room_id = validation.room_id(request.room_id)
        if self._serve_here(room_id, context):
            return await self._store.start(room_id, user)
        stub = self._peers.rooms(self._peers.owner(room_id))
        return self._learn(
            await _forward(
                stub.StartRoom(
                    request,
                    metadata=self._peers.forwarding.forward(context),
                    timeout=TIMEOUT,
                    wait_for_ready=True,
                )
            )
        )

    async def ScheduleRoom(
        self, request: rooms_pb2.ScheduleRoomRequest, context: grpc.aio.ServicerContext
    ) -> Room:
        user = require(context, HOST)
        room_id = validation.room_id(request.room_id)
        now = int(time.time() * 1000)
        validation.bounded(request.start_at_ms, "start_at_ms", now + 1, now + MAX_SCHEDULE_AHEAD_MS)
        if self._serve_here(room_id, context):
            return await self._store.schedule(room_id, user, request.start_at_ms)
        stub = self._peers.rooms(self._peers.owner(room_id))
        return self._learn(
            await _forward(
                stub.ScheduleRoom(
                    request,
                    metadata=self._peers.forwarding.forward(context),
                    timeout=TIMEOUT,
                    wait_for_ready=True,
                )
            )
        )

    async def EndRoom(self, request: rooms_pb2.EndRoomRequest, context: grpc.aio.ServicerContext) -> Room:
        user = require(context, HOST)
        room_id = validation.room_id(request.room_id)
        if self._serve_here(room_id, context):
            room = await self._store.end(room_id, user)
        else:
            stub = self._peers.rooms(self._peers.owner(room_id))
            room = self._learn(
                await _forward(
                    stub.EndRoom(
                        request,
                        metadata=self._peers.forwarding.forward(context),
                        timeout=TIMEOUT,
                        wait_for_ready=True,
                    )
                )
            )
        self._admitter.forget_ended()
        return room

    def _serve_here(self, room_id: str, context: grpc.aio.ServicerContext) -> bool:
        """Owner-only work runs here if this process owns the room or the call was forwarded to it."""
        return self._peers.is_owner(room_id) or self._peers.forwarding.check(context)

    def _learn(self, room: Room) -> Room:
        # The owner's answer is applied here at once, so the caller reads its own change from this process.
        self._store.book.apply(room)
        return room

    async def GetRoom(self, request: rooms_pb2.GetRoomRequest, context: grpc.aio.ServicerContext) -> Room:
        return self._store.book.get(validation.room_id(request.room_id))

    async def ListLiveRooms(
        self, request: rooms_pb2.ListLiveRoomsRequest, context: grpc.aio.ServicerContext
    ) -> rooms_pb2.ListLiveRoomsResponse:
        limit = validation.bounded(request.limit, "limit", 0, LIST_MAX) or LIST_DEFAULT
        return rooms_pb2.ListLiveRoomsResponse(rooms=[listed(r) for r in self._store.book.live()[:limit]])


class AdmissionServicer(admission_pb2_grpc.AdmissionServicer):
    """Joins and leaves, decided from local state only."""

    def __init__(self, admitter: Admitter) -> None:
        self._admitter = admitter

    async def Join(
        self, request: admission_pb2.JoinRequest, context: grpc.aio.ServicerContext
    ) -> admission_pb2.JoinResponse:
        start = time.perf_counter()
        try:
            who = principal(context)
            room_id = validation.room_id(request.room_id)
        except Exception:
            JOINS_REJECTED.inc()
            raise
        try:
            return self._admitter.join(room_id, who)
        finally:
            JOIN_DURATION.observe(time.perf_counter() - start)

    async def Leave(
        self, request: admission_pb2.LeaveRequest, context: grpc.aio.ServicerContext
    ) -> admission_pb2.LeaveResponse:
        user = caller(context)
        self._admitter.leave(validation.room_id(request.room_id), user)
        return admission_pb2.LeaveResponse()


class OwnerServicer(internal_pb2_grpc.OwnerServicer):
    """Room creations forwarded by other members to this one, the owner of the new room's id."""

    def __init__(self, store: RoomStore) -> None:
        self._store = store

    async def CreateRoom(self, request: ForwardedCreate, context: grpc.aio.ServicerContext) -> Room:
        create = request.request
        room_id = validation.room_id(request.room_id)
        speakers = validation.user_ids(create.speaker_ids, "speaker_ids", MAX_SPEAKERS)
        title = validation.title(create.title)
        limit = validation.bounded(create.listener_limit, "listener_limit", 0, MAX_LISTENER_LIMIT)
        return await self._store.create(request.host_id, title, speakers, limit, room_id)


class LeasesServicer(internal_pb2_grpc.LeasesServicer):
    """Capacity leases of the rooms this member owns."""

    def __init__(self, capacity: Capacity) -> None:
        self._capacity = capacity

    async def Acquire(self, request: AcquireRequest, context: grpc.aio.ServicerContext) -> AcquireResponse:
        validation.room_id(request.room_id)
        return self._capacity.grant(request)


async def _forward(call: Awaitable[Room]) -> Room:
    """Awaits a call to the owner; its failure becomes this call's failure, with the same status."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise from_rpc(exc) from exc
