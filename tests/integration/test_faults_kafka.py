"""A broker of its own, killed (-9) and started again during a join storm, room changes and a fan-out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import fault_topology, recorded
from townhall_tools.devtools.topology import Topology
from townhall_tools.faults import kafka
from townhall_tools.faults.measure import Outcome

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    yield from fault_topology("kafka", tmp_path_factory, None)


def assert_nothing_lost_and_joins_answered(outcome: Outcome) -> None:
    assert outcome.problems == []
    f = outcome.figures
    assert (f["lost"], f["forks"], f["stale_replicas"], f["half_made"]) == (0, 0, 0, 0)
    assert f["notifications_lost"] == 0
    # Joins never wait for Kafka: the storm's go on, and every new user (each on a connection that
    # takes kafka.SLOW_LINK_S to set up) is answered while the broker is away; no join is refused.
    assert f["joins_admitted_during_outage"] > 0 and f["join_errors"] == 0
    assert f["newcomers_during_outage"] == kafka.NEWCOMERS and f["newcomers_admitted"] > 0


async def test_a_broker_kill_loses_no_acknowledged_change_or_notification_and_joins_go_on(
    topology: Topology, tmp_path: Path
) -> None:
    assert_nothing_lost_and_joins_answered(recorded(await kafka.run(topology, kill=True), tmp_path))
    # Join events that did not fit (the queue full, their batch expired in the producer) are counted in
    # townhall_events_dropped_total and reported as presence_events_dropped (a short outage drops none).


async def test_joins_go_on_through_a_long_broker_outage(topology: Topology, tmp_path: Path) -> None:
    outcome = recorded(await kafka.run(topology, kill=True, outage_s=kafka.LONG_OUTAGE_S), tmp_path)
    assert_nothing_lost_and_joins_answered(outcome)
    assert outcome.figures["outage_s"] >= kafka.LONG_OUTAGE_S
