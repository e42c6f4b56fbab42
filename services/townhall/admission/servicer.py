"""Thin gRPC servicers for Rooms and Admission: validate, call the logic, map the result."""

from __future__ import annotations

import time

import grpc

from townhall.admission.joins import Admitter
from townhall.admission.metrics import JOIN_DURATION, JOINS
from townhall.admission.rooms import MAX_LISTENER_LIMIT, MAX_SPEAKERS
from townhall.admission.store import RoomStore
from townhall.core import validation
from townhall.core.errors import InvalidArgument
from townhall.core.identity import caller
from townhall.v1 import admission_pb2, admission_pb2_grpc, rooms_pb2, rooms_pb2_grpc
from townhall.v1.common_pb2 import Room

LIST_DEFAULT, LIST_MAX = 50, 500


class RoomsServicer(rooms_pb2_grpc.RoomsServicer):
    """Room lifecycle: every change is acknowledged by Kafka before it is answered."""

    def __init__(self, store: RoomStore, admitter: Admitter) -> None:
        self._store = store
        self._admitter = admitter

    async def CreateRoom(
        self, request: rooms_pb2.CreateRoomRequest, context: grpc.aio.ServicerContext
    ) -> Room:
        host = caller(context)
        title = validation.title(request.title)
        speakers = validation.user_ids(request.speaker_ids, "speaker_ids", MAX_SPEAKERS)
        if host in speakers:
            raise InvalidArgument("speaker_ids must not include the host (the caller)")
        limit = validation.bounded(request.listener_limit, "listener_limit", 0, MAX_LISTENER_LIMIT)
        return await self._store.create(host, title, speakers, limit)

    async def StartRoom(self, request: rooms_pb2.StartRoomRequest, context: grpc.aio.ServicerContext) -> Room:
        user = caller(context)
        return await self._store.start(validation.room_id(request.room_id), user)

    async def EndRoom(self, request: rooms_pb2.EndRoomRequest, context: grpc.aio.ServicerContext) -> Room:
        user = caller(context)
        room = await self._store.end(validation.room_id(request.room_id), user)
        self._admitter.forget_ended()
        return room

    async def GetRoom(self, request: rooms_pb2.GetRoomRequest, context: grpc.aio.ServicerContext) -> Room:
        return self._store.book.get(validation.room_id(request.room_id))

    async def ListLiveRooms(
        self, request: rooms_pb2.ListLiveRoomsRequest, context: grpc.aio.ServicerContext
    ) -> rooms_pb2.ListLiveRoomsResponse:
        limit = validation.bounded(request.limit, "limit", 0, LIST_MAX) or LIST_DEFAULT
        return rooms_pb2.ListLiveRoomsResponse(rooms=self._store.book.live()[:limit])


class AdmissionServicer(admission_pb2_grpc.AdmissionServicer):
    """Joins and leaves, decided from local state only."""

    def __init__(self, admitter: Admitter) -> None:
        self._admitter = admitter

    async def Join(
        self, request: admission_pb2.JoinRequest, context: grpc.aio.ServicerContext
    ) -> admission_pb2.JoinResponse:
        start = time.perf_counter()
        try:
            user = caller(context)
            room_id = validation.room_id(request.room_id)
        except Exception:
            JOINS.labels("rejected").inc()
            raise
        try:
            return self._admitter.join(room_id, user)
        finally:
            JOIN_DURATION.observe(time.perf_counter() - start)

    async def Leave(
        self, request: admission_pb2.LeaveRequest, context: grpc.aio.ServicerContext
    ) -> admission_pb2.LeaveResponse:
        user = caller(context)
        self._admitter.leave(validation.room_id(request.room_id), user)
        return admission_pb2.LeaveResponse()
