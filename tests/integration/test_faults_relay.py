"""Three relay processes and two admission processes: a room's edge or origin is killed, or stopped,
while a speaker talks to six listeners using the client library (townhall.live)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import fault_topology, recorded
from townhall.core.config import KafkaConfig
from townhall_tools.devtools.topology import Topology
from townhall_tools.faults import relays

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def topology(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    yield from fault_topology("relay", tmp_path_factory, kafka)


@pytest.mark.parametrize(("victim", "bound_ms"), [("edge", 2000), ("origin", 3000)])
async def test_kill_9_of_a_relay_costs_its_listeners_a_bounded_audio_gap(
    topology: Topology, tmp_path: Path, victim: str, bound_ms: int
) -> None:
    outcome = recorded(await relays.run(topology, victim, kill=True), tmp_path)
    assert outcome.problems == []
    f = outcome.figures
    assert f["gap_ms_max"] <= bound_ms, "audio missing, in audio time"
    assert (f["errors"], f["out_of_order"]) == (0, 0), "listeners hear every frame in order, once"
    if victim == "origin":
        assert f["epochs_seen"] >= 2 and f["speaker_moves"] >= 1, "the room moved to a new origin"


@pytest.mark.parametrize("victim", ["edge", "origin"])
async def test_sigterm_of_a_relay_moves_its_listeners_without_a_gap(
    topology: Topology, tmp_path: Path, victim: str
) -> None:
    outcome = recorded(await relays.run(topology, victim, kill=False), tmp_path)
    assert outcome.problems == []
    assert (outcome.figures["gap_ms_max"], outcome.figures["errors"]) == (0, 0)
