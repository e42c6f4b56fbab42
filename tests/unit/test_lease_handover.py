"""Lease hand-over between owners, without a network: what a member holds is never handed out twice."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace
from typing import Any

import grpc

from townhall.admission.capacity import Capacity
from townhall.admission.rooms import RoomBook
from townhall.core.sharding import owner
from townhall.internal.v1.internal_pb2 import AcquireRequest, AcquireResponse
from townhall.v1.common_pb2 import ROOM_STATE_LIVE, Room


class Cluster:
    """Stands in for Peers: `me` sees `members` live; lease calls to a member wait for its gate, then
    fail as a dead member's would (UNAVAILABLE) or are recorded and answered with `grant`."""

    forwarding = SimpleNamespace(internal=lambda member, method: ())

    def __init__(self, me: str, members: list[str], dead: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.me = me
        self.members = members
        self.membership = SimpleNamespace(members=lambda: self.members)
        self.dead = dead
        self.gate = asyncio.Event()
        self.asked: list[tuple[str, AcquireRequest]] = []

    def is_owner(self, room_id: str) -> bool:
        return self.owner(room_id) == self.me

    def owner(self, room_id: str) -> str:
        return owner(room_id, self.members)

    def leases(self, member: str) -> Any:
        cluster = self

        class Stub:
            async def Acquire(self, request: AcquireRequest, **options: Any) -> AcquireResponse:
                if member in cluster.dead:
                    await cluster.gate.wait()
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "dead"
                    )
                cluster.asked.append((member, request))
                return AcquireResponse(granted=0, available=0, limit=30, rebuilding=True)

        return Stub()


def live(room_id: str, limit: int = 30) -> RoomBook:
    book = RoomBook()
    book.apply(Room(room_id=room_id, host_id=1, state=ROOM_STATE_LIVE, version=1, listener_limit=limit))
    return book


def room_moving(before: list[str], old: str, after: list[str], new: str) -> str:
    """A room id owned by `old` among `before` and by `new` among `after`."""
    for n in itertools.count():
        room_id = f"room{n}"
        if owner(room_id, before) == old and owner(room_id, after) == new:
            return room_id
    raise AssertionError("unreachable")


def test_a_member_that_is_not_the_owner_yet_grants_nothing_and_records_nothing() -> None:
    # "s2" saw the old owner die first and asks "s1", which still sees the old owner up.
    room_id = room_moving(["v", "s1", "s2"], "v", ["s1", "s2"], "s1")
    s1 = Cluster("s1", ["v", "s1", "s2"])
    capacity = Capacity(live(room_id), s1, 30, 4, 16, 0.0, lambda room_id: None)  # type: ignore[arg-type]
    reply = capacity.grant(AcquireRequest(room_id=room_id, member="s2", count=16, held=10))
    assert (reply.granted, reply.rebuilding) == (0, True)
    assert capacity.book.leased(room_id) == 0, "an empty book would have granted 16 of 30 to s2 alone"


async def test_a_member_whose_lease_call_to_the_dead_owner_is_in_flight_reports_to_the_new_one_when_it_ends() -> (
    None
):
    room_id = room_moving(["v", "s1", "s2"], "v", ["s1", "s2"], "s1")
    s2 = Cluster("s2", ["v", "s1", "s2"], dead={"v"})
    capacity = Capacity(live(room_id), s2, 30, 4, 16, 0.0, lambda room_id: None)  # type: ignore[arg-type]
    allowance = capacity.allowance(room_id)  # asks the (dead) owner for a first lease: in flight
    allowance.held = 6
    await asyncio.sleep(0.01)
    assert allowance.refilling and not s2.asked, "the call to the dead owner is in flight"
    s2.members = ["s1", "s2"]
    capacity.members_changed(["v", "s1", "s2"], ["s1", "s2"])
    s2.gate.set()  # the call to the dead owner fails (after LEASE_TIMEOUT_S, in a real cluster)
    for _ in range(100):
        if s2.asked:
            break
        await asyncio.sleep(0.01)
    # Reported at once, not at the next join or periodic report: the new owner waits for it.
    assert [(member, request.held) for member, request in s2.asked][:1] == [("s1", 6)]
    await capacity.close()
