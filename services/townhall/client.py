"""A small asyncio client for Townhall, used by the CLI, the demo, the load generator and tests."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from townhall.core.auth import bearer
from townhall.core.channels import channel as open_channel
from townhall.core.config import TlsConfig
from townhall.core.tickets import TICKET_KEY
from townhall.v1 import (
    admission_pb2,
    admission_pb2_grpc,
    graph_pb2,
    graph_pb2_grpc,
    inbox_pb2,
    inbox_pb2_grpc,
    moderation_pb2,
    moderation_pb2_grpc,
    relay_pb2,
    relay_pb2_grpc,
    rooms_pb2,
    rooms_pb2_grpc,
)
from townhall.v1.common_pb2 import Role, Room

_Seen = TypeVar("_Seen", Room, inbox_pb2.Notification)
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 4 * 1024 * 1024)]
# Statuses an overloaded server's transport answers without a retry-after, and the backoff for them.
_BUSY = (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
BUSY_RETRY_S = (1.0, 3.0)


def channel(address: str, tls: TlsConfig) -> grpc.aio.Channel:
    """A channel to a Townhall service, with TLS when [tls] says so."""
    return open_channel(address, tls, _CHANNEL_OPTIONS)


def now_us() -> int:
    """Wall-clock Unix microseconds, the unit of capture timestamps."""
    return time.time_ns() // 1_000


@dataclass
class Endpoints:
    """Where the services are."""

    admission: str
    notifier: str
    # How to dial them (and the relays their grants name).
    tls: TlsConfig = field(default_factory=TlsConfig)
    # Admission's crowd lane (joins of rooms that draw a crowd); empty: they join on `admission`.
    crowd: str = ""


class Client:
    """One user's view of Townhall; every call carries the user's token."""

    def __init__(self, endpoints: Endpoints, user: int, token: str) -> None:
        self.user = user
        self._tls = endpoints.tls
        self._metadata = bearer(token)
        self._admission = channel(endpoints.admission, self._tls)
        self._notifier = channel(endpoints.notifier, self._tls)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.rooms = rooms_pb2_grpc.RoomsStub(self._admission)
        self.moderation = moderation_pb2_grpc.ModerationStub(self._admission)
        self.admission = admission_pb2_grpc.AdmissionStub(self._admission)
        self.crowd_admission = self.admission
        if endpoints.crowd:
            self._channels[endpoints.crowd] = channel(endpoints.crowd, self._tls)
            self.crowd_admission = admission_pb2_grpc.AdmissionStub(self._channels[endpoints.crowd])
        # Rooms this client has seen marked crowd (in a Room or a notification): joined on the crowd lane.
        self.crowd_rooms: set[str] = set()
        self.graph = graph_pb2_grpc.GraphStub(self._notifier)
        self.inbox = inbox_pb2_grpc.InboxStub(self._notifier)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call of this user carries (its token), for calls made on the stubs."""
        return self._metadata

    async def close(self) -> None:
        """Closes every channel."""
        for ch in (self._admission, self._notifier, *self._channels.values()):
            await ch.close()

    async def create_room(self, title: str, speakers: Iterable[int] = (), listener_limit: int = 0) -> Room:
        """Creates a room hosted by this user."""
        request = rooms_pb2.CreateRoomRequest(
            title=title, speaker_ids=list(speakers), listener_limit=listener_limit
        )
        return await self.rooms.CreateRoom(request, metadata=self._metadata, timeout=15)

    async def live_rooms(self, limit: int = 100) -> list[Room]:
        """Live rooms, newest first."""
        request = rooms_pb2.ListLiveRoomsRequest(limit=limit)
        reply = await self.rooms.ListLiveRooms(request, metadata=self._metadata, timeout=10)
        return [self.learn(room) for room in reply.rooms]

    async def start_room(self, room_id: str) -> Room:
        """Starts this user's room."""
        request = rooms_pb2.StartRoomRequest(room_id=room_id)
        return self.learn(await self.rooms.StartRoom(request, metadata=self._metadata, timeout=15))

    async def get_room(self, room_id: str) -> Room:
        """A room as this process knows it."""
        request = rooms_pb2.GetRoomRequest(room_id=room_id)
        return self.learn(await self.rooms.GetRoom(request, metadata=self._metadata, timeout=10))

    def learn(self, room: _Seen) -> _Seen:
        """Remembers whether a room draws a crowd (from a Room or a notification), for `join`."""
        if room.crowd:
            self.crowd_rooms.add(room.room_id)
        return room

    async def end_room(self, room_id: str) -> Room:
        """Ends this user's room."""
        request = rooms_pb2.EndRoomRequest(room_id=room_id)
        return await self.rooms.EndRoom(request, metadata=self._metadata, timeout=15)

    # The stage and moderation (moderation.proto): each returns the room's new version.

    async def raise_hand(self, room_id: str) -> Room:
        """Asks to speak."""
        return await self._moderate("RaiseHand", moderation_pb2.RaiseHandRequest(room_id=room_id))

    async def lower_hand(self, room_id: str) -> Room:
        """Withdraws a raised hand, or declines an invitation to speak."""
        return await self._moderate("LowerHand", moderation_pb2.LowerHandRequest(room_id=room_id))

    async def invite(self, room_id: str, user: int) -> Room:
        """Invites a user to speak (a raised hand is approved at once). Host and co-hosts."""
        return await self._moderate("Invite", moderation_pb2.InviteRequest(room_id=room_id, user_id=user))

    async def accept_invite(self, room_id: str) -> Room:
        """Accepts an invitation to speak (then join again for a stage ticket)."""
        return await self._moderate("AcceptInvite", moderation_pb2.AcceptInviteRequest(room_id=room_id))

    async def set_role(self, room_id: str, user: int, role: Role.ValueType) -> Room:
        """Makes a user a co-host, a speaker or a listener. Host and co-hosts."""
        request = moderation_pb2.SetRoleRequest(room_id=room_id, user_id=user, role=role)
        return await self._moderate("SetRole", request)

    async def mute(self, room_id: str, user: int, muted: bool = True) -> Room:
        """Mutes (or unmutes) a stage member. Host and co-hosts."""
        request = moderation_pb2.MuteRequest(room_id=room_id, user_id=user, muted=muted)
        return await self._moderate("Mute", request)

    async def remove(self, room_id: str, user: int, ban: bool = False) -> Room:
        """Removes a user from the room, and bans them with `ban`. Host and co-hosts."""
        request = moderation_pb2.RemoveRequest(room_id=room_id, user_id=user, ban=ban)
        return await self._moderate("Remove", request)

    async def unban(self, room_id: str, user: int) -> Room:
        """Lifts a ban. Host and co-hosts."""
        return await self._moderate("Unban", moderation_pb2.UnbanRequest(room_id=room_id, user_id=user))

    async def leave_stage(self, room_id: str) -> Room:
        """Steps off the stage (co-hosts and speakers) to listen."""
        return await self._moderate("LeaveStage", moderation_pb2.LeaveStageRequest(room_id=room_id))

    async def _moderate(self, method: str, request: object) -> Room:
        room: Room = await getattr(self.moderation, method)(request, metadata=self._metadata, timeout=15)
        return self.learn(room)

    async def follow(self, followee: int) -> bool:
        """Follows a user; True if the follow is new."""
        request = graph_pb2.FollowRequest(followee_id=followee)
        reply = await self.graph.Follow(request, metadata=self._metadata, timeout=10)
        return reply.created

    async def join(self, room_id: str, give_up_after_s: float = 30.0) -> admission_pb2.Grant:
        """Joins a room, honouring retry-after when the room is full or the server is busy.

        A room known to draw a crowd is joined on admission's crowd lane, where its storm is shed.
        """
        deadline = time.monotonic() + give_up_after_s
        stub = self.crowd_admission if room_id in self.crowd_rooms else self.admission
        while True:
            try:
                reply = await stub.Join(
                    admission_pb2.JoinRequest(room_id=room_id), metadata=self._metadata, timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    delay_s = retry_after_s(exc)
                elif exc.code() in _BUSY:
                    # Cancelled by an overloaded server's transport before it could answer: back off
                    # with jitter, as a shed client would, so retries do not arrive in step.
                    delay_s = random.uniform(*BUSY_RETRY_S)
                else:
                    raise
            else:
                if reply.HasField("grant"):
                    return reply.grant
                delay_s = reply.waiting.retry_after_ms / 1000
            if time.monotonic() + delay_s > deadline:
                raise TimeoutError(f"not admitted to room {room_id} within {give_up_after_s:.0f} s")
            await asyncio.sleep(delay_s)

    async def leave(self, room_id: str) -> None:
        """Leaves a room."""
        await self.admission.Leave(
            admission_pb2.LeaveRequest(room_id=room_id), metadata=self._metadata, timeout=10
        )

    def relay(
        self, grant: admission_pb2.Grant
    ) -> tuple[relay_pb2_grpc.RelayStub, tuple[tuple[str, str], ...]]:
        """The relay stub for a grant and the metadata that carries its ticket."""
        ch = self._channels.get(grant.relay_address)
        if ch is None:
            ch = self._channels[grant.relay_address] = channel(grant.relay_address, self._tls)
        return relay_pb2_grpc.RelayStub(ch), ((TICKET_KEY, grant.ticket),)

    async def publish(self, grant: admission_pb2.Grant, payloads: Iterable[bytes], frame_ms: int = 20) -> int:
        """Streams payloads as frames at real-time pace; returns how many the relay accepted."""
        stub, md = self.relay(grant)

        async def frames() -> AsyncIterator[relay_pb2.AudioFrame]:
            start = time.monotonic()
            for seq, payload in enumerate(payloads):
                # Pace against the start time, so scheduling hiccups do not accumulate as drift.
                delay = start + seq * frame_ms / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                yield relay_pb2.AudioFrame(sequence=seq, capture_ts_us=now_us(), payload=payload)

        try:
            summary = await stub.Publish(frames(), metadata=md)
        except grpc.aio.AioRpcError as exc:
            raise await publish_status(stub, md, exc) from None
        return int(summary.frames_accepted)

    def subscribe(
        self, grant: admission_pb2.Grant, room_id: str, resume_after: int = 0
    ) -> grpc.aio.UnaryStreamCall:
        """The room's chunk stream on the granted relay."""
        stub, md = self.relay(grant)
        return stub.Subscribe(
            relay_pb2.SubscribeRequest(room_id=room_id, resume_after=resume_after), metadata=md
        )

    def notifications(self) -> grpc.aio.UnaryStreamCall:
        """This user's Inbox stream."""
        return self.inbox.Subscribe(inbox_pb2.InboxSubscribeRequest(), metadata=self._metadata)


async def publish_status(
    stub: relay_pb2_grpc.RelayStub, metadata: tuple[tuple[str, str], ...], error: grpc.aio.AioRpcError
) -> grpc.aio.AioRpcError:
    """The relay's own status for a Publish that failed, when grpc.aio lost it.

    A frame written as the relay ends the stream (a speaker moved off the stage, removed) fails, and
    grpc.aio then reports INTERNAL "Internal error from Core" instead of the status the relay sent
    (grpc/grpc#36066). An empty Publish with the same ticket is answered with the reason at once.
    """
    if error.code() != grpc.StatusCode.INTERNAL or "execute_batch" not in (error.debug_error_string() or ""):
        return error
    try:
        await stub.Publish(_nothing(), metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as refused:
        return refused
    return error


async def _nothing() -> AsyncIterator[relay_pb2.AudioFrame]:
    return
    yield  # an async generator that yields nothing


def retry_after_s(error: grpc.aio.AioRpcError, default_s: float = 1.0) -> float:
    """The retry-after a server attached to RESOURCE_EXHAUSTED (trailing `retry-after-ms`)."""
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return max(0.0, int(value) / 1000)
            except (TypeError, ValueError):
                break
    return default_s
