"""Capacity leases: the limit holds across members, leases follow the join rate, holdings are relearnt."""

from __future__ import annotations

from townhall.admission.leases import HOLDING_TTL_S, Allowance, LeaseBook


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_grants_never_exceed_the_limit_across_members() -> None:
    book = LeaseBook()
    assert book.acquire("r", "a", 60, 0, 100) == (60, 40)
    assert book.acquire("r", "b", 60, 0, 100) == (40, 0)
    assert book.acquire("r", "c", 10, 0, 100) == (0, 0)
    # "a" gives 30 back (reports a smaller holding): they can go to someone else.
    assert book.acquire("r", "a", 0, 30, 100) == (0, 30)
    assert book.acquire("r", "c", 50, 0, 100) == (30, 0)
    assert book.leased("r") == 100


def test_a_new_owner_relearns_holdings_from_members_reports() -> None:
    book = LeaseBook()  # the new owner knows nothing
    assert book.acquire("r", "a", 0, 70, 100) == (0, 30)
    assert book.acquire("r", "b", 50, 0, 100) == (30, 0)


def test_holdings_of_departed_or_silent_members_are_dropped() -> None:
    clock = Clock()
    book = LeaseBook(clock)
    book.acquire("r", "a", 50, 0, 100, members=["a", "b", "c"])
    book.acquire("r", "b", 50, 0, 100, members=["a", "b", "c"])
    assert book.acquire("r", "c", 10, 0, 100, members=["a", "c"]) == (10, 40)
    clock.now += HOLDING_TTL_S + 1
    assert book.acquire("r", "c", 80, 10, 100) == (80, 10)


def test_a_leavers_admit_is_spare_again() -> None:
    allowance = Allowance(4, 100)
    allowance.held = 2
    allowance.admit(1)
    allowance.admit(2)
    assert allowance.spare == 0
    assert allowance.leave(2) and allowance.spare == 1
    assert not allowance.leave(2), "leaving twice frees one admit"
    assert allowance.spare == 1


def test_lease_size_follows_the_join_rate_so_the_owner_sees_a_few_calls_per_second() -> None:
    clock = Clock()
    allowance = Allowance(8, 5000, clock)
    assert allowance.lease_size() == 8
    allowance.held = 10**6
    for i in range(20_000):  # 2,000 joins/s for 10 s
        clock.now += 0.0005
        allowance.demand()
        allowance.admit(i)
    size = allowance.lease_size()
    assert 600 <= size <= 1200, size  # ~0.5 s of joins: about 2 lease calls/s
    assert allowance.wants_refill() is False, "plenty spare"
    allowance.held = len(allowance.listeners) + size // 4
    assert allowance.wants_refill(), "below half a lease"
    allowance.refilling = True
    assert not allowance.wants_refill(), "one refill in flight at a time"


def test_idle_spare_is_given_back() -> None:
    allowance = Allowance(8, 5000)
    allowance.held = 100
    assert allowance.give_back() == 100 - 16
    assert allowance.held == 16


def test_the_owner_sees_a_rooms_join_demand_from_the_leases_members_ask_for() -> None:
    """Each member asks for ~0.5 s of its joins at a time, so the asks add up to the room's join rate."""
    clock = Clock()
    book = LeaseBook(clock)
    for _ in range(40):  # 20 s: two members, each asking for 400 admits every 0.5 s (800 joins/s each)
        clock.now += 0.5
        book.acquire("hot", "a", 400, 0, 10**9)
        book.acquire("hot", "b", 400, 0, 10**9)
        book.acquire("cold", "a", 8, 0, 10**9)
    assert 1300 <= book.demand("hot") <= 1900, book.demand("hot")  # 1,600 joins/s, measured in steps
    assert book.demand("cold") < 30
    clock.now += 20  # nobody asks any more: the demand fades
    assert book.demand("hot") < 10
    assert book.demand("unknown") == 0


def test_a_new_owner_grants_nothing_until_every_member_reported_its_holding() -> None:
    clock = Clock()
    book = LeaseBook(clock)
    book.takeover("r", ["me", "a", "b"], me="me")
    assert book.rebuilding("r")
    # "a" reports 60 held and asks for more: nothing yet, "b" may hold admits too.
    assert book.acquire("r", "a", 10, 60, 100) == (0, 40)
    assert book.acquire("r", "b", 10, 30, 100) == (10, 0), "everyone heard from: grants resume"
    assert not book.rebuilding("r")
    assert book.leased("r") == 100


def test_a_take_over_waits_for_a_late_live_member_however_long_but_not_for_one_gone_down() -> None:
    clock = Clock()
    book = LeaseBook(clock)
    book.takeover("r", ["me", "a", "late"], me="me")
    assert book.acquire("r", "a", 10, 0, 100, members=["me", "a", "late"]) == (0, 100)
    # A busy member's report comes 10 s late: until then its admits are not handed out again.
    clock.now += 10.0
    assert book.acquire("r", "me", 100, 0, 100, members=["me", "a", "late"]) == (0, 100)
    assert book.acquire("r", "late", 0, 25, 100, members=["me", "a", "late"]) == (0, 75)
    assert book.acquire("r", "me", 100, 0, 100, members=["me", "a", "late"]) == (75, 0), "25 stay late's"
    # A member that goes down meanwhile is not waited for.
    book.takeover("s", ["me", "a", "gone"], me="me")
    assert book.acquire("s", "a", 10, 0, 100, members=["me", "a"]) == (10, 90)


def test_a_take_over_forgets_the_holdings_an_earlier_book_had() -> None:
    book = LeaseBook(Clock())
    book.acquire("r", "a", 40, 0, 100)  # this member owned the room before, then again
    book.takeover("r", ["me", "a"], me="me")
    assert book.acquire("r", "me", 80, 0, 100) == (0, 100), "a's holding now is what it reports next"
    assert book.acquire("r", "a", 0, 10, 100) == (0, 90)


def test_a_lessee_that_is_no_member_keeps_its_holding_until_it_is_stale() -> None:
    clock = Clock()
    book = LeaseBook(clock)
    book.acquire("r", "crowd", 60, 0, 100, members=["a"])  # the crowd lane leases, but is no member
    assert book.acquire("r", "a", 60, 0, 100, members=["a"]) == (40, 0)
    clock.now += HOLDING_TTL_S + 1
    assert book.acquire("r", "a", 60, 40, 100, members=["a"]) == (60, 0)
