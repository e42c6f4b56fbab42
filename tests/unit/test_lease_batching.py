"""Lease calls carry every room of the owner called that runs low or is due a report: a member admitting to
many rooms that another member owns makes a call per owner, not one per room (admission/capacity.py)."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace
from typing import Any

from townhall.admission.capacity import REPORT_EVERY_S, Capacity
from townhall.admission.rooms import RoomBook
from townhall.core.sharding import owner
from townhall.internal.v1.internal_pb2 import AcquireRequest, AcquireResponse
from townhall.v1.common_pb2 import ROOM_STATE_LIVE, Room

MEMBERS = ["a:1", "b:1"]
LIMIT = 1_000


class Peers:
    """Stands in for AdmissionCluster: `me` among MEMBERS; a lease call goes to the owner's Capacity."""

    forwarding = SimpleNamespace(internal=lambda member, method: ())
    membership = SimpleNamespace(members=lambda: MEMBERS)

    def __init__(self, me: str) -> None:
        self.me = me
        self.capacities: dict[str, Capacity] = {}
        self.calls: list[AcquireRequest] = []

    def is_owner(self, room_id: str) -> bool:
        return self.owner(room_id) == self.me

    def owner(self, room_id: str) -> str:
        return owner(room_id, MEMBERS)

    def leases(self, member: str) -> Any:
        peers = self

        class Stub:
            async def Acquire(self, request: AcquireRequest, **options: Any) -> AcquireResponse:
                peers.calls.append(request)
                await asyncio.sleep(0)
                return peers.capacities[member].grant_all(request)

        return Stub()


def rooms_owned_by(member: str, count: int) -> list[str]:
    names = (f"room{n}" for n in itertools.count())
    return list(itertools.islice((r for r in names if owner(r, MEMBERS) == member), count))


def cluster(rooms: list[str]) -> tuple[Capacity, Capacity, Peers]:
    """The owner "a:1" and the member "b:1", each with every room live; the member's Peers."""
    capacities = {}
    peers = {}
    for me in MEMBERS:
        book = RoomBook()
        for room_id in rooms:
            book.apply(
                Room(room_id=room_id, host_id=1, state=ROOM_STATE_LIVE, version=1, listener_limit=LIMIT)
            )
        peers[me] = Peers(me)
        capacities[me] = Capacity(book, peers[me], LIMIT, 8, 5_000, 0.0, lambda _room: None)  # type: ignore[arg-type]
    for p in peers.values():
        p.capacities = capacities
    return capacities["a:1"], capacities["b:1"], peers["b:1"]


async def settle(member: Capacity) -> None:
    for _ in range(100):
        if not any(member.get(r).refilling for r in member.rooms()):  # type: ignore[union-attr]
            return
        await asyncio.sleep(0)


async def test_rooms_running_low_together_are_topped_up_in_one_call() -> None:
    rooms = rooms_owned_by("a:1", 12)
    owner_side, member, peers = cluster(rooms)
    for room_id in rooms:  # a first join in each: every room asks at once, before any call is answered
        member.allowance(room_id)
    await settle(member)
    first_calls = len(peers.calls)
    assert all(member.get(r).held == 8 for r in rooms)  # type: ignore[union-attr]
    # Joins in every room in turn (the event loop runs between them, as between calls): the first room to
    # run low carries the others that are below a lease.
    users = itertools.count(1)
    for _ in range(10):
        for room_id in rooms:
            allowance = member.allowance(room_id)
            if allowance.spare:
                allowance.admit(next(users))
            await asyncio.sleep(0)
    await settle(member)
    admitted = sum(len(member.get(r).listeners) for r in rooms)  # type: ignore[union-attr]
    assert admitted == 120, "every join found an admit"
    later_calls = len(peers.calls) - first_calls
    # A call per room when a room ran low would be at least 12 (each room's 8 admits run out once);
    # carried together, the rooms are refilled in a few calls.
    assert later_calls <= 3, [len(c.more) for c in peers.calls]
    assert sum(owner_side.book.leased(r) for r in rooms) == sum(member.get(r).held for r in rooms)  # type: ignore[union-attr]
    await member.close()


async def test_holdings_due_a_report_go_in_the_call_of_the_first_one(monkeypatch: Any) -> None:
    rooms = rooms_owned_by("a:1", 6)
    _, member, peers = cluster(rooms)
    for room_id in rooms:
        member.allowance(room_id)
    await settle(member)
    for room_id in rooms:  # reported long ago
        member.get(room_id).last_report -= REPORT_EVERY_S  # type: ignore[union-attr]
    peers.calls.clear()
    await member._ask(rooms[0], member.get(rooms[0]), 0)  # type: ignore[arg-type]
    assert len(peers.calls) == 1
    assert sorted([peers.calls[0].room_id, *(m.room_id for m in peers.calls[0].more)]) == sorted(rooms)
    assert not any(member.get(r).refilling for r in rooms)  # type: ignore[union-attr]
    await member.close()
