"""Benchmark statistics: histogram percentiles, merging, counts per second, percentiles, gaps; the storm's
per-second counts from both of its load generators."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from townhall_tools.bench import join_load_ghz
from townhall_tools.bench.join_load import Load, _figures
from townhall_tools.bench.stats import LatencyHistogram, PerSecond, gap, percentile


def test_histogram_percentiles_are_exact_to_a_bucket() -> None:
    hist = LatencyHistogram(resolution_us=100)
    for ms in range(1, 101):  # 1..100 ms
        hist.add_us(ms * 1000 - 50)
    assert hist.count == 100
    assert hist.percentile_ms(0.5) == 50.0
    assert hist.percentile_ms(0.99) == 99.0
    assert hist.percentile_ms(1.0) == 100.0


def test_histogram_merges_across_processes_and_clamps_outliers() -> None:
    a, b = LatencyHistogram(max_us=1_000_000), LatencyHistogram(max_us=1_000_000)
    a.add_us(-5)  # clock noise counts as zero
    b.add_us(5_000_000)  # beyond the range: counted in the last bucket
    a.merge(b.counts)
    assert a.count == 2
    assert a.percentile_ms(0.5) == 0.1
    assert a.percentile_ms(1.0) == 1000.1


def test_empty_inputs_have_no_percentile() -> None:
    assert LatencyHistogram().percentile_ms(0.5) is None
    assert percentile([], 0.5) is None


def test_nearest_rank_percentile() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.99) == 5.0
    assert percentile([7.0], 0.01) == 7.0


def test_gap_counts_missing_sequences_only() -> None:
    assert gap(0, 17) == 0  # first chunk received: nothing to compare
    assert gap(4, 5) == 0
    assert gap(4, 9) == 4
    assert gap(9, 9) == 0


def test_per_second_counts_inside_the_window_only() -> None:
    window = PerSecond(start=1000.0, seconds=2.5)  # three slots: [0, 1), [1, 2), [2, 3)
    window.add(999.9, "granted")  # before: warm-up, not counted
    window.add(1000.0, "granted")
    window.add(1001.99, "shed", 3)
    window.add(1002.5, "granted")
    window.add(1003.0, "granted")  # after: left out, so a series never outgrows the window
    assert window.counts == {"granted": [1, 0, 1], "shed": [0, 3, 0]}


def test_per_second_merges_across_processes() -> None:
    total = PerSecond(0.0, 3)
    total.merge({"granted": [1, 2, 3], "waiting": [0, 1, 0]})
    total.merge({"granted": [1, 1, 1, 9]})  # a longer series: its extra slot is left out
    assert total.counts == {"granted": [2, 3, 4], "waiting": [0, 1, 0]}


def test_python_generators_per_second_counts_add_up() -> None:
    load = Load(("a",), "hot", 300.0, ("c",), 10.0, seconds=2.0)
    one = {"sent": 3, "unsent": 0, "outcomes": {"granted": 2, "shed": 1}, "latency": {10: 3}}
    results = [
        {
            "hot": {**one, "per_second": {"granted": [1, 1], "shed": [0, 1]}},
            "cold": {**one, "per_second": {}},
        },
        {
            "hot": {**one, "per_second": {"granted": [2, 0]}},
            "cold": {**one, "per_second": {"granted": [1, 1]}},
        },
    ]
    figures = _figures(load, results, {"start": 0.0, "end": 1.0})
    assert figures["hot"]["per_second"] == {"granted": [3, 1], "shed": [0, 1]}
    assert figures["cold"]["per_second"] == {"granted": [1, 1]}


def test_ghz_details_give_outcomes_per_second(tmp_path: Path) -> None:
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()
    # Go writes RFC 3339 with up to nine fractional digits, in the process's zone.
    calls = [
        ("2026-01-02T03:04:05Z", "OK"),
        ("2026-01-02T05:04:05.5+02:00", "OK"),
        ("2026-01-02T03:04:06.250000123Z", "ResourceExhausted"),
        ("2026-01-02T03:04:06.5Z", "Unavailable"),
        ("2026-01-02T03:04:07Z", "OK"),
    ]
    report = {
        "count": 5,
        "statusCodeDistribution": {"OK": 3, "ResourceExhausted": 1, "Unavailable": 1},
        "latencyDistribution": [
            {"percentage": 50, "latency": 2_000_000},
            {"percentage": 99, "latency": 9_000_000},
        ],
        "details": [
            {"timestamp": at, "latency": 1_000_000, "error": "", "status": code} for at, code in calls
        ],
    }
    (tmp_path / "hot.json").write_text(json.dumps(report))
    read = join_load_ghz.read(tmp_path / "hot.json")
    assert join_load_ghz.first_call(read) == start
    figures = join_load_ghz.figures(read, 3.0, start)
    assert figures["per_second"] == {"granted": [2, 0, 1], "shed": [0, 1, 0], "unavailable": [0, 1, 0]}
    assert (figures["granted_per_s"], figures["p50_ms"], figures["p99_ms"]) == (1.0, 2.0, 9.0)
    assert join_load_ghz.first_call({"details": []}) is None


def test_ghz_reports_of_one_class_merge_into_one() -> None:
    """A class's load over several addresses is one ghz process each: its figures are all their calls'."""

    def report(codes: dict[str, int], latencies_ms: list[float]) -> dict[str, object]:
        at = "2026-01-02T03:04:05Z"
        details = [{"timestamp": at, "latency": ms * 1e6, "error": "", "status": "OK"} for ms in latencies_ms]
        return {"count": len(latencies_ms), "statusCodeDistribution": codes, "details": details}

    fast = report({"OK": 99}, [1.0] * 99)
    slow = report({"OK": 1, "Unavailable": 0}, [500.0])
    assert join_load_ghz.merge([fast]) is fast
    merged = join_load_ghz.merge([fast, slow])
    assert merged["count"] == 100 and merged["statusCodeDistribution"] == {"OK": 100, "Unavailable": 0}
    figures = join_load_ghz.figures(merged, 1.0, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())
    # p99 of 100 calls is the 99th: one slow call of a hundred is past it, two would not be.
    assert (figures["p50_ms"], figures["p99_ms"], figures["granted_per_s"]) == (1.0, 1.0, 100.0)
    merged = join_load_ghz.merge([fast, slow, slow])
    assert join_load_ghz.figures(merged, 1.0, 0.0)["p99_ms"] == 500.0
