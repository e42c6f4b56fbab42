"""The multi-host topology: the demo from outside the containers, then one run of every partition and host
loss scenario. Nothing acknowledged may be lost or forked, and every follower must be notified."""

from __future__ import annotations

import asyncio

import pytest

from tests.hosts.conftest import make
from townhall_tools.hosts.cluster import Cluster
from townhall_tools.hosts.faults import SCENARIOS, one_run

pytestmark = pytest.mark.timeout(1800)


def test_demo_from_outside(cluster: Cluster) -> None:
    assert all(cluster.running(h) for h in cluster.hosts)
    make("cluster-demo", timeout_s=600)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_loses_nothing(cluster: Cluster, scenario: str) -> None:
    outcome = asyncio.run(one_run(cluster, scenario))
    print(scenario, outcome.fault, outcome.figures)
    assert outcome.figures.get("lost") == 0, outcome.problems
    assert outcome.figures.get("notifications_lost") == 0, outcome.problems
    # Forks: two owners acknowledging the same room version (issue 13, item 2: fenced ownership).
    assert outcome.figures.get("forks") == 0, outcome.problems
    assert outcome.ok, outcome.problems
    # Every run heals: every container is up again.
    assert all(cluster.running(h) for h in cluster.hosts)
