"""The join decision: every branch of the pure rule, and what a listener gets for each from the Admitter."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import pytest

from townhall.admission.capacity import Capacity
from townhall.admission.decision import ADMIT, FULL, REJOIN, WAIT, WAIT_MS, decide, wait_ms
from townhall.admission.fairness import FairBudget
from townhall.admission.joins import RETRY_AFTER_MS, Admitter
from townhall.admission.leases import Allowance
from townhall.admission.metrics import JOINS_ADMITTED, JOINS_REJECTED, JOINS_SHED, JOINS_WAITING
from townhall.admission.placement import Placer
from townhall.admission.presence import Presence
from townhall.admission.relays import RelayDirectory
from townhall.admission.rooms import RoomBook
from townhall.admission.servicer import AdmissionServicer
from townhall.core.auth import SUBSCRIBE, Principal
from townhall.core.config import DEV_ENV, load
from townhall.core.errors import ResourceExhausted, TownhallError
from townhall.core.identity import PRINCIPAL
from townhall.core.tickets import TicketSigner
from townhall.v1.admission_pb2 import JoinRequest
from townhall.v1.common_pb2 import ROOM_STATE_LIVE, Room
from townhall.v1.internal_pb2 import AcquireResponse

NOW = 1000.0
RELAY = "relay-0:50052"


def allowance(held: int = 0, listeners: tuple[int, ...] = (), **fields: Any) -> Allowance:
    a = Allowance(4, 100, clock=lambda: NOW)
    a.held = held
    a.listeners = dict.fromkeys(listeners, 0)
    for name, value in fields.items():
        setattr(a, name, value)
    return a


def test_a_user_seated_here_rejoins_without_an_admit_even_when_none_is_spare() -> None:
    assert decide(allowance(held=1, listeners=(7,), exhausted_until=NOW + 1), 7, NOW) is REJOIN


def test_a_spare_admit_goes_to_whoever_asks_first() -> None:
    assert decide(allowance(held=2, listeners=(7,)), 8, NOW) is ADMIT
    # Spare admits are not held back for users in line, nor while a refill or an owner change is under way.
    busy = allowance(held=2, listeners=(7,), refilling=True, owner_busy_until=NOW + 1)
    assert decide(busy, 8, NOW) is ADMIT


def test_without_a_spare_admit_a_user_waits_while_capacity_can_still_come() -> None:
    full = allowance(held=1, listeners=(7,), exhausted_until=NOW + 1)
    assert decide(full, 8, NOW) is FULL
    refilling = allowance(held=1, listeners=(7,), exhausted_until=NOW + 1, refilling=True)
    assert decide(refilling, 8, NOW) is WAIT, "a refill is in flight"
    owner_busy = allowance(held=1, listeners=(7,), exhausted_until=NOW + 1, owner_busy_until=NOW + 0.5)
    assert decide(owner_busy, 8, NOW) is WAIT, "the owner could not answer (unreachable, rebuilding)"
    assert decide(owner_busy, 8, NOW + 0.5) is FULL, "the owner answers again and said full"
    assert decide(full, 8, NOW + 1) is WAIT, "the owner's 'full' has lapsed: ask again"
    assert decide(allowance(), 8, NOW) is WAIT, "a new room here, nothing asked for yet"


def test_the_decision_changes_nothing() -> None:
    a = allowance(held=1, listeners=(7,))
    before = (a.held, dict(a.listeners), a.refilling, a.exhausted_until, a.owner_busy_until)
    for user in (7, 8):
        decide(a, user, NOW)
    assert (a.held, a.listeners, a.refilling, a.exhausted_until, a.owner_busy_until) == before


def test_the_wait_grows_with_the_line_within_its_bounds() -> None:
    assert wait_ms(0) == WAIT_MS[0]
    assert wait_ms(499) == 1_000
    assert wait_ms(10**6) == WAIT_MS[1]
    assert wait_ms(499, 0.8) == 800 and wait_ms(499, 1.2) == 1_200


class OwnerHere:
    """Stands in for AdmissionCluster: this process owns every room, so leases come from its own book."""

    me = "a:1"
    membership = SimpleNamespace(members=lambda: ["a:1"])

    def is_owner(self, room_id: str) -> bool:
        return True


class SlowOwner:
    """Stands in for AdmissionCluster: another member owns every room and answers a lease call once told to."""

    me = "a:1"
    forwarding = SimpleNamespace(internal=lambda member, method: ())

    def __init__(self, grant: int) -> None:
        self.answer = asyncio.Event()
        self._grant = grant

    def is_owner(self, room_id: str) -> bool:
        return False

    def owner(self, room_id: str) -> str:
        return "b:1"

    def leases(self, member: str) -> SlowOwner:
        return self

    async def Acquire(self, request: Any, **options: Any) -> AcquireResponse:
        await self.answer.wait()
        return AcquireResponse(granted=self._grant, available=1, limit=100)


class Recorder:
    def offer(self, topic: str, key: bytes, value: bytes) -> bool:
        return True


def admitter(
    peers: object, limit: int = 100, budget: FairBudget | None = None, line: int = 100
) -> tuple[Admitter, Capacity]:
    """An Admitter of one live room "r" with `limit` listeners, one relay, no network."""
    book = RoomBook()
    book.apply(Room(room_id="r", host_id=1, state=ROOM_STATE_LIVE, version=1, listener_limit=limit))
    capacity = Capacity(book, peers, 100, 1, 10, 0.0, lambda room_id: None)  # type: ignore[arg-type]
    presence = Presence(Recorder(), "t.presence", "a:1", 1000)  # type: ignore[arg-type]
    signer = TicketSigner.from_config(load(env=DEV_ENV).tickets)
    placer = Placer([RELAY], edge_target=10, degree=2, default_capacity=1000)
    placer.set_up([RELAY])
    joins = Admitter(
        book,
        signer,
        RelayDirectory([RELAY], 1, quiet_s=0.0, seeds_internal=["relay-0:50072"]),
        presence,
        capacity,
        budget or FairBudget(0.0),
        line,
        placer,
    )
    return joins, capacity


def listener(user: int) -> Principal:
    return Principal(user, frozenset({SUBSCRIBE}))


def shed(joins: Admitter, user: int) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as refused:
        joins.join("r", listener(user))
    retry_ms = refused.value.retry_after_ms
    assert RETRY_AFTER_MS[0] <= retry_ms <= RETRY_AFTER_MS[1]
    assert str(refused.value).endswith(f"retry after {retry_ms} ms")
    return refused.value


def test_listeners_are_admitted_up_to_the_limit_then_shed_as_full() -> None:
    joins, _ = admitter(OwnerHere(), limit=2)
    assert joins.join("r", listener(11)).grant.relay_address == RELAY
    assert joins.join("r", listener(12)).HasField("grant")
    assert joins.join("r", listener(11)).HasField("grant"), "a rejoin takes no seat"
    assert "room r is full (2 listeners)" in str(shed(joins, 13))
    assert joins.listeners("r") == 2
    joins.leave("r", 12)
    assert joins.join("r", listener(13)).HasField("grant"), "a leaver's seat is taken again"


def test_past_the_process_budget_a_room_that_had_its_share_is_shed() -> None:
    joins, _ = admitter(OwnerHere(), budget=FairBudget(10.0, clock=lambda: NOW))  # a burst of 2 admits
    granted = [joins.join("r", listener(user)).HasField("grant") for user in (11, 12)]
    assert granted == [True, True]
    assert "room r has had its share" in str(shed(joins, 13))
    assert joins.listeners("r") == 2, "a shed join uses no seat"


async def test_while_capacity_is_on_its_way_listeners_wait_in_line_then_are_admitted() -> None:
    owner = SlowOwner(grant=5)
    joins, capacity = admitter(owner, line=2)
    try:
        first, second = (joins.join("r", listener(user)) for user in (11, 12))
        assert (first.waiting.position, second.waiting.position) == (1, 2)
        for answer in (first, second):
            assert 0.8 * WAIT_MS[0] <= answer.waiting.retry_after_ms <= 1.2 * WAIT_MS[1]
        assert joins.join("r", listener(11)).waiting.position == 1, "asking again keeps one's place"
        assert "room r's waiting line is full" in str(shed(joins, 13))
        owner.answer.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert joins.join("r", listener(12)).HasField("grant"), "admitted once the lease came"
        assert joins.join("r", listener(13)).HasField("grant"), "the line only orders waiting answers"
    finally:
        await capacity.close()


async def test_every_join_outcome_is_counted_once() -> None:
    joins, capacity = admitter(SlowOwner(grant=1), line=1)
    servicer = AdmissionServicer(joins)
    children = {
        "admitted": JOINS_ADMITTED,
        "waiting": JOINS_WAITING,
        "shed": JOINS_SHED,
        "rejected": JOINS_REJECTED,
    }

    async def counted(user: int, room_id: str = "r", grants: frozenset[str] = frozenset({SUBSCRIBE})) -> str:
        before = {name: child._value.get() for name, child in children.items()}
        PRINCIPAL.set(Principal(user, grants))
        with contextlib.suppress(TownhallError):
            await servicer.Join(JoinRequest(room_id=room_id), None)  # type: ignore[arg-type]
        changed = {name: child._value.get() - before[name] for name, child in children.items()}
        assert sorted(changed.values()) == [0, 0, 0, 1], changed
        return max(changed, key=changed.__getitem__)

    try:
        assert await counted(11) == "waiting"
        assert await counted(12) == "shed", "the line is full"
        assert await counted(13, "nowhere") == "rejected", "no such room"
        assert await counted(13, "bad id!") == "rejected", "a bad room id"
        assert await counted(13, grants=frozenset()) == "rejected", "no subscribe grant"
        capacity.allowance("r").held = 1
        assert await counted(11) == "admitted"
    finally:
        await capacity.close()
