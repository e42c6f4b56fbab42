"""The seed event's sizing from the benches' JSON (bench/capacity.py): the arithmetic, what saturates
first, and a missing input left unsized rather than guessed."""

from __future__ import annotations

import json
from pathlib import Path

from townhall_tools.bench import capacity


def _bench(tmp_path: Path, *, relays: bool = True, notifications: bool = True) -> Path:
    scale = {
        "at": "2026-12-03T15:00:00",
        "cpu_quota_cores": 0.25,
        "points": [
            {"admission": 1, "admitted_per_s": 200.0},
            {"admission": 2, "admitted_per_s": 390.0},
            {"admission": 4, "admitted_per_s": 760.0},
        ],
    }
    if relays:
        scale["relays"] = {
            "cpu_quota_cores": 0.1,
            "chunk_ms": 100,
            "points": [
                {"edges": 1, "served": 150, "sent_bytes_per_listener_s": 4000.0},
                {"edges": 4, "served": 560, "sent_bytes_per_listener_s": 4200.0},
            ],
        }
    (tmp_path / "scaleout.json").write_text(json.dumps(scale))
    if notifications:
        isolation = {"notifications": {"fanout_per_core_s": 2_000_000.0, "record_bytes_per_follower": 8.2}}
        (tmp_path / "isolation.json").write_text(json.dumps(isolation))
    return tmp_path


def test_each_tier_is_sized_from_the_largest_measured_step_at_the_stated_rules(tmp_path: Path) -> None:
    report = capacity.write(_bench(tmp_path))
    admission, edges, notifiers = report["tiers"]
    # One process: 200 joins/s on 0.25 cores = 800 per core; the peak second is 2 x 1M/60 s = 33,333/s at
    # 70% of each core. The 4-process step scaled at 760 / (4 x 200).
    assert admission["per_core"] == 800.0
    assert admission["cores"] == 60
    assert admission["efficiency"] == 0.95
    # One edge: 150 listeners on 0.1 cores = 1,500 per core; 1,050 per one-core pod at 70%: CPU binds first.
    assert edges["per_core"] == 1500.0
    assert edges["pods"] == 572
    assert edges["bound"].startswith("CPU")
    assert edges["efficiency"] == round(560 / 600, 3)
    assert report["bandwidth"]["total_bytes_s"] == 600_000 * 4000.0
    # 100M in 60 s = 1.67M/s against 2M/s per core at 70%.
    assert notifiers["cores"] == 2
    assert report["kafka"]["brokers"] == 3
    assert report["kafka"]["partitions"] == 12
    assert report["total_cores"] == 60 + 572 + 2
    assert (tmp_path / "capacity.png").stat().st_size > 0
    assert json.loads((tmp_path / "capacity.json").read_text()) == report


def test_a_tier_whose_figures_are_missing_is_not_sized(tmp_path: Path) -> None:
    report = capacity.size(_bench(tmp_path, relays=False, notifications=False))
    admission, edges, notifiers = report["tiers"]
    assert admission["cores"] == 60
    assert edges["cores"] is None and edges["bound"] == "not measured"
    assert notifiers["cores"] is None and notifiers["bound"] == "not measured"


def test_an_edge_pod_stops_at_its_listener_capacity_when_its_core_would_take_more(tmp_path: Path) -> None:
    bench = _bench(tmp_path)
    scale = json.loads((bench / "scaleout.json").read_text())
    scale["relays"]["points"] = [{"edges": 1, "served": 500, "sent_bytes_per_listener_s": 4000.0}]
    (bench / "scaleout.json").write_text(json.dumps(scale))
    edges = capacity.size(bench)["tiers"][1]
    # 5,000 listeners per core, 3,500 at 70%: relay.listener_capacity (2,500) binds first.
    assert edges["bound"].startswith("relay.listener_capacity")
    assert edges["pods"] == 240
