"""The isolation check's logic without Docker: when the celebrity's fan-out counts as running and as finished
(from the notifiers' metrics), the phase summary, and the bounds on what a caller asks for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from townhall.notifier.graphfile import GraphSpec
from townhall_tools.bench.notify import write_graph
from townhall_tools.hosts import isolation, notify_isolation
from townhall_tools.hosts.notify_isolation import (
    BULK_DONE,
    BULK_PLANNED,
    NOTIFIED,
    TASK_USERS,
    Fanout,
    check,
    fast_lag_p99_s,
    summary,
)


def _notifier(planned: float, done: float, notified: float) -> dict[str, float]:
    fast = 'townhall_notifier_fanout_tasks_total{lane="fast",stage="done"}'
    return {BULK_PLANNED: planned, BULK_DONE: done, NOTIFIED: notified, fast: 999.0}


def test_fanout_sums_notifiers_and_counts_from_the_start() -> None:
    before = Fanout.of([_notifier(10, 10, 50_000), _notifier(0, 0, 20)])
    assert before == Fanout(10, 10, 50_020)  # an earlier fan-out: not this one's progress
    planned = Fanout.of([_notifier(12, 10, 50_000), _notifier(0, 0, 20)]).since(before)
    assert not planned.running() and not planned.finished(8192)
    running = Fanout.of([_notifier(12, 11, 54_000), _notifier(0, 1, 2_000)]).since(before)
    assert running.running() and not running.finished(8192)


def test_fanout_finishes_when_every_planned_task_is_done_and_covers_the_followers() -> None:
    followers = 10 * TASK_USERS + 1
    tasks = 11
    # Planning is not over while fewer tasks than the followers need are planned, even if all are done.
    assert not Fanout(tasks - 1, tasks - 1, followers).finished(followers)
    assert not Fanout(tasks, tasks - 1, followers).finished(followers)
    # Records acknowledged name fewer users than the celebrity has (a task's records not all counted yet).
    assert not Fanout(tasks, tasks, followers - 1).finished(followers)
    assert Fanout(tasks, tasks, followers + 300).finished(followers)  # small hosts' users count too


def test_summary_of_a_phase() -> None:
    assert summary([0.2] * 98 + [0.9, 3.0], 100) == {
        "streams": 100, "notified": 100, "p50_s": 0.2, "p99_s": 0.9, "max_s": 3.0,
    }  # fmt: skip
    assert summary([], 4) == {"streams": 4, "notified": 0, "p50_s": None, "p99_s": None, "max_s": None}


def _lags(lane: str, counts: dict[str, float]) -> dict[str, float]:
    return {
        f'townhall_notifier_task_lag_seconds_bucket{{lane="{lane}",le="{le}"}}': n for le, n in counts.items()
    }


def test_fast_lane_lag_p99_from_the_histograms_between_two_scrapes() -> None:
    earlier = {
        **_lags("fast", {"0.5": 1000, "1.0": 1000, "2.5": 1000, "+Inf": 1000}),
        **_lags("bulk", {"+Inf": 7}),
    }
    # Since then, on notifier 0: 90 fast tasks within 0.5 s, 8 more within 1 s, 2 more within 2.5 s; on
    # notifier 1 nothing; the bulk lane's slow tasks do not count.
    later = {
        **_lags("fast", {"0.5": 1090, "1.0": 1098, "2.5": 1100, "+Inf": 1100}),
        **_lags("bulk", {"+Inf": 5000}),
    }
    assert fast_lag_p99_s([earlier, {}], [later, {}]) == 2.5
    later_ok = _lags("fast", {"0.5": 1098, "1.0": 1100, "2.5": 1100, "+Inf": 1100})
    assert fast_lag_p99_s([earlier, {}], [later_ok, {}]) == 1.0
    past_last = _lags("fast", {"0.5": 1000, "1.0": 1000, "2.5": 1000, "+Inf": 1010})
    assert fast_lag_p99_s([earlier], [past_last]) == math.inf
    assert fast_lag_p99_s([earlier], [earlier]) is None  # no fast task done in between


@pytest.mark.parametrize(
    ("followers", "small_hosts", "window_s"),
    [(0, 100, 10.0), (100_000_001, 100, 10.0), (1000, 0, 10.0), (1000, 1001, 10.0), (1000, 10, 0.0),
     (1000, 10, 121.0)],
)  # fmt: skip
def test_sizes_are_bounded(followers: int, small_hosts: int, window_s: float) -> None:
    with pytest.raises(ValueError):
        check(followers, small_hosts, window_s)


def test_run_refuses_unknown_halves_before_touching_the_topology(tmp_path: Path) -> None:
    cluster = None  # never reached: the arguments are checked first
    with pytest.raises(ValueError, match="halves"):
        isolation.run(cluster, 1.0, 1.0, 1.0, tmp_path, ("joins", "relays"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="followers"):
        isolation.run(
            cluster, 1.0, 1.0, 1.0, tmp_path, ("notifications",), isolation.Notifications(followers=0)
        )  # type: ignore[arg-type]
    assert not (tmp_path / "isolation.json").exists()


def test_the_graph_file_gives_the_small_hosts_apart_from_the_celebrity(tmp_path: Path) -> None:
    spec = GraphSpec(users=20_000, celebrity_followers=10_000, hosts=20)
    edges, hosts = write_graph(spec, tmp_path / "graph.bin")
    assert (tmp_path / "graph.bin").stat().st_size == 16 * edges
    assert len(hosts) == 20 and spec.celebrity not in {h for h, _ in hosts}
    assert edges == 10_000 + sum(len(f) for _, f in hosts)


def test_a_half_run_alone_keeps_the_other_halfs_last_figures(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    earlier = {
        "at": "2026-01-01T00:00:00",
        "joins": {"ratio": 1.5, "within_bound": True},
        "within_bound": True,
    }
    (tmp_path / "isolation.json").write_text(json.dumps(earlier))
    monkeypatch.setattr(notify_isolation, "run", lambda *_: {"p99_s_during": 3.2, "within_bound": False})
    report = isolation.run(None, 1.0, 1.0, 1.0, tmp_path, ("notifications",))  # type: ignore[arg-type]
    saved = json.loads((tmp_path / "isolation.json").read_text())
    assert saved == report
    assert saved["joins"] == {"at": "2026-01-01T00:00:00", "ratio": 1.5, "within_bound": True}
    assert saved["notifications"]["p99_s_during"] == 3.2 and saved["notifications"]["at"] == saved["at"]
    assert saved["within_bound"] is False  # every half on file, the kept one included


def test_lean_topologies_hold_what_each_half_uses_and_nothing_idle() -> None:
    joins = {h.role for h in isolation.lean_plan("joins")}
    notifications = [h.role for h in isolation.lean_plan("notifications")]
    # Joins: owners to join at, the crowd lane the storm goes to, a relay to place listeners on; brokers.
    assert joins == {"kafka", "admission", "crowd", "relay"}
    assert sum(h.role == "relay" for h in isolation.lean_plan("joins")) == 1
    # Notifications: the harness writes room starts itself; only the notifiers and the brokers run.
    assert sorted(set(notifications)) == ["kafka", "notifier"]
    assert notifications.count("notifier") == 2


def test_the_owners_get_a_core_the_storm_does_not_run_on() -> None:
    hosts = isolation.lean_plan("joins")
    pins = isolation.pinning(hosts, 2)
    assert pins is not None
    cpusets, generators = pins
    assert all(cpusets[h.name] == "0" for h in hosts if h.role == "admission")
    assert all(cpusets[h.name] == "1" for h in hosts if h.role != "admission")  # brokers, crowd lane, relay
    assert generators == {1}  # the load generators stay off the owners' core too
    eight = isolation.pinning(hosts, 8)
    assert eight is not None and eight[0][hosts[-1].name] == "1-7" and eight[1] == set(range(1, 8))
    assert isolation.pinning(hosts, 1) is None  # one CPU: nothing to pin to
