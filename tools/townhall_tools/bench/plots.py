"""PNG plots of the benchmarks' JSON, written next to it: what a table of numbers hides at a glance.

- audience.png: p99 end-to-end latency against listeners, one line per chunk interval, with each
  interval's bar; a step that failed it (latency, a lost chunk, a stream error) is an open marker;
- relay.png: the same for one relay against the bare gRPC writer (100 ms chunks);
- joinstorm.png: the hot room's joins admitted, waiting and shed each second of the storm (with and
  without the crowd lane), the admit budget, and the cold rooms' grants beside them;
- notify.png: the celebrity's followers notified over time (and per second), and when each small
  host's followers were notified, with the latency they saw;
- scaleout.png: admitted joins/s against admission processes, and listeners served against edge relays,
  in containers of one CPU quota each, beside perfect scaling, with each step's efficiency (two panels;
  `townhall cluster scale`, townhall_tools.hosts.scale);
- capacity.png: the seed event's cores per service and pods as the audience grows (bench/capacity.py,
  from the scale-out and isolation figures).

matplotlib (a dependency of townhall-tools) draws them with its Agg backend: files only, no display.
`python -m townhall_tools.bench.plots [.townhall/bench]` redraws every plot from the JSON there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

OUTCOMES = (("granted", "admitted", "tab:green"), ("waiting", "waiting", "tab:orange"))
SHED = ("shed", "shed", "tab:red")
KNOWN = {"granted", "waiting", "shed"}  # anything else a join ends with is an error
STORM_PHASES = (("storm", "storm, hot room on the crowd lane"), ("storm_one_lane", "storm, one lane"))


def _figure(width: float = 9.0, height: float = 5.0) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _latency_axes(axes: Axes, title: str, xlabel: str) -> None:
    """Titles, labels, a zero floor, a light grid and the legend of a latency-by-listeners plot."""
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("p99 end-to-end latency (ms)")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()


def audience(report: Mapping[str, Any]) -> Figure:
    """Listeners (connected) against p99 latency, a line per chunk interval, each with its bar."""
    figure = _figure()
    axes = figure.add_subplot()
    budgets = report["parameters"].get("latency_budget_ms", {})
    for interval, color in zip(
        report["intervals"], ("tab:blue", "tab:orange", "tab:green", "tab:purple"), strict=False
    ):
        chunk = interval["chunk_ms"]
        steps = [s for s in interval["steps"] if s.get("latency_p99_ms") is not None]
        x = [s["listeners_connected"] for s in steps]
        y = [s["latency_p99_ms"] for s in steps]
        axes.plot(x, y, color=color, marker="o", label=f"{chunk} ms chunks")
        failed = [(a, b) for a, b, s in zip(x, y, steps, strict=True) if not s["passed"]]
        axes.scatter(
            [a for a, _ in failed],
            [b for _, b in failed],
            s=90,
            facecolors="white",
            edgecolors=color,
            zorder=3,
        )
        budget = budgets.get(str(chunk), budgets.get(chunk))
        if budget:
            axes.axhline(budget, color=color, linestyle=":", linewidth=1)
    edges = report["parameters"].get("edges", "?")
    title = f"Audience: p99 latency by listeners (origin + {edges} edges; dotted: the bar, open: failed)"
    _latency_axes(axes, title, "listeners on the edges")
    return figure


def relay(report: Mapping[str, Any]) -> Figure:
    """Listeners against p99 latency for the relay and for the bare gRPC writer (the ceiling)."""
    figure = _figure()
    axes = figure.add_subplot()
    for target, color in (("relay", "tab:blue"), ("ceiling", "tab:gray")):
        runs = [r for r in report["runs"] if r["target"] == target and r.get("latency_p99_ms") is not None]
        label = "relay" if target == "relay" else "bare gRPC writer (ceiling)"
        axes.plot(
            [r["listeners_connected"] for r in runs],
            [r["latency_p99_ms"] for r in runs],
            color=color,
            marker="o",
            label=label,
        )
    chunk = report["parameters"].get("chunk_ms", 100)
    title = f"Relay fan-out: p99 latency by listeners ({chunk} ms chunks, one relay process)"
    _latency_axes(axes, title, "listeners")
    return figure


def _series(per_second: Mapping[str, Sequence[int]], outcomes: set[str] | None = None) -> list[int]:
    """Per second, the sum over `outcomes` (None: every outcome not in KNOWN, the errors)."""
    picked = [v for k, v in per_second.items() if (k in outcomes if outcomes is not None else k not in KNOWN)]
    width = max((len(v) for v in per_second.values()), default=0)
    return [sum(v[i] for v in picked if i < len(v)) for i in range(width)]


def joinstorm(report: Mapping[str, Any]) -> Figure:
    """Per second of each storm phase: the hot room's joins by outcome and the cold rooms' grants."""
    phases = report["phases"]
    shown = [
        (name, title) for name, title in STORM_PHASES if phases.get(name, {}).get("hot", {}).get("per_second")
    ]
    figure = _figure(height=3.2 * max(1, len(shown)) + 0.6)
    capacity = phases.get("capacity", {}).get("admitted_per_s")
    axes_list = figure.subplots(max(1, len(shown)), 1, sharex=True, squeeze=False)[:, 0]
    for axes, (name, title) in zip(axes_list, shown, strict=False):
        hot, cold = phases[name]["hot"], phases[name]["cold"]
        for key, label, color in (*OUTCOMES, SHED):
            series = _series(hot["per_second"], {key})
            if any(series):
                axes.plot(range(len(series)), series, color=color, label=f"hot room: {label}")
        errors = _series(hot["per_second"])
        if any(errors):
            kinds = ", ".join(sorted(k for k in hot["per_second"] if k not in KNOWN))
            axes.plot(range(len(errors)), errors, "k--", label=f"hot room: errors ({kinds})")
        granted = _series(cold.get("per_second") or {}, {"granted"})
        if any(granted):
            axes.plot(range(len(granted)), granted, color="tab:blue", label="cold rooms: admitted")
        if capacity:
            axes.axhline(capacity, color="gray", linestyle=":", label="admit budget (capacity)")
        offered = phases[name].get("offered_hot_per_s")
        axes.set_title(f"{title}: {offered:,.0f} joins/s offered to the hot room" if offered else title)
        axes.set_ylabel("joins per second")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axes_list[-1].set_xlabel("seconds into the measured window")
    if not shown:
        axes_list[0].set_title("Join storm: no per-second counts in this report")
    return figure


def notify(report: Mapping[str, Any]) -> Figure:
    """The celebrity's followers notified over time and per second; the small hosts' notifications."""
    series = report.get("series") or {}
    figure = _figure(height=7.0)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    seconds, notified = series.get("seconds", []), series.get("celebrity_notified", [])
    top.plot(seconds, [n / 1e6 for n in notified], color="tab:blue", label="followers notified (millions)")
    top.set_ylabel("followers notified (millions)")
    top.set_ylim(bottom=0)
    rate = top.twinx()
    # Each interval between two samples at its mean rate, drawn from its start to its end.
    pairs = list(zip(seconds, notified, strict=True))
    spans = [(t0, (n1 - n0) / (t1 - t0)) for (t0, n0), (t1, n1) in itertools.pairwise(pairs) if t1 > t0]
    if spans:
        xs = [t for t, _ in spans] + [seconds[-1]]
        ys = [v / 1e6 for _, v in spans]
        rate.step(xs, [*ys, ys[-1]], where="post", color="tab:orange", label="notifications/s (millions)")
    rate.set_ylabel("notifications per second (millions)")
    rate.set_ylim(bottom=0)
    followers = report["parameters"].get("celebrity_followers", 0)
    top.set_title(f"Celebrity notification: {followers:,} followers while small hosts start rooms")
    top.grid(alpha=0.3)
    handles = top.get_legend_handles_labels()[0] + rate.get_legend_handles_labels()[0]
    top.legend(handles, [str(h.get_label()) for h in handles], loc="lower right")
    bottom.scatter(
        series.get("small_notified_at_s", []), series.get("small_latency_s", []), s=12, color="tab:green"
    )
    bottom.set_ylabel("small host's follower:\nlatency (s)")
    bottom.set_xlabel("seconds since the celebrity's room started")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    return figure


def _scaling(
    axes: Axes, points: Sequence[Mapping[str, Any]], count: str, value: str, label: str, perfect: str
) -> None:
    """`value` against `count`, beside perfect scaling from count 1, each point marked with its efficiency."""
    counts = [p[count] for p in points]
    values = [p[value] for p in points]
    axes.plot(counts, values, marker="o", label=label)
    base = next((p[value] for p in points if p[count] == 1), None)
    if base:
        axes.plot(counts, [n * base for n in counts], linestyle="--", color="grey", label=perfect)
    for point in points:
        if point.get("efficiency") is not None:
            mark = "*" if point.get("limited_by_steps") else ""
            axes.annotate(
                f"{point['efficiency']:.2f}{mark}",
                (point[count], point[value]),
                xytext=(6, -12),
                textcoords="offset points",
            )
    if any(p.get("limited_by_steps") for p in points):
        axes.text(
            0.99, 0.02, "*: every step passed (a floor, not the limit)", transform=axes.transAxes, ha="right"
        )
    axes.margins(x=0.1)
    axes.set_ylabel(label)
    axes.set_xticks(counts)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()


def scaleout(report: Mapping[str, Any]) -> Figure:
    """The scale-out curves, a panel each: admitted joins/s against admission processes, and listeners
    served (p99 within the bar, nothing lost) against edge relays, each process on the same CPU quota,
    beside perfect scaling from one, with each step's scaling efficiency. A half missing from the report
    is left out."""
    admission = report.get("points") or []
    relays = report.get("relays") or {}
    panels = [
        name for name, present in (("admission", admission), ("relays", relays.get("points"))) if present
    ]
    figure = _figure(width=7.0 * max(1, len(panels)))
    axes_list = figure.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for axes, name in zip(axes_list, panels, strict=False):
        if name == "admission":
            _scaling(axes, admission, "admission", "admitted_per_s", "admitted joins/s", "N x one process")
            axes.set_title(f"Admission scale-out ({report['cpu_quota_cores']} core quota per process)")
            axes.set_xlabel("admission processes")
        else:
            _scaling(axes, relays["points"], "edges", "served", "listeners served", "M x one edge")
            axes.set_title(
                f"Relay scale-out ({relays['cpu_quota_cores']} core quota per edge; "
                f"p99 <= {relays['latency_budget_ms']} ms, 0 lost)"
            )
            axes.set_xlabel("edge relays (one origin above them)")
    if not panels:
        axes_list[0].set_title("Scale-out: no points in this report")
    return figure


def capacity(report: Mapping[str, Any]) -> Figure:
    """The seed event's sizing (bench/capacity.py): cores per service at the event, and the pods each tier
    needs as the audience grows to twice the event (join attempts and followers growing with it)."""
    figure = _figure(width=12.0)
    left, right = figure.subplots(1, 2)
    tiers = [t for t in report["tiers"] if t["cores"]]
    names = [t["service"] for t in tiers]
    left.barh(names, [t["cores"] for t in tiers], color="tab:blue")
    for y, tier in enumerate(tiers):
        left.annotate(f" {tier['cores']} cores", (tier["cores"], y), va="center")
    left.set_xlabel("cores at the event (pods of one core)")
    left.set_title(f"Cores per service: {report['total_cores']} in all")
    left.grid(alpha=0.3, axis="x")
    listeners = report["event"]["listeners"]
    scales = [i / 10 for i in range(1, 21)]
    for tier in tiers:
        right.plot(
            [s * listeners / 1000 for s in scales],
            [math.ceil(s * tier["pods"]) for s in scales],
            label=tier["service"],
        )
    right.axvline(listeners / 1000, color="grey", linestyle=":", label=f"the event ({listeners:,} listeners)")
    right.set_xlabel("thousands of listeners (joins and followers in the event's proportion)")
    right.set_ylabel("pods")
    right.set_title("Pods as the audience grows")
    right.grid(alpha=0.3)
    right.legend()
    return figure


PLOTS: dict[str, Callable[[Mapping[str, Any]], Figure]] = {
    "audience": audience,
    "relay": relay,
    "joinstorm": joinstorm,
    "notify": notify,
    "scaleout": scaleout,
    "capacity": capacity,
}


def write(out_dir: Path, name: str) -> Path:
    """Draws out_dir/<name>.png from out_dir/<name>.json; returns the PNG's path."""
    report = json.loads((out_dir / f"{name}.json").read_text())
    path = out_dir / f"{name}.png"
    PLOTS[name](report).savefig(path)
    return path


def write_all(out_dir: Path) -> list[Path]:
    """Draws a plot for each benchmark JSON in out_dir."""
    return [write(out_dir, name) for name in PLOTS if (out_dir / f"{name}.json").exists()]


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m townhall_tools.bench.plots", description=__doc__)
    parser.add_argument("out", type=Path, nargs="?", default=Path(".townhall/bench"))
    for path in write_all(parser.parse_args().out):
        print(f"plot written to {path}")


if __name__ == "__main__":
    main()
