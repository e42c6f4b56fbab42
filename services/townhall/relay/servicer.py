"""The Relay gRPC servicer: checks tickets and frames, then hands off to the hub.

Subscribe writes pre-serialised chunk bytes (an identity response serializer), so a chunk is
serialised once per room, never per listener.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from townhall.core import limits, logging, validation
from townhall.core.config import RelayConfig
from townhall.core.errors import InvalidArgument, PermissionDenied, Reason, ResourceExhausted, Unavailable
from townhall.core.identity import service_caller
from townhall.core.ratelimit import Buckets
from townhall.core.tickets import TICKET_KEY, Ticket, TicketVerifier
from townhall.relay import metrics
from townhall.relay.fanout import ListenerQueue, Room
from townhall.relay.guard import LISTEN, PUBLISH, STAGE, Guard
from townhall.relay.hub import DRAINING, HEARTBEAT_KEY, STUCK, UPSTREAM_LOST, RelayRooms, wall_us
from townhall.v1.common_pb2 import Role
from townhall.v1.relay_pb2 import AudioFrame, PublishSummary, PullRequest, SubscribeRequest

log = logging.get(__name__)

SERVICE = "townhall.v1.Relay"
# ListenerQueue.reason of a stream ended by moderation (the Guard holds the status it ends with).
REVOKED = "revoked"
# Relays above the one a Pull reaches (a tree of depth 16 would hold degree^16 relays).
MAX_PATH = 16
# How far a frame's capture time may be from the relay's clock.
MAX_CLOCK_SKEW_US = 60_000_000
# How soon a listener refused by a full relay should join again (admission's view of the relay's load
# is at most one load report old, so by then it places the listener elsewhere).
FULL_RETRY_MS = 1_000
# The heartbeat periods a Pull may ask for (PullRequest.heartbeat_ms is clamped to these).
MIN_HEARTBEAT_MS = 50
MAX_HEARTBEAT_MS = 10_000


class RelayServicer:
    """Publish and Subscribe: ticket and frame checks around the hub."""

    def __init__(
        self,
        hub: RelayRooms,
        tickets: TicketVerifier,
        config: RelayConfig,
        guard: Guard | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hub = hub
        # What the room says since the ticket was issued (relay/guard.py); empty without room-state.
        self._guard = guard or Guard()
        self._tickets = tickets
        self._address = config.address
        self._max_payload = config.max_payload_bytes
        self._capacity = config.listener_capacity
        self._frames_per_s = config.max_frames_per_s
        self._frame_burst = max(1.0, config.max_frames_per_s * config.frame_burst_s)
        # The clock the streams' frame budgets read (a test may hold it still).
        self.clock = clock

    async def publish(self, requests: AsyncIterator[AudioFrame], context: grpc.aio.ServicerContext) -> Any:
        """A speaker's frames go into the room's next chunks; returns how many were accepted."""
        ticket = self._ticket(context)
        limits.charge(ticket.user_id)
        if not ticket.on_stage:
            raise PermissionDenied(
                f"a {_role(ticket.role)} ticket may not publish audio; only the host, co-hosts and "
                "speakers may (ask to be invited on stage)"
            )
        watch = self._guard.admit(ticket, PUBLISH)
        # Cut by moderation while waiting for the next frame: the reader is cancelled, and the stream
        # ends with the Guard's status instead of as cancelled.
        task = asyncio.current_task()
        watch.on_cut = task.cancel if task is not None else None
        room = self._hub.join_publisher(ticket.room_id)
        log.info("publisher joined", room=ticket.room_id, user=ticket.user_id)
        accepted = 0
        # The stream's frame budget: a token bucket of its own (one key), full when the stream opens.
        budget = Buckets(self._frames_per_s, self._frame_burst, max_keys=2, clock=self.clock)
        try:
            # Headers at once: the speaker knows its frames are taken from now on.
            await context.send_initial_metadata(())
            async for frame in requests:
                if watch.error is not None:
                    raise watch.error
                if self._hub.draining:
                    raise Unavailable(
                        "relay is shutting down; join again and publish to the new relay",
                        reason=Reason.DRAINING,
                    )
                over = budget.take(ticket.user_id)
                if over:
                    metrics.FRAMES_REJECTED.inc()
                    raise ResourceExhausted(
                        f"frames arrive faster than this relay takes from one stream: at most "
                        f"{self._frames_per_s:g} frames/s in bursts of {self._frame_burst:g} "
                        "(a speaker sends one 20 ms frame at a time)",
                        retry_after_ms=round(1000 * over),
                        reason=Reason.RATE_LIMITED,
                    )
                now = time.monotonic()
                wall = wall_us()
                self._check(frame, ticket.user_id, wall)
                if watch.muted:
                    metrics.FRAMES_MUTED.inc()
                    continue
                frame.speaker_id = ticket.user_id
                room.add_frame(frame, now, wall)
                accepted += 1
                metrics.FRAMES_IN.inc()
        except asyncio.CancelledError:
            if watch.error is None or task is None:
                raise
            task.uncancel()
            raise watch.error from None
        finally:
            watch.on_cut = None
            self._guard.release(watch)
            self._hub.leave_publisher(room)
            log.info("publisher left", room=ticket.room_id, user=ticket.user_id, frames=accepted)
        if watch.error is not None:
            raise watch.error
        return PublishSummary(frames_accepted=accepted)

    async def subscribe(self, request: SubscribeRequest, context: grpc.aio.ServicerContext) -> None:
        """Streams the room's chunks (ring buffer first) until the client leaves or the relay drains.

        The stage (host, co-hosts, speakers) gets each frame as it arrives instead of chunks. A
        listener ticket naming upstream relays makes this relay an edge for the room.
        """
        ticket = self._ticket(context)
        limits.charge(ticket.user_id)
        room_id = validation.room_id(request.room_id)
        if room_id != ticket.room_id:
            raise PermissionDenied(f"ticket is for room {ticket.room_id!r}, not {room_id!r}")
        stage = ticket.on_stage and not ticket.upstream
        per_user = 0
        if not stage and self._hub.listeners >= self._capacity:
            if not self._guard.holds(ticket, LISTEN):
                # The ticket binds the listener to this relay, so waiting here would not help: it joins
                # again and admission (whose view of this relay's load is one report old at most) places
                # it on a relay with room. The stage is exempt: at most 15 users a room, at the origin.
                metrics.LISTENERS_REFUSED.inc()
                raise Unavailable(
                    f"relay is full ({self._capacity} listeners); join the room again in "
                    f"{FULL_RETRY_MS} ms for another relay, and reconnect there with resume_after set to "
                    "the last sequence received",
                    reason=Reason.RELAY_FULL,
                    retry_after_ms=FULL_RETRY_MS,
                )
            # A listener reconnecting while its old stream is not yet seen gone: it takes that one's place.
            per_user = 1
        watch = self._guard.admit(ticket, STAGE if stage else LISTEN, per_user)
        try:
            if stage:
                room, subscriber = self._hub.subscribe_stage(room_id)
            else:
                room, subscriber = self._hub.subscribe(
                    room_id, request.resume_after, ticket.upstream, resume_epoch=request.resume_epoch
                )
            watch.on_cut = lambda: subscriber.close(REVOKED)
            await self._stream(room, subscriber, context, downstream=False)
        finally:
            watch.on_cut = None
            self._guard.release(watch)
        if watch.error is not None:
            raise watch.error

    async def pull(self, request: PullRequest, context: grpc.aio.ServicerContext) -> None:
        """Another relay's one stream of the room: the same bytes as listeners get, from the ring first.

        Only on the internal port, from a relay (its service credential was checked before this runs).
        """
        room_id = validation.room_id(request.room_id)
        if len(request.upstream) > MAX_PATH:
            raise InvalidArgument(
                f"upstream has {len(request.upstream)} relays; at most {MAX_PATH} allowed", "upstream"
            )
        # A path of its own makes this relay a mid-tier: it pulls the room in turn.
        upstream = tuple(validation.address(a, f"upstream[{i}]") for i, a in enumerate(request.upstream))
        room, subscriber = self._hub.subscribe(
            room_id, request.resume_after, upstream, downstream=True, resume_epoch=request.resume_epoch
        )
        log.info(
            "downstream relay pulling",
            room=room_id,
            relay=service_caller().member,
            resume_after=request.resume_after,
            resume_epoch=request.resume_epoch,
        )
        heartbeat_ms = 0
        if request.heartbeat_ms:
            heartbeat_ms = min(MAX_HEARTBEAT_MS, max(MIN_HEARTBEAT_MS, request.heartbeat_ms))
        await self._stream(room, subscriber, context, downstream=True, heartbeat_ms=heartbeat_ms)

    async def _stream(
        self,
        room: Room,
        subscriber: ListenerQueue,
        context: grpc.aio.ServicerContext,
        downstream: bool,
        heartbeat_ms: int = 0,
    ) -> None:
        take, waiter, write = subscriber.take, subscriber.waiter, context.write
        # A cut-off or drain is seen after the write in flight returns. A client that stopped
        # reading holds that one write (its flow-control window is full) until it reads again or
        # disconnects; cancelling the task instead would leave the call open with no status.
        try:
            # Headers at once: the caller (a downstream relay) knows the stream is open even
            # while the room is silent, and whether heartbeats come.
            await context.send_initial_metadata(((HEARTBEAT_KEY, str(heartbeat_ms)),) if heartbeat_ms else ())
            if heartbeat_ms:
                await self._pull_stream(subscriber, write, heartbeat_ms / 1000)
            while subscriber.reason is None:
                data = take()
                if data is None:
                    ready = waiter()
                    if ready is not None:
                        await ready
                    continue
                await write(data)
        finally:
            self._hub.unsubscribe(room, subscriber, downstream)
        if subscriber.reason == STUCK:
            raise ResourceExhausted(
                f"listener read too slowly: chunks were dropped for {self._hub.settings.stuck_cutoff_s:g} s; "
                "reconnect with resume_after set to the last sequence received",
                retry_after_ms=0,
                reason=Reason.SLOW_LISTENER,
            )
        if subscriber.reason == DRAINING:
            raise Unavailable(
                "relay is shutting down; join again and reconnect with resume_after set to the last "
                "sequence received",
                reason=Reason.DRAINING,
            )
        if subscriber.reason == UPSTREAM_LOST:
            raise Unavailable(
                "this relay lost the room's upstream relay; join again (for a new path) and reconnect "
                "with resume_after set to the last sequence received",
                reason=Reason.UPSTREAM_LOST,
            )

    @staticmethod
    async def _pull_stream(
        subscriber: ListenerQueue, write: Callable[[bytes], Any], heartbeat_s: float
    ) -> None:
        """A relay's pull: its chunks, and an empty message after each heartbeat_s without one.

        One per pulling relay, not per listener: a silent room is told apart from a dead upstream.
        """
        take, waiter = subscriber.take, subscriber.waiter
        while subscriber.reason is None:
            data = take()
            if data is None:
                ready = waiter()
                if ready is not None:
                    done, _ = await asyncio.wait((ready,), timeout=heartbeat_s)
                    if not done:
                        await write(b"")
                continue
            await write(data)

    def _ticket(self, context: grpc.aio.ServicerContext) -> Ticket:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == TICKET_KEY:
                token = value if isinstance(value, str) else value.decode("ascii", "replace")
        return self._tickets.verify(token, self._address)

    def _check(self, frame: AudioFrame, user_id: int, wall: int) -> None:
        size = len(frame.payload)
        problem, field = "", "payload"
        if size == 0:
            problem = f"frame payload is empty; it must hold 1..{self._max_payload} bytes of encoded audio"
        elif size > self._max_payload:
            problem = f"frame payload is {size} bytes; at most {self._max_payload} bytes allowed"
        elif abs(skew := frame.capture_ts_us - wall) > MAX_CLOCK_SKEW_US:
            field = "capture_ts_us"
            problem = (
                f"frame capture_ts_us is {skew / 1e6:+.1f} s from the relay clock; "
                f"it must be within {MAX_CLOCK_SKEW_US // 1_000_000} s"
            )
        elif frame.speaker_id not in (0, user_id):
            field = "speaker_id"
            problem = f"frame speaker_id {frame.speaker_id} is not the ticket's user {user_id}; send 0"
        if problem:
            metrics.FRAMES_REJECTED.inc()
            raise InvalidArgument(problem, field)


def _role(role: int) -> str:
    try:
        return Role.Name(role).removeprefix("ROLE_").lower()  # type: ignore[arg-type]
    except ValueError:
        return f"role {role}"


def _identity(data: bytes) -> bytes:
    return data


def generic_handler(servicer: RelayServicer) -> grpc.GenericRpcHandler:
    """The Relay service's handlers; Subscribe's responses are already-serialised chunk bytes."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Publish": grpc.stream_unary_rpc_method_handler(
                servicer.publish,
                request_deserializer=AudioFrame.FromString,
                response_serializer=PublishSummary.SerializeToString,
            ),
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                servicer.subscribe,
                request_deserializer=SubscribeRequest.FromString,
                response_serializer=_identity,
            ),
            "Pull": grpc.unary_stream_rpc_method_handler(
                servicer.pull,
                request_deserializer=PullRequest.FromString,
                response_serializer=_identity,
            ),
        },
    )
