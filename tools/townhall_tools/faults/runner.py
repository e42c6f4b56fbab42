"""`townhall faults`: every fault scenario, N runs each, on local topologies; a table and JSON.

Scenarios are grouped by the topology they need; each group starts its processes once and its
scenarios run on them in turn (a killed process is started again after each run). Groups share
one broker with topic prefixes of their own, except the Kafka group, which restarts a broker of
its own.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from townhall_tools.devtools.kafka_broker import Broker, free_port
from townhall_tools.devtools.topology import Topology
from townhall_tools.faults import admission, kafka, notifier, relays
from townhall_tools.faults.measure import Outcome, spread

Scenario = Callable[[Topology], Coroutine[Any, Any, Outcome]]


@dataclass(frozen=True)
class Group:
    """Scenarios that run on one topology."""

    counts: dict[str, int]
    env: dict[str, str]
    scenarios: dict[str, Scenario]
    own_broker: bool = False


GROUPS: dict[str, Group] = {
    "admission": Group(
        {"admission": 3, "relay": 1, "notifier": 0},
        admission.admission_env(),
        {
            "admission-kill": lambda t: admission.run(t, kill=True),
            "admission-sigterm": lambda t: admission.run(t, kill=False),
        },
    ),
    "relay": Group(
        {"admission": 2, "relay": 3, "notifier": 0},
        relays.relay_env(),
        {
            "edge-kill": lambda t: relays.run(t, "edge", kill=True),
            "origin-kill": lambda t: relays.run(t, "origin", kill=True),
            "edge-sigterm": lambda t: relays.run(t, "edge", kill=False),
            "origin-sigterm": lambda t: relays.run(t, "origin", kill=False),
        },
    ),
    "notifier": Group(
        {"admission": 1, "relay": 1, "notifier": 2},
        notifier.notifier_env(),
        {
            "notifier-sigterm": lambda t: notifier.run(t, kill=False),
            "notifier-kill": lambda t: notifier.run(t, kill=True),
        },
    ),
    "kafka": Group(
        {"admission": 2, "relay": 1, "notifier": 1},
        kafka.kafka_env(),
        {
            "kafka-restart": lambda t: kafka.run(t, kill=False),
            "kafka-kill": lambda t: kafka.run(t, kill=True),
            "kafka-outage": lambda t: kafka.run(t, kill=True, outage_s=kafka.LONG_OUTAGE_S),
        },
        own_broker=True,
    ),
}
SCENARIOS = [name for group in GROUPS.values() for name in group.scenarios]

# What "recovery" means in each scenario's table row (the figure, in seconds); by default the
# fault to the first change of the victim's rooms answered (admission), or to every listener
# hearing audio captured after it (relay kills).
RECOVERY = {
    # A stopped relay keeps streaming during its drain notice: until its last listener hears
    # audio through another relay.
    "edge-sigterm": "moved_s",
    "origin-sigterm": "moved_s",
    "notifier-sigterm": "stall_s",  # the longest the fan-out stood still
    "notifier-kill": "stall_s",
    "kafka-restart": "changes_answered_after_s",  # the broker back to the first room change answered
    "kafka-kill": "changes_answered_after_s",
    "kafka-outage": "changes_answered_after_s",
}
LOST = ("lost", "forks", "stale_replicas", "half_made", "notifications_lost")


@dataclass
class Report:
    """Every outcome of a run of `townhall faults`."""

    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """One row per scenario: runs, passes, recovery, audio gap, anything lost, errors."""
        rows = []
        for name, outcomes in self.outcomes.items():
            figures = [o.figures for o in outcomes]
            recovery = spread(f.get(RECOVERY.get(name, "recovery_s"), 0.0) for f in figures)
            gap = spread(f.get("gap_ms_max", 0.0) for f in figures)
            rows.append(
                {
                    "scenario": name,
                    "fault": next((o.fault for o in outcomes if o.fault), name),
                    "runs": len(outcomes),
                    "passed": sum(o.ok for o in outcomes),
                    "recovery_s_p50": recovery[0],
                    "recovery_s_max": recovery[1],
                    "gap_ms_p50": gap[0],
                    "gap_ms_max": gap[1],
                    "lost": sum(f.get(k, 0) for f in figures for k in LOST),
                    "errors": sum(f.get("errors", 0) for f in figures),
                    "problems": sorted({p for o in outcomes for p in o.problems}),
                }
            )
        return rows

    def markdown(self) -> str:
        """The summary as the Markdown table docs/faults.md keeps."""
        lines = [
            "| fault | runs | passed | recovery p50 / max (s) | audio gap p50 / max (ms) | lost "
            "| client errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.summary():
            gap = (
                "—"
                if not row["scenario"].startswith(("edge", "origin"))
                else (f"{row['gap_ms_p50']:.0f} / {row['gap_ms_max']:.0f}")
            )
            lines.append(
                f"| {row['fault']} (`{row['scenario']}`) | {row['runs']} | {row['passed']} | "
                f"{row['recovery_s_p50']:.2f} / {row['recovery_s_max']:.2f} | {gap} | {row['lost']:g} | "
                f"{row['errors']:g} |"
            )
        return "\n".join(lines)

    @classmethod
    def load(cls, path: Path) -> Report:
        """A report written by `write` (to print its table again)."""
        data = json.loads(path.read_text())
        return cls(
            {
                name: [Outcome(o["scenario"], o["fault"], o["figures"], o["problems"]) for o in runs]
                for name, runs in data["runs"].items()
            }
        )

    def as_json(self) -> dict[str, Any]:
        """Everything, for --json."""
        return {
            "summary": self.summary(),
            "runs": {name: [o.as_dict() for o in outcomes] for name, outcomes in self.outcomes.items()},
        }


def topology_for(group: str, root: Path, kafka: str | None) -> Topology:
    """The (not yet started) topology a group of scenarios runs on: on the broker at `kafka` with
    topics of its own, or with a broker of its own when the group restarts the broker."""
    spec = GROUPS[group]
    return Topology(
        root,
        dict(spec.counts),
        fixed_ports=False,
        env=dict(spec.env),
        kafka=None if spec.own_broker else kafka,
        topic_prefix=f"faults-{uuid.uuid4().hex[:8]}",
    )


def run_faults(
    root: Path,
    runs: int,
    only: list[str] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> Report:
    """Runs the chosen scenarios `runs` times each; returns every outcome."""
    chosen = set(only or SCENARIOS)
    report = Report()
    shared: Broker | None = None
    try:
        for group_name, group in GROUPS.items():
            scenarios = {n: s for n, s in group.scenarios.items() if n in chosen}
            if not scenarios:
                continue
            if not group.own_broker and shared is None:
                shared = Broker(root / "kafka", port=free_port())
                shared.start()
            topology = topology_for(group_name, root / group_name, shared.bootstrap if shared else None)
            topology.start()
            try:
                for name, scenario in scenarios.items():
                    for _ in range(runs):
                        outcome = asyncio.run(scenario(topology))
                        report.outcomes.setdefault(name, []).append(outcome)
                        if on_outcome is not None:
                            on_outcome(outcome)
            finally:
                topology.stop()
    finally:
        if shared is not None:
            shared.stop()
    return report


def write(report: Report, path: Path) -> None:
    """Writes the report as JSON (with the time it was made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), **report.as_json()}, indent=2))
