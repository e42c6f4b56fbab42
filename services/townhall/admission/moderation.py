"""The Moderation servicer: validate, then run a stage rule on the room's owner (forwarded there if need be).

The rules themselves are pure (admission/stage.py); the owner applies one under the room's lock and
answers only once Kafka has acknowledged the new version (RoomStore.change).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import grpc

from townhall.admission import stage
from townhall.admission.cluster import MODERATION, AdmissionCluster
from townhall.admission.servicer import change_on_owner, serve_as_owner, shown
from townhall.admission.store import RoomStore, now_ms
from townhall.core import validation
from townhall.core.auth import MODERATE, PUBLISH, SUBSCRIBE
from townhall.core.errors import InvalidArgument
from townhall.core.identity import caller, require
from townhall.v1 import moderation_pb2 as pb
from townhall.v1 import moderation_pb2_grpc
from townhall.v1.common_pb2 import ROLE_COHOST, ROLE_LISTENER, ROLE_SPEAKER, Role, Room

_ROLES = (ROLE_COHOST, ROLE_SPEAKER, ROLE_LISTENER)


class ModerationServicer(moderation_pb2_grpc.ModerationServicer):
    """The stage calls of a room: each one a room change made on the room's owner."""

    def __init__(self, store: RoomStore, peers: AdmissionCluster, ticket_ttl_s: float) -> None:
        self._store = store
        self._peers = peers
        self._ticket_ttl_ms = int(ticket_ttl_s * 1000)

    async def RaiseHand(self, request: pb.RaiseHandRequest, context: grpc.aio.ServicerContext) -> Room:
        user = require(context, SUBSCRIBE)
        return await self._change(request, context, "hand_raised", lambda room: stage.raise_hand(room, user))

    async def LowerHand(self, request: pb.LowerHandRequest, context: grpc.aio.ServicerContext) -> Room:
        user = caller(context)
        return await self._change(request, context, "hand_lowered", lambda room: stage.lower_hand(room, user))

    async def Invite(self, request: pb.InviteRequest, context: grpc.aio.ServicerContext) -> Room:
        actor = require(context, MODERATE)
        user = validation.user_id(request.user_id)
        return await self._change(request, context, "invited", lambda room: stage.invite(room, actor, user))

    async def AcceptInvite(self, request: pb.AcceptInviteRequest, context: grpc.aio.ServicerContext) -> Room:
        user = require(context, PUBLISH)
        return await self._change(
            request, context, "invite_accepted", lambda room: stage.accept_invite(room, user)
        )

    async def SetRole(self, request: pb.SetRoleRequest, context: grpc.aio.ServicerContext) -> Room:
        actor = require(context, MODERATE)
        user = validation.user_id(request.user_id)
        role = request.role
        if role not in _ROLES:
            names = ", ".join(Role.Name(r) for r in _ROLES)
            raise InvalidArgument(f"role must be one of {names}, not {_role_name(role)}", "role")
        return await self._change(
            request, context, "role_changed", lambda room: stage.set_role(room, actor, user, role)
        )

    async def Mute(self, request: pb.MuteRequest, context: grpc.aio.ServicerContext) -> Room:
        actor = require(context, MODERATE)
        user = validation.user_id(request.user_id)
        muted = request.muted
        change = "muted" if muted else "unmuted"
        return await self._change(request, context, change, lambda room: stage.mute(room, actor, user, muted))

    async def Remove(self, request: pb.RemoveRequest, context: grpc.aio.ServicerContext) -> Room:
        actor = require(context, MODERATE)
        user = validation.user_id(request.user_id)
        ban, ttl_ms = request.ban, self._ticket_ttl_ms
        return await self._change(
            request,
            context,
            "banned" if ban else "removed",
            lambda room: stage.remove(room, actor, user, ban, now_ms(), ttl_ms),
        )

    async def Unban(self, request: pb.UnbanRequest, context: grpc.aio.ServicerContext) -> Room:
        actor = require(context, MODERATE)
        user = validation.user_id(request.user_id)
        return await self._change(request, context, "unbanned", lambda room: stage.unban(room, actor, user))

    async def LeaveStage(self, request: pb.LeaveStageRequest, context: grpc.aio.ServicerContext) -> Room:
        user = caller(context)
        return await self._change(request, context, "left_stage", lambda room: stage.leave_stage(room, user))

    async def _change(
        self, request: Any, context: grpc.aio.ServicerContext, change: str, rule: Callable[[Room], Room]
    ) -> Room:
        """Runs `rule` on the owner: here if this process owns the room (or the call was forwarded here)."""
        room_id = validation.room_id(request.room_id)
        here = functools.partial(self._store.change, room_id, change, rule)
        if self._peers.forwarding.check(context):
            # The whole room: the member that forwarded the call applies it to its replica.
            return await serve_as_owner(self._peers, here)
        method = type(request).__name__.removesuffix("Request")

        async def there(owner: str, timeout_s: float) -> Room:
            room: Room = await getattr(self._peers.moderation(owner), method)(
                request,
                metadata=self._peers.forwarding.forward(context, owner, MODERATION + method),
                timeout=timeout_s,
            )
            return room

        return shown(context, await change_on_owner(self._peers, self._store, room_id, here, there))


def _role_name(role: int) -> str:
    try:
        return Role.Name(role)  # type: ignore[arg-type]
    except ValueError:
        return str(role)
