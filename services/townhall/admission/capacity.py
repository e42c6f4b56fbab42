"""Listener capacity on one member: allowances per room, refilled from the owner ahead of need.

The join path only reads and decrements an Allowance; refills run as background tasks, so a
join never waits on the owner. The owner's own allowances come from its LeaseBook directly. A call to an
owner carries the member's other rooms of that owner that run low or are due a report, so a member
admitting to many rooms makes about one call per owner where it made one per room.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from townhall.admission.cluster import ACQUIRE, AdmissionCluster
from townhall.admission.leases import Allowance, LeaseBook
from townhall.admission.metrics import LEASE_CALLS, ROOMS_TAKEN_OVER
from townhall.admission.rooms import RoomBook
from townhall.core import logging
from townhall.core.errors import NotFound
from townhall.core.sharding import owner
from townhall.core.tasks import cancel, spawn, supervise
from townhall.internal.v1.internal_pb2 import AcquireRequest, AcquireResponse, RoomAsk
from townhall.v1.common_pb2 import RoomState

log = logging.get(__name__)

LEASE_TIMEOUT_S = 2.0
# After a failed call, or when the owner said the room is full, ask again after this long.
RETRY_S = 0.5
FULL_RETRY_S = 1.0
# A new owner rebuilding its book after a take-over: ask again this soon.
REBUILD_RETRY_S = 0.2
# Holdings are reported this often even without need, so a new owner learns them quickly.
REPORT_EVERY_S = 5.0
# Asks of one refill or report at an owner rebuilding its book (REBUILD_RETRY_S apart): about
# leases.HOLDING_TTL_S in all; the periodic report takes over after that.
MAX_ASKS = 100
# Other rooms of the same owner one lease call may carry (AcquireRequest.more; the owner refuses more).
MAX_MORE_ROOMS = 255


class Capacity:
    """Allowances of the rooms this member admits to, and the owner's lease book."""

    def __init__(
        self,
        rooms: RoomBook,
        peers: AdmissionCluster,
        default_limit: int,
        lease_min: int,
        lease_max: int,
        crowd_joins_per_s: float,
        on_crowd: Callable[[str], None],
    ) -> None:
        self.book = LeaseBook()
        self._rooms = rooms
        self._peers = peers
        self.default_limit = default_limit
        self._lease_min, self._lease_max = lease_min, lease_max
        self._allowances: dict[str, Allowance] = {}
        # The owner marks a room crowd once its demand passes this (on_crowd makes the change; 0: never).
        self._crowd_joins_per_s = crowd_joins_per_s
        self._on_crowd = on_crowd
        self._tasks: set[asyncio.Task[None]] = set()
        self._reporter: asyncio.Task[None] | None = None

    def seats(self) -> dict[str, int]:
        """Listeners seated here, per room this process admits to."""
        return {room_id: len(allowance.listeners) for room_id, allowance in self._allowances.items()}

    def allowance(self, room_id: str) -> Allowance:
        """The room's allowance here, with a refill started if it runs low."""
        allowance = self._allowances.get(room_id)
        if allowance is None:
            allowance = self._allowances[room_id] = Allowance(self._lease_min, self._lease_max)
        if allowance.wants_refill():
            if self._peers.is_owner(room_id):
                # The owner's book is local: take the lease now, no call and no wait.
                self._take_local(room_id, allowance, allowance.lease_size())
                return allowance
            allowance.refilling = True
            self._spawn(self._refill(room_id, allowance, allowance.lease_size()))
        return allowance

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = spawn(work, "lease-refill")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def rooms(self) -> set[str]:
        """Rooms with an allowance here."""
        return set(self._allowances)

    def get(self, room_id: str) -> Allowance | None:
        """The room's allowance here, if any."""
        return self._allowances.get(room_id)

    def forget(self, room_id: str) -> Allowance | None:
        """Drops an ended room's allowance (and lease book, if this member owns it)."""
        self.book.forget(room_id)
        return self._allowances.pop(room_id, None)

    def grant(self, request: AcquireRequest) -> AcquireResponse:
        """The owner's answer to a lease request."""
        try:
            room = self._rooms.get(request.room_id)
        except NotFound:
            return AcquireResponse()
        limit = room.listener_limit or self.default_limit
        if room.state != RoomState.ROOM_STATE_LIVE:
            return AcquireResponse(limit=limit)
        if not self._peers.is_owner(request.room_id):
            # A member that saw the owner change before this one did (or this one is leaving): its
            # book is not this room's book (yet). Nothing is granted or recorded; the member asks
            # again soon, at the owner it sees then, which waits for its report (takeover).
            LEASE_CALLS.labels("rebuilding").inc()
            return AcquireResponse(limit=limit, rebuilding=True)
        members = self._peers.membership.members()
        granted, available = self.book.acquire(
            request.room_id, request.member, request.count, request.held, limit, members
        )
        rebuilding = not granted and self.book.rebuilding(request.room_id)
        LEASE_CALLS.labels("granted" if granted else "rebuilding" if rebuilding else "empty").inc()
        if not room.crowd and 0 < self._crowd_joins_per_s < self.book.demand(request.room_id):
            self._on_crowd(request.room_id)
        return AcquireResponse(granted=granted, available=available, limit=limit, rebuilding=rebuilding)

    def grant_all(self, request: AcquireRequest) -> AcquireResponse:
        """The owner's answer to a lease call: the request's room, then each of its `more` (validated)."""
        reply = self.grant(request)
        for ask in request.more:
            more = AcquireRequest(room_id=ask.room_id, member=request.member, count=ask.count, held=ask.held)
            reply.more.append(self.grant(more))
        return reply

    def members_changed(self, before: list[str], after: list[str]) -> int:
        """Moves the lease books of rooms whose owner changed; returns the rooms taken over here.

        A room this member now owns starts a fresh book that waits for the others' reports; for a
        room whose owner is now another member, this member reports its holding there at once.
        """
        me = self._peers.me
        taken = 0
        for room in self._rooms.live():
            room_id = room.room_id
            old, new = owner(room_id, before or [me]), owner(room_id, after or [me])
            if old == new:
                continue
            allowance = self._allowances.get(room_id)
            if new == me:
                self.book.takeover(room_id, after, me)
                taken += 1
                if allowance is not None:
                    self._take_local(room_id, allowance, 0)
                continue
            if old == me:
                self.book.forget(room_id)
            if allowance is None:
                continue
            if allowance.refilling:
                # A call to the old owner is in flight (to a dead one it lasts LEASE_TIMEOUT_S): the
                # refill reports to the new owner as soon as it ends.
                allowance.report_due = True
                continue
            allowance.refilling = True
            allowance.exhausted_until = 0.0
            self._spawn(self._refill(room_id, allowance, 0))
        if taken:
            ROOMS_TAKEN_OVER.inc(taken)
            log.info("rooms taken over", rooms=taken, members=after)
        return taken

    def started(self) -> int:
        """Takes over the live rooms this member owns as it starts: it cannot know what the others hold,
        so it grants nothing until each has reported (they do once they see it up). Returns how many."""
        members, me = self._peers.membership.members(), self._peers.me
        owned = [room.room_id for room in self._rooms.live() if self._peers.is_owner(room.room_id)]
        for room_id in owned:
            self.book.takeover(room_id, members, me)
        return len(owned)

    def start(self) -> None:
        """Starts the periodic holding reports."""
        self._reporter = supervise(self._report_forever(), "lease-reports")

    async def close(self) -> None:
        """Stops background work."""
        await cancel(*self._tasks, self._reporter)

    async def _refill(self, room_id: str, allowance: Allowance, count: int) -> None:
        """Asks the room's owner for `count` admits (0: reports the holding), and asks again at once if
        the owner changed during the call, or soon while the owner is rebuilding its book: a new owner
        grants nothing until it has heard from every live member, so members never keep it waiting."""
        try:
            for _ in range(MAX_ASKS):
                allowance.report_due = False
                reply = await self._ask(room_id, allowance, count)
                if self._allowances.get(room_id) is not allowance:
                    return  # the room ended here meanwhile
                if allowance.report_due:
                    continue
                if reply is None or not reply.rebuilding:
                    return
                await asyncio.sleep(REBUILD_RETRY_S)
        finally:
            allowance.refilling = False

    def _take_local(self, room_id: str, allowance: Allowance, count: int) -> AcquireResponse:
        allowance.give_back()
        request = AcquireRequest(room_id=room_id, member=self._peers.me, count=count, held=allowance.held)
        reply = self.grant(request)
        self._took(allowance, count, reply)
        return reply

    async def _ask(self, room_id: str, allowance: Allowance, count: int) -> AcquireResponse | None:
        """One lease call to the owner of the moment (or this member's own book); None if it failed.

        The call carries the other rooms leased from the same owner that run low or are due a report
        (_companions): with many rooms on every member, a call per room made each member's lease calls
        grow with the rooms it admits to that others own."""
        owner = self._peers.owner(room_id)
        if owner == self._peers.me:
            return self._take_local(room_id, allowance, count)
        allowance.give_back()
        companions = self._companions(owner, room_id)
        request = AcquireRequest(
            room_id=room_id,
            member=self._peers.me,
            count=count,
            held=allowance.held,
            more=[RoomAsk(room_id=r, count=wanted, held=theirs.held) for r, theirs, wanted in companions],
        )
        try:
            reply = await self._peers.leases(owner).Acquire(
                request,
                metadata=self._peers.forwarding.internal(owner, ACQUIRE),
                timeout=LEASE_TIMEOUT_S,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            LEASE_CALLS.labels("failed").inc()
            log.warning("lease call failed", room=room_id, owner=owner, code=exc.code().name)
            allowance.exhausted_until = allowance.owner_busy_until = time.monotonic() + RETRY_S
            self._companions_done(companions, [])
            return None
        self._took(allowance, count, reply)
        self._companions_done(companions, list(reply.more))
        return reply

    def _companions(self, owner: str, room_id: str) -> list[tuple[str, Allowance, int]]:
        """The other rooms leased from `owner` that a call to it should carry (marked refilling until it
        ends): those below a whole lease (a refill starts below half of one) with count a lease, and those
        due a report with count 0; at most MAX_MORE_ROOMS, as (room, allowance, count)."""
        now = time.monotonic()
        picked: list[tuple[str, Allowance, int]] = []
        # Cheap tests first: this runs over every room this member admits to, once per lease call.
        for other, allowance in self._allowances.items():
            if allowance.refilling or other == room_id:
                continue
            low = allowance.below_lease()
            if not low and now - allowance.last_report < REPORT_EVERY_S:
                continue
            if self._peers.owner(other) != owner:
                continue
            allowance.refilling = True
            allowance.give_back()
            picked.append((other, allowance, allowance.lease_size() if low else 0))
            if len(picked) == MAX_MORE_ROOMS:
                break
        return picked

    def _companions_done(
        self, companions: list[tuple[str, Allowance, int]], replies: list[AcquireResponse]
    ) -> None:
        """Applies the owner's answers to the rooms a call carried (an owner that answered none, or a failed
        call: those rooms ask again when they need to)."""
        for index, (room_id, allowance, count) in enumerate(companions):
            allowance.refilling = False
            if self._allowances.get(room_id) is not allowance:
                continue  # the room ended here meanwhile
            if index < len(replies):
                self._took(allowance, count, replies[index])
            if allowance.report_due:
                # The owner changed during the call: report to the new one now, as _refill would.
                allowance.refilling = True
                self._spawn(self._refill(room_id, allowance, 0))

    @staticmethod
    def _took(allowance: Allowance, count: int, reply: AcquireResponse) -> None:
        now = time.monotonic()
        allowance.last_report = now
        allowance.held += reply.granted
        if reply.rebuilding:
            allowance.exhausted_until = allowance.owner_busy_until = now + REBUILD_RETRY_S
        elif reply.granted < count and reply.available == 0:
            allowance.exhausted_until = now + FULL_RETRY_S

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            now = time.monotonic()
            for room_id, allowance in list(self._allowances.items()):
                if allowance.refilling or now - allowance.last_report < REPORT_EVERY_S:
                    continue
                # One call, in turn (not _refill, which asks again while an owner rebuilds: one room's
                # rebuilding owner must not hold up the other rooms' reports).
                allowance.refilling = True
                try:
                    await self._ask(room_id, allowance, 0)
                finally:
                    allowance.refilling = False
                if allowance.report_due and self._allowances.get(room_id) is allowance:
                    # The owner changed during the call: report to the new one now, as a refill would.
                    allowance.refilling = True
                    self._spawn(self._refill(room_id, allowance, 0))
