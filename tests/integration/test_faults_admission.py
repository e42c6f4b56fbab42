"""Three admission processes on the real broker: the owner of rooms under change is killed, or stopped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import fault_topology, recorded
from townhall.core.config import KafkaConfig
from townhall_tools.devtools.topology import Topology
from townhall_tools.faults import admission

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def topology(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    yield from fault_topology("admission", tmp_path_factory, kafka)


async def test_kill_9_of_a_rooms_owner_loses_no_acknowledged_change(
    topology: Topology, tmp_path: Path
) -> None:
    outcome = recorded(await admission.run(topology, kill=True), tmp_path)
    assert outcome.problems == []
    f = outcome.figures
    assert (f["lost"], f["forks"], f["stale_replicas"], f["half_made"]) == (0, 0, 0, 0)
    assert f["errors"] == 0, "hosts' changes were retried at the next owner, not failed"
    # The listeners join until the room is full (and a second more), so a slow run tests the limit too.
    assert f["admitted"] <= f["limit"], "the new owner rebuilt the lease book before granting"
    assert f["admitted_after_fault"] > 0, "joins went on"


async def test_sigterm_hands_the_rooms_over_without_an_error(topology: Topology, tmp_path: Path) -> None:
    outcome = recorded(await admission.run(topology, kill=False), tmp_path)
    assert outcome.problems == []
    f = outcome.figures
    assert (f["lost"], f["forks"], f["stale_replicas"], f["errors"]) == (0, 0, 0, 0)
