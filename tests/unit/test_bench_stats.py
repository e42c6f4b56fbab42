"""Benchmark statistics: histogram percentiles, merging, nearest-rank percentiles, gaps."""

from __future__ import annotations

from townhall.bench.stats import LatencyHistogram, gap, percentile


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
