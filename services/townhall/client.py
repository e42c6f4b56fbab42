"""A small asyncio client for Townhall, used by the CLI, the demo, the load generator and tests."""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from townhall.core.auth import bearer
from townhall.core.channels import RECONNECT_OPTIONS
from townhall.core.channels import channel as open_channel
from townhall.core.config import TlsConfig
from townhall.core.errors import Reason, details
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
# A process that was down is usable again as soon as it is back; calls to one that refuses connections
# fail at once meanwhile and the client moves on to another (core/channels.RECONNECT_OPTIONS).
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 4 * 1024 * 1024), *RECONNECT_OPTIONS]
# Statuses an overloaded server's transport answers without a retry-after, and the backoff for them.
_BUSY = (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
# ABORTED: the process that took the change had been fenced by a newer writer of the room (a new
# owner): the change was not made, and asked again it reaches the room's owner (docs/ownership.md).
_REPEAT = (*_BUSY, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)
BUSY_RETRY_S = (1.0, 3.0)
# How long a room change or a read is tried again, on other admission processes too, while
# admission answers UNAVAILABLE, CANCELLED or runs out of time (a process died or is stopping,
# Kafka is restarting).
RETRY_UNAVAILABLE_S = 30.0
# Rooms whose version (and crowd mark) a client remembers for its joins.
KNOWN_ROOMS = 1_000
# A room change or read refused with RESOURCE_EXHAUSTED (a rate limit, a busy server) whose retry-after
# is at most this is waited out and tried again, at most RETRY_EXHAUSTED_TIMES times in a row; a longer
# retry-after (rooms per host per hour) or none at all is the caller's to see at once.
MAX_RETRY_AFTER_S = 5.0
RETRY_EXHAUSTED_TIMES = 5
# Rooms per ListLiveRooms page when a caller wants only the first few: the server's largest page.
LIST_PAGE = 500
# "retry after 1234 ms" / "retry after 12 s" in a refusal's message, for servers that send no trailer.
_RETRY_AFTER_TEXT = re.compile(r"retry after (\d+(?:\.\d+)?) ?(ms|s)\b")


def channel(address: str, tls: TlsConfig) -> grpc.aio.Channel:
    """A channel to a Townhall service, with TLS when [tls] says so."""
    return open_channel(address, tls, _CHANNEL_OPTIONS)


def now_us() -> int:
    """Wall-clock Unix microseconds, the unit of capture timestamps."""
    return time.time_ns() // 1_000


@dataclass
class Endpoints:
    """Where the services are: host:port, or several comma-separated (any of them will do)."""

    admission: str
    notifier: str
    # How to dial them (and the relays their grants name).
    tls: TlsConfig = field(default_factory=TlsConfig)
    # Admission's crowd lane (joins of rooms that draw a crowd); empty: they join on `admission`.
    crowd: str = ""


class Client:
    """One user's view of Townhall; every call carries the user's token.

    With several admission addresses the client uses one and moves to the next when a call
    finds it UNAVAILABLE (stopped, draining, restarting). Calls that are safe to repeat are
    tried again: reads, joins, and room changes (start and end are idempotent; a create carries
    an idempotency key, so a repeated one returns the room the first one made).
    """

    def __init__(
        self, endpoints: Endpoints, user: int, token: str, retry_s: float = RETRY_UNAVAILABLE_S
    ) -> None:
        self.user = user
        self.retry_s = retry_s
        self._tls = endpoints.tls
        self._metadata = bearer(token)
        addresses = [a.strip() for a in endpoints.admission.split(",") if a.strip()]
        self._admissions = [channel(a, self._tls) for a in addresses]
        # Clients spread over the processes; each one sticks to its choice while it answers.
        self._current = random.randrange(len(self._admissions))
        self._notifier = channel(endpoints.notifier.split(",")[0].strip(), self._tls)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._crowd = endpoints.crowd
        # Rooms this client has seen marked crowd (in a Room or a notification): joined on the crowd lane.
        self.crowd_rooms: set[str] = set()
        # The newest version seen of each room (least recently learnt of first; at most KNOWN_ROOMS, and
        # crowd_rooms only names rooms in it): a join asks for at least that version, so an admission
        # process that has not read the room's start yet says so.
        self.room_versions: dict[str, int] = {}
        self.graph = graph_pb2_grpc.GraphStub(self._notifier)
        self.inbox = inbox_pb2_grpc.InboxStub(self._notifier)

    @property
    def _admission(self) -> grpc.aio.Channel:
        return self._admissions[self._current]

    @property
    def rooms(self) -> rooms_pb2_grpc.RoomsStub:
        """The Rooms API on the admission process in use."""
        return rooms_pb2_grpc.RoomsStub(self._admission)

    @property
    def moderation(self) -> moderation_pb2_grpc.ModerationStub:
        """The Moderation API on the admission process in use."""
        return moderation_pb2_grpc.ModerationStub(self._admission)

    @property
    def admission(self) -> admission_pb2_grpc.AdmissionStub:
        """The Admission API on the admission process in use."""
        return admission_pb2_grpc.AdmissionStub(self._admission)

    @property
    def crowd_admission(self) -> admission_pb2_grpc.AdmissionStub:
        """The Admission API on the crowd lane (the process in use when there is no lane)."""
        if not self._crowd:
            return self.admission
        return admission_pb2_grpc.AdmissionStub(self._channel_to(self._crowd))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call of this user carries (its token), for calls made on the stubs."""
        return self._metadata

    def _next_admission(self) -> None:
        self._current = (self._current + 1) % len(self._admissions)

    async def close(self) -> None:
        """Closes every channel."""
        for ch in (*self._admissions, self._notifier, *self._channels.values()):
            await ch.close()

    async def _rooms_call(self, call: Callable[[rooms_pb2_grpc.RoomsStub], Awaitable[Room]]) -> Room:
        """A Rooms call, tried again (on the next admission process) while admission is UNAVAILABLE, and
        after the retry-after of a RESOURCE_EXHAUSTED (up to MAX_RETRY_AFTER_S, RETRY_EXHAUSTED_TIMES
        times)."""
        deadline = time.monotonic() + self.retry_s
        delay = 0.1
        exhausted = 0
        while True:
            try:
                return await call(self.rooms)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # Refused before it ran: safe to repeat, on the same process (its limit, its hint).
                    wait_s = retry_hint_s(exc)
                    exhausted += 1
                    if wait_s is None or wait_s > MAX_RETRY_AFTER_S or exhausted > RETRY_EXHAUSTED_TIMES:
                        raise
                    await asyncio.sleep(wait_s)
                    continue
                # CANCELLED: the server stopped (SIGTERM) before it took the call up. Every Rooms
                # call is safe to repeat, so one that ran out of time or was fenced is tried again too.
                if exc.code() not in _REPEAT or time.monotonic() + delay > deadline:
                    raise
            self._next_admission()
            await asyncio.sleep(random.uniform(0.5, 1.0) * delay)
            delay = min(1.0, delay * 2)

    async def create_room(
        self,
        title: str,
        speakers: Iterable[int] = (),
        listener_limit: int = 0,
        request_id: str | None = None,
    ) -> Room:
        """Creates a room hosted by this user (once, even if the call has to be repeated)."""
        request = rooms_pb2.CreateRoomRequest(
            title=title,
            speaker_ids=list(speakers),
            listener_limit=listener_limit,
            request_id=request_id or uuid.uuid4().hex,
        )
        return await self._rooms_call(lambda s: s.CreateRoom(request, metadata=self._metadata, timeout=15))

    async def start_room(self, room_id: str) -> Room:
        """Starts this user's room."""
        request = rooms_pb2.StartRoomRequest(room_id=room_id)
        return self.learn(
            await self._rooms_call(lambda s: s.StartRoom(request, metadata=self._metadata, timeout=15))
        )

    async def schedule_room(self, room_id: str, start_at_ms: int) -> Room:
        """Schedules this user's created room to start at `start_at_ms` (Unix milliseconds)."""
        request = rooms_pb2.ScheduleRoomRequest(room_id=room_id, start_at_ms=start_at_ms)
        return await self._rooms_call(lambda s: s.ScheduleRoom(request, metadata=self._metadata, timeout=15))

    async def end_room(self, room_id: str) -> Room:
        """Ends this user's room."""
        request = rooms_pb2.EndRoomRequest(room_id=room_id)
        return await self._rooms_call(lambda s: s.EndRoom(request, metadata=self._metadata, timeout=15))

    async def get_room(self, room_id: str) -> Room:
        """A room, as the admission process in use knows it."""
        request = rooms_pb2.GetRoomRequest(room_id=room_id)
        return self.learn(
            await self._rooms_call(lambda s: s.GetRoom(request, metadata=self._metadata, timeout=10))
        )

    async def live_rooms(self, limit: int = 0, page_size: int = 0) -> list[Room]:
        """Live rooms, newest first: every one (page after page), or the first `limit`."""
        rooms: list[Room] = []
        token = ""
        while True:
            size = min(page_size or LIST_PAGE, limit - len(rooms)) if limit else page_size
            request = rooms_pb2.ListLiveRoomsRequest(page_size=size, page_token=token)
            reply = await self.rooms.ListLiveRooms(request, metadata=self._metadata, timeout=10)
            rooms += (self.learn(room) for room in reply.rooms)
            token = reply.next_page_token
            if not token or (limit and len(rooms) >= limit):
                return rooms

    async def followers(self, page_size: int = 0) -> AsyncIterator[list[int]]:
        """This user's followers, ascending, a page at a time (only a user may list their own)."""
        token = ""
        while True:
            request = graph_pb2.ListFollowersRequest(user_id=self.user, page_size=page_size, page_token=token)
            reply = await self.graph.ListFollowers(request, metadata=self._metadata, timeout=30)
            yield list(reply.follower_ids)
            if not (token := reply.next_page_token):
                return

    def watch_room(self, room_id: str) -> grpc.aio.UnaryStreamCall:
        """The room's WatchRoom stream on the admission process in use: read RoomUpdates from it."""
        request = rooms_pb2.WatchRoomRequest(room_id=room_id)
        return self.rooms.WatchRoom(request, metadata=self._metadata)

    def learn(self, room: _Seen) -> _Seen:
        """Remembers a room's newest version and whether it draws a crowd (from a Room or a notification),
        for `join`; past KNOWN_ROOMS, the room learnt of least recently is forgotten (both marks)."""
        room_id = room.room_id
        version = room.version if isinstance(room, Room) else room.room_version
        self.room_versions[room_id] = max(version, self.room_versions.pop(room_id, 0))  # now the newest
        if room.crowd:
            self.crowd_rooms.add(room_id)
        if len(self.room_versions) > KNOWN_ROOMS:
            oldest = next(iter(self.room_versions))
            del self.room_versions[oldest]
            self.crowd_rooms.discard(oldest)
        return room

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
        # Every moderation call is safe to repeat: a change that already holds is answered unchanged.
        def call(_: rooms_pb2_grpc.RoomsStub) -> Awaitable[Room]:
            made: Awaitable[Room] = getattr(self.moderation, method)(
                request, metadata=self._metadata, timeout=15
            )
            return made

        return self.learn(await self._rooms_call(call))

    async def follow(self, followee: int) -> bool:
        """Follows a user; True if the follow is new."""
        request = graph_pb2.FollowRequest(followee_id=followee)
        reply = await self.graph.Follow(request, metadata=self._metadata, timeout=10)
        return reply.created

    async def unfollow(self, followee: int) -> bool:
        """Stops following a user; True if the follow was there."""
        request = graph_pb2.UnfollowRequest(followee_id=followee)
        reply = await self.graph.Unfollow(request, metadata=self._metadata, timeout=10)
        return reply.removed

    async def count_followers(self, user: int) -> int:
        """How many users follow `user` (public)."""
        request = graph_pb2.CountFollowersRequest(user_id=user)
        reply = await self.graph.CountFollowers(request, metadata=self._metadata, timeout=10)
        return int(reply.count)

    async def join(self, room_id: str, give_up_after_s: float = 30.0) -> admission_pb2.Grant:
        """Joins a room, honouring retry-after when the room is full or the server is busy.

        A room known to draw a crowd is joined on admission's crowd lane, where its storm is shed.
        """
        deadline = time.monotonic() + give_up_after_s
        crowd = room_id in self.crowd_rooms and bool(self._crowd)
        seen = self.room_versions.get(room_id, 0)
        request = admission_pb2.JoinRequest(room_id=room_id, min_room_version=seen)
        while True:
            try:
                stub = self.crowd_admission if crowd else self.admission
                reply = await stub.Join(request, metadata=self._metadata, timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    delay_s = retry_after_s(exc)
                elif details(exc).reason == Reason.ROOM_BEHIND:
                    # That process has not read the room as far as this client has: another one may
                    # have, or it will have in a moment.
                    if not crowd and len(self._admissions) > 1:
                        self._next_admission()
                    delay_s = retry_after_s(exc, 0.2)
                elif exc.code() in _BUSY and not crowd and self._unreachable(exc):
                    # The process is gone or draining: any other admission process admits as well.
                    self._next_admission()
                    delay_s = random.uniform(0.05, 0.2)
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

    def _unreachable(self, error: grpc.aio.AioRpcError) -> bool:
        """Whether a failed call says the process could not be reached (not merely busy)."""
        if len(self._admissions) < 2:
            return False
        state = self._admission.get_state()
        return error.code() == grpc.StatusCode.UNAVAILABLE or state in (
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN,
        )

    async def leave(self, room_id: str) -> None:
        """Leaves a room."""
        await self.admission.Leave(
            admission_pb2.LeaveRequest(room_id=room_id), metadata=self._metadata, timeout=10
        )

    def relay(
        self, grant: admission_pb2.Grant
    ) -> tuple[relay_pb2_grpc.RelayStub, tuple[tuple[str, str], ...]]:
        """The relay stub for a grant and the metadata that carries its ticket."""
        return self.relay_at(grant.relay_address), ((TICKET_KEY, grant.ticket),)

    def relay_at(self, address: str) -> relay_pb2_grpc.RelayStub:
        """A stub for the relay at `address` (one channel per relay, kept)."""
        return relay_pb2_grpc.RelayStub(self._channel_to(address))

    def _channel_to(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = channel(address, self._tls)
        return ch

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
        self, grant: admission_pb2.Grant, room_id: str, resume_after: int = 0, resume_epoch: int = 0
    ) -> grpc.aio.UnaryStreamCall:
        """The room's chunk stream on the granted relay (one stream: see townhall.live for one
        that moves to another relay and resumes when this one ends)."""
        stub, md = self.relay(grant)
        request = relay_pb2.SubscribeRequest(
            room_id=room_id, resume_after=resume_after, resume_epoch=resume_epoch
        )
        return stub.Subscribe(request, metadata=md)

    def notifications(self, resume_cursor: str = "", send_start: bool = False) -> grpc.aio.UnaryStreamCall:
        """This user's Inbox stream; from `resume_cursor` (the last cursor seen) it starts with what was
        sent since (see Inbox for the bound, and `InboxCursor` for keeping one). With `send_start` (and no
        cursor) its first message is a NOTIFICATION_KIND_CONNECTED marker with a cursor to resume from."""
        request = inbox_pb2.InboxSubscribeRequest(resume_cursor=resume_cursor, send_start=send_start)
        return self.inbox.Subscribe(request, metadata=self._metadata)


class InboxCursor:
    """Where a user is in their Inbox, across reconnects: the cursor to resume from, and the ids of the
    latest `remember` notifications, so one delivered again (delivery is at-least-once) is shown once."""

    def __init__(self, cursor: str = "", remember: int = 1_000) -> None:
        self.cursor = cursor
        self.missed = 0  # NOTIFICATION_KIND_MISSED markers seen: some notifications were not kept
        self._seen: dict[str, None] = {}
        self._remember = remember

    def fresh(self, note: inbox_pb2.Notification) -> bool:
        """Takes note of what the stream sent; False if it is a notification seen already."""
        if note.cursor:
            self.cursor = note.cursor
        if note.kind == inbox_pb2.NOTIFICATION_KIND_CONNECTED:
            return True
        if note.kind == inbox_pb2.NOTIFICATION_KIND_MISSED:
            self.missed += 1
            return True
        if note.notification_id in self._seen:
            return False
        self._seen[note.notification_id] = None
        if len(self._seen) > self._remember:
            del self._seen[next(iter(self._seen))]
        return True


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
    """The retry-after a server attached to RESOURCE_EXHAUSTED (retry_hint_s), else `default_s`."""
    hint = retry_hint_s(error)
    return default_s if hint is None else hint


def retry_hint_s(error: grpc.aio.AioRpcError) -> float | None:
    """The retry-after a server attached to a refusal, in seconds: its RetryInfo, else the deprecated
    `retry-after-ms` trailer (servers before it), else a "retry after N ms" (or "N s") in its message;
    None if it gave none."""
    hint = details(error).retry_after_s
    if hint is not None:
        return hint
    found = _RETRY_AFTER_TEXT.search(error.details() or "")
    if found is None:
        return None
    return float(found.group(1)) / (1000 if found.group(2) == "ms" else 1)
