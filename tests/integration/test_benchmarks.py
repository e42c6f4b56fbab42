"""The stream benchmarks run end to end at a tiny size: what `make bench` runs must not rot.

The figures are not asserted (they are for `make bench` on a quiet machine); that every listener
was connected and heard the room with nothing lost and no stream error is.
"""

from __future__ import annotations

from pathlib import Path

from townhall_tools.bench import audience, relay


def test_the_relay_benchmark_serves_every_listener_on_the_relay_and_the_ceiling(tmp_path: Path) -> None:
    report = relay.run(tmp_path, [20], 1.0)
    runs = report["runs"]
    assert len({r["target"] for r in runs}) == 2, runs  # the relay and the bare ceiling
    for r in runs:
        assert r["listeners_connected"] == 20, r
        assert r["delivered_per_s"] > 0 and r["stream_errors"] == 0 and r["chunks_lost"] == 0, r
    assert (tmp_path / "relay.json").exists()


def test_the_audience_benchmark_runs_a_step_and_its_ceiling(tmp_path: Path) -> None:
    report = audience.run(tmp_path, edges=1, listeners=[20], seconds=1.0, chunks=[100])
    (interval,) = report["intervals"]
    (step,) = interval["steps"]
    assert step["listeners_connected"] == 20, step
    assert step["delivered_per_s"] > 0 and step["stream_errors"] == 0 and step["chunks_lost"] == 0, step
    assert step["first_audio_probes"] > 0, "late joiners were probed"
    assert interval["ceiling"]["listeners_connected"] == 20
    assert (tmp_path / "audience.json").exists()
