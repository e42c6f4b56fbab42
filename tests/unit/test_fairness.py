"""The fair admit budget: a hot room takes what cold rooms leave, never what they need."""

from __future__ import annotations

from townhall.admission.fairness import FairBudget
from townhall.admission.waiting import WaitingLine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_hot_room_cannot_starve_cold_rooms() -> None:
    clock = Clock()
    budget = FairBudget(1000, clock)
    admitted = {"hot": 0, "cold": 0}
    offered = {"hot": 0, "cold": 0}
    for tick in range(10_000):  # 10 s; the hot room asks 5,000/s, 20 cold rooms 10/s each
        clock.now += 0.001
        for _ in range(5):
            offered["hot"] += 1
            admitted["hot"] += budget.take("hot")
        if tick % 5 == 0:
            offered["cold"] += 1
            admitted["cold"] += budget.take(f"cold-{tick % 100 // 5}")
    assert admitted["cold"] == offered["cold"], "every cold join gets through"
    total = admitted["hot"] + admitted["cold"]
    assert 9_500 <= total <= 10_300, "the budget is used, not wasted"


def test_no_budget_admits_everything() -> None:
    budget = FairBudget(0)
    assert all(budget.take("r") for _ in range(10_000))


def test_waiting_line_keeps_order_and_bounds() -> None:
    clock = Clock()
    line = WaitingLine(2, clock)
    assert line.wait(7, 1.0) == 1
    assert line.wait(8, 1.0) == 2
    assert line.wait(9, 1.0) == 0, "full"
    assert line.ahead(8) == 1 and line.ahead(9) == 2
    assert line.wait(8, 1.0) == 2, "coming back keeps the place"
    line.remove(7)
    assert line.ahead(8) == 0
    clock.now += 2
    assert len(line) == 0, "a user who does not come back lapses"
