"""The join rate search (bench.join_storm.search) without servers: rising until a step is not clean, and a
first step past capacity halving the start instead of ending the search with nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from rich.console import Console

from townhall_tools.bench import join_storm
from townhall_tools.bench.join_load import Load

CAPACITY = 150.0


def _figures(rate: float) -> dict[str, Any]:
    served = min(rate, CAPACITY)
    cold = {"sent_per_s": rate, "granted_per_s": served, "p99_ms": 20.0 if rate <= CAPACITY else 900.0}
    return {"cold": cold, "hot": {}, "admitted_per_s": served, "server_cpu_cores": 0.25,
            "admitted_per_core_s": served * 4, "generator_cpu_cores": 0.1}  # fmt: skip


def _search(
    monkeypatch: pytest.MonkeyPatch, start: float, refine: int = 0
) -> tuple[dict[str, Any], list[float]]:
    offered: list[float] = []

    async def offer(load: Load, *_: Any) -> dict[str, Any]:
        offered.append(load.cold_rate)
        return _figures(load.cold_rate)

    monkeypatch.setattr(join_storm, "offer", offer)

    def load_at(rate: float) -> Load:
        return Load(("a:1",), None, 0.0, ("room",), rate, 1.0)

    result = asyncio.run(join_storm.search(load_at, start, [], "test", Console(quiet=True), "cold", refine))
    return result, offered


def test_the_search_rises_until_a_step_is_not_clean_and_keeps_the_best(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result, offered = _search(monkeypatch, 100.0)
    assert [round(r, 1) for r in offered] == [100.0, 120.0, 144.0, 172.8]
    assert result["admitted_per_s"] == 144.0
    assert [s["clean"] for s in result["steps"]] == [True, True, True, False]


def test_a_start_past_capacity_is_halved_before_the_search_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    result, offered = _search(monkeypatch, 400.0)
    assert [round(r, 1) for r in offered] == [400.0, 200.0, 100.0, 120.0, 144.0, 172.8]
    assert result["admitted_per_s"] == 144.0
    with pytest.raises(RuntimeError, match="not even"):
        _search(monkeypatch, 5_000.0)  # 5,000 -> 625 after three halvings: still past capacity


def test_refining_steps_narrow_the_gap_between_the_best_clean_rate_and_the_first_failed_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """144 clean, 172.8 not (capacity 150): the figure is known within x1.2; three more steps take it within
    x1.024, and find a better clean rate."""
    result, offered = _search(monkeypatch, 100.0, refine=3)
    assert [round(r, 1) for r in offered] == [100.0, 120.0, 144.0, 172.8, 157.7, 150.7, 147.3]
    assert round(result["admitted_per_s"], 1) == 147.3
    assert [s["clean"] for s in result["steps"]] == [True, True, True, False, False, False, True]
