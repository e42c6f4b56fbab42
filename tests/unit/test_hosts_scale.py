"""The scale-out harness's logic without Docker: efficiency, the step search, each M's point, the step
checks and the JSON a run leaves (`make cluster-scale` runs it for real)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from townhall.cli.main import _parser
from townhall_tools.bench.audience import step_search
from townhall_tools.hosts import scale


def test_efficiency_is_against_n_times_the_single_process() -> None:
    points: list[dict[str, Any]] = [
        {"edges": 1, "served": 500},
        {"edges": 2, "served": 900},
        {"edges": 4, "served": 1000},
    ]
    scale.efficiency(points, "edges", "served")
    assert [p["efficiency"] for p in points] == [1.0, 0.9, 0.5]


@pytest.mark.parametrize(
    "points", [[{"edges": 2, "served": 900}], [{"edges": 1, "served": 0}, {"edges": 2, "served": 10}]]
)
def test_efficiency_without_a_single_process_figure_is_none(points: list[dict[str, Any]]) -> None:
    scale.efficiency(points, "edges", "served")
    assert all(p["efficiency"] is None for p in points)


def _search(outcomes: dict[int, list[bool]], counts: list[int]) -> tuple[list[dict[str, Any]], list[int]]:
    """Runs the search with a fake measurement: `outcomes[n]` says whether each attempt at n passes."""
    measured: list[int] = []

    async def measure(n: int) -> dict[str, Any]:
        measured.append(n)
        return {"listeners": n, "ok": outcomes[n][measured.count(n) - 1]}

    steps = asyncio.run(step_search(counts, measure, lambda s: bool(s["ok"])))
    return steps, measured


def test_the_step_search_stops_at_the_first_step_that_fails_twice() -> None:
    steps, measured = _search(
        {100: [True], 200: [False, True], 400: [False, False], 800: [True]}, [100, 200, 400, 800]
    )
    assert measured == [100, 200, 200, 400, 400]  # 800 never tried
    assert [(s["listeners"], s["passed"], s["attempt"]) for s in steps] == [
        (100, True, 1), (200, False, 1), (200, True, 2), (400, False, 1), (400, False, 2),
    ]  # fmt: skip


def test_the_step_search_runs_every_step_that_passes() -> None:
    steps, measured = _search({1: [True], 2: [True]}, [1, 2])
    assert measured == [1, 2] and all(s["passed"] for s in steps)


def _step(per_edge: int, edges: int, passed: bool, connected: int | None = None) -> dict[str, Any]:
    listeners = per_edge * edges
    return {
        "listeners": listeners,
        "listeners_connected": listeners if connected is None else connected,
        "delivered_per_s": listeners * 10.0,
        "latency_p99_ms": 150.0 if passed else 900.0,
        "cores": 0.4,
        "origin_cores": 0.05,
        "passed": passed,
    }


def test_a_relay_point_is_the_passing_step_with_most_listeners() -> None:
    steps = [_step(250, 2, True), _step(500, 2, True), _step(1000, 2, False)]
    point = scale.relay_point(2, steps, [250, 500, 1000])
    assert (point["served"], point["delivered_per_s"], point["latency_p99_ms"]) == (1000, 10000.0, 150.0)
    assert point["limited_by_steps"] is False and point["steps"] == steps


def test_a_relay_point_says_when_the_steps_ran_out_before_the_edges_did() -> None:
    point = scale.relay_point(4, [_step(250, 4, True), _step(500, 4, True)], [250, 500])
    assert point["served"] == 2000 and point["limited_by_steps"] is True


def test_a_relay_point_with_no_passing_step_served_none() -> None:
    point = scale.relay_point(1, [_step(250, 1, False), _step(250, 1, False)], [250, 500])
    assert (point["served"], point["latency_p99_ms"], point["limited_by_steps"]) == (0, None, False)


@pytest.mark.parametrize(
    ("steps", "edges", "per_edge", "words"),
    [
        ([], [], [250], "nothing to run"),
        ([1, 9], [], [250], "admission processes"),
        ([], [1, 9], [250], "edge relays"),
        ([], [1], [], "listeners"),
        ([], [1], [500, 250], "rising"),
        ([], [1], [250, 5000], "listeners"),
    ],
)
def test_step_lists_the_topology_cannot_take_are_refused(
    steps: list[int], edges: list[int], per_edge: list[int], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        scale.check(steps, edges, per_edge)


def test_the_relay_half_alone_keeps_the_admission_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admission = {
        "at": "earlier",
        "cpu_quota_cores": 0.5,
        "points": [{"admission": 1, "admitted_per_s": 700.0, "efficiency": 1.0}],
    }
    (tmp_path / "scaleout.json").write_text(json.dumps(admission))
    relays = {
        "cpu_quota_cores": 0.5,
        "latency_budget_ms": 300,
        "points": [{"edges": 1, "served": 500, "efficiency": 1.0}],
    }
    monkeypatch.setattr(scale, "_relays", lambda *args: relays)
    monkeypatch.setattr(
        scale, "_admission", lambda *args: pytest.fail("the admission half was not asked for")
    )
    report = scale.run(
        tmp_path, "img", "kafka", [], 1000.0, 5.0, tmp_path, edges=[1], listeners_per_edge=[250]
    )
    written = json.loads((tmp_path / "scaleout.json").read_text())
    assert written == report
    assert written["points"] == admission["points"] and written["relays"] == relays
    assert (tmp_path / "scaleout.png").stat().st_size > 0


def test_either_half_can_be_skipped_from_the_command_line() -> None:
    args = _parser().parse_args(
        ["cluster", "scale", "--steps", "--edges", "1", "2", "--listeners", "50", "100"]
    )
    assert (args.steps, args.edges, args.listeners) == ([], [1, 2], [50, 100])
    defaults = _parser().parse_args(["cluster", "scale"])
    assert (defaults.steps, defaults.edges) == ([1, 2, 4], [1, 2, 4])
