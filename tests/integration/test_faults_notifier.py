"""Two notifier processes sharing a fan-out: one is stopped (SIGTERM) in the middle of it; its Inbox reader
resumes on the other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import fault_topology, recorded
from townhall.core.config import KafkaConfig
from townhall_tools.devtools.topology import Topology
from townhall_tools.faults import notifier

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def topology(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    yield from fault_topology("notifier", tmp_path_factory, kafka)


async def test_sigterm_of_a_notifier_mid_fanout_notifies_every_follower_once(
    topology: Topology, tmp_path: Path
) -> None:
    outcome = recorded(await notifier.run(topology, kill=False), tmp_path)
    assert outcome.problems == []
    f = outcome.figures
    assert (f["notifications_lost"], f["notified_twice"], f["errors"], f["reader_notified"]) == (0, 0, 0, 1)
