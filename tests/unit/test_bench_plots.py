"""Benchmark plots: each drawn from a small made-up result, with the series, axes and PNG a reader expects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from matplotlib.axes import Axes
from PIL import Image

from townhall_tools.bench import plots

AUDIENCE: dict[str, Any] = {
    "parameters": {"edges": 2, "latency_budget_ms": {"100": 300, "200": 400}},
    "intervals": [
        {
            "chunk_ms": 100,
            "steps": [
                {"listeners_connected": 500, "latency_p99_ms": 120.0, "passed": True},
                {"listeners_connected": 1000, "latency_p99_ms": 180.0, "passed": True},
                {"listeners_connected": 1500, "latency_p99_ms": 420.0, "passed": False},
            ],
        },
        {
            "chunk_ms": 200,
            "steps": [
                {"listeners_connected": 1000, "latency_p99_ms": 230.0, "passed": True},
                {"listeners_connected": 2000, "latency_p99_ms": None, "passed": False},  # nobody connected
            ],
        },
    ],
}
RELAY: dict[str, Any] = {
    "parameters": {"chunk_ms": 100},
    "runs": [
        {"target": "relay", "listeners_connected": 100, "latency_p99_ms": 110.0},
        {"target": "ceiling", "listeners_connected": 100, "latency_p99_ms": 101.0},
        {"target": "relay", "listeners_connected": 1000, "latency_p99_ms": 150.0},
        {"target": "ceiling", "listeners_connected": 1000, "latency_p99_ms": 120.0},
    ],
}


def _phase(hot: dict[str, list[int]], cold: dict[str, list[int]]) -> dict[str, Any]:
    return {"offered_hot_per_s": 3000.0, "hot": {"per_second": hot}, "cold": {"per_second": cold}}


JOINSTORM: dict[str, Any] = {
    "phases": {
        "capacity": {"admitted_per_s": 1000.0},
        "storm": _phase(
            {"granted": [900, 1000, 1000], "shed": [2000, 1990, 2000], "UNAVAILABLE": [0, 10, 0]},
            {"granted": [100, 100, 99]},
        ),
        "storm_one_lane": _phase(
            {"granted": [700, 800, 750], "waiting": [5, 0, 0]}, {"granted": [60, 70, 80]}
        ),
    }
}
SCALEOUT: dict[str, Any] = {
    "cpu_quota_cores": 0.5,
    "points": [
        {"admission": 1, "admitted_per_s": 400.0, "efficiency": 1.0},
        {"admission": 2, "admitted_per_s": 720.0, "efficiency": 0.9},
    ],
    "relays": {
        "cpu_quota_cores": 0.5,
        "latency_budget_ms": 300,
        "points": [
            {"edges": 1, "served": 1000, "efficiency": 1.0},
            {"edges": 2, "served": 1900, "efficiency": 0.95},
            {"edges": 4, "served": 3200, "efficiency": 0.8},
        ],
    },
}
NOTIFY: dict[str, Any] = {
    "parameters": {"celebrity_followers": 2_000_000},
    "series": {
        "seconds": [0.0, 0.5, 1.0, 1.5],
        "celebrity_notified": [0, 500_000, 1_500_000, 2_000_000],
        "small_notified_at_s": [0.3, 1.2],
        "small_latency_s": [0.2, 0.4],
    },
}


def _lines(axes: Axes) -> dict[str, tuple[list[float], list[float]]]:
    """Each labelled line of the axes: label -> (x, y)."""
    return {
        str(line.get_label()): (list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
        for line in axes.get_lines()
        if not str(line.get_label()).startswith("_")
    }


def test_audience_plots_p99_by_listeners_per_chunk_interval() -> None:
    (axes,) = plots.audience(AUDIENCE).axes
    lines = _lines(axes)
    assert lines == {
        "100 ms chunks": ([500, 1000, 1500], [120, 180, 420]),
        "200 ms chunks": ([1000], [230]),
    }
    assert axes.get_xlabel() == "listeners on the edges"
    assert axes.get_ylabel() == "p99 end-to-end latency (ms)"
    # Each interval's bar is a horizontal line at its budget; the failed step is marked.
    bars = {line.get_ydata()[0] for line in axes.get_lines() if str(line.get_label()).startswith("_")}
    assert bars == {300, 400}
    marked = [c.get_offsets().tolist() for c in axes.collections if len(c.get_offsets())]
    assert marked == [[[1500.0, 420.0]]]


def test_relay_plots_the_relay_against_the_ceiling() -> None:
    (axes,) = plots.relay(RELAY).axes
    assert _lines(axes) == {
        "relay": ([100, 1000], [110, 150]),
        "bare gRPC writer (ceiling)": ([100, 1000], [101, 120]),
    }


def test_joinstorm_plots_outcomes_over_time_per_storm_phase() -> None:
    figure = plots.joinstorm(JOINSTORM)
    crowd, one_lane = figure.axes
    assert _lines(crowd) == {
        "hot room: admitted": ([0, 1, 2], [900, 1000, 1000]),
        "hot room: shed": ([0, 1, 2], [2000, 1990, 2000]),
        "hot room: errors (UNAVAILABLE)": ([0, 1, 2], [0, 10, 0]),
        "cold rooms: admitted": ([0, 1, 2], [100, 100, 99]),
        "admit budget (capacity)": ([0, 1], [1000, 1000]),
    }
    assert set(_lines(one_lane)) == {
        "hot room: admitted",
        "hot room: waiting",
        "cold rooms: admitted",
        "admit budget (capacity)",
    }
    assert "crowd lane" in crowd.get_title() and "3,000 joins/s" in crowd.get_title()
    assert one_lane.get_xlabel() == "seconds into the measured window"
    assert crowd.get_ylabel() == "joins per second"


def test_joinstorm_without_per_second_counts_still_draws() -> None:
    (axes,) = plots.joinstorm({"phases": {"storm": {"hot": {}, "cold": {}}}}).axes
    assert "no per-second counts" in axes.get_title()


def test_notify_plots_notifications_over_time() -> None:
    top, bottom, rate = plots.notify(NOTIFY).axes
    assert _lines(top)["followers notified (millions)"] == ([0, 0.5, 1, 1.5], [0, 0.5, 1.5, 2])
    (speeds,) = _lines(rate).values()
    # Each interval between samples at its rate, from its start; the last one held to the end.
    assert speeds == ([0, 0.5, 1, 1.5], [1, 2, 1, 1])
    assert rate.get_ylabel() == "notifications per second (millions)"
    (small,) = bottom.collections
    assert small.get_offsets().tolist() == [[0.3, 0.2], [1.2, 0.4]]
    assert bottom.get_xlabel() == "seconds since the celebrity's room started"


def test_scaleout_plots_both_curves_beside_perfect_scaling() -> None:
    admission, relays = plots.scaleout(SCALEOUT).axes
    assert _lines(admission) == {
        "admitted joins/s": ([1, 2], [400, 720]),
        "N x one process": ([1, 2], [400, 800]),
    }
    assert _lines(relays) == {
        "listeners served": ([1, 2, 4], [1000, 1900, 3200]),
        "M x one edge": ([1, 2, 4], [1000, 2000, 4000]),
    }
    assert [t.get_text() for t in relays.texts] == ["1.00", "0.95", "0.80"]
    assert relays.get_xlabel().startswith("edge relays") and "300 ms" in relays.get_title()
    assert admission.get_xlabel() == "admission processes"


def test_scaleout_marks_a_point_whose_steps_all_passed() -> None:
    relays = {
        **SCALEOUT["relays"],
        "points": [{"edges": 1, "served": 200, "efficiency": 1.0, "limited_by_steps": True}],
    }
    (axes,) = plots.scaleout({"relays": relays}).axes
    assert [t.get_text() for t in axes.texts] == ["1.00*", "*: every step passed (a floor, not the limit)"]


def test_scaleout_with_one_half_draws_one_panel() -> None:
    (axes,) = plots.scaleout({**SCALEOUT, "points": []}).axes
    assert "listeners served" in _lines(axes)
    (axes,) = plots.scaleout({"cpu_quota_cores": 0.5, "points": SCALEOUT["points"]}).axes
    assert "admitted joins/s" in _lines(axes)


@pytest.mark.parametrize(
    ("name", "report"),
    [
        ("audience", AUDIENCE),
        ("relay", RELAY),
        ("joinstorm", JOINSTORM),
        ("notify", NOTIFY),
        ("scaleout", SCALEOUT),
    ],
)
def test_a_png_is_written_next_to_the_json(tmp_path: Path, name: str, report: dict[str, Any]) -> None:
    (tmp_path / f"{name}.json").write_text(json.dumps(report))
    assert plots.write_all(tmp_path) == [tmp_path / f"{name}.png"]
    with Image.open(tmp_path / f"{name}.png") as image:
        image.verify()
        assert image.format == "PNG"
        assert image.size[0] >= 800 and image.size[1] >= 400
