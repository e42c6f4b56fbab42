"""The join load generator against a real admission process: open-loop arrivals, figures per room class."""

from __future__ import annotations

import os

import pytest
from rich.console import Console

from tests.integration.helpers import config_for, serving
from townhall.admission.app import AdmissionApp
from townhall.bench.joinstorm import Load, make_rooms, offer, wait_live
from townhall.core.config import AuthConfig, KafkaConfig, TlsConfig

pytestmark = pytest.mark.kafka


async def test_open_loop_load_is_offered_and_measured_per_room_class(kafka: KafkaConfig) -> None:
    config = config_for(kafka)
    async with serving(AdmissionApp(config), config) as address:
        hot, colds = await make_rooms(address, 3, AuthConfig(), TlsConfig())
        await wait_live([address], [hot, *colds], AuthConfig(), TlsConfig())
        load = Load((address,), hot, 200.0, tuple(colds), 30.0, seconds=2.0, warmup_s=0.5, generators=1)
        figures = await offer(load, [os.getpid()], "test", Console(quiet=True))
    for kind, rate in (("hot", 200.0), ("cold", 30.0)):
        assert figures[kind]["sent_per_s"] == pytest.approx(rate, rel=0.2), "arrivals follow the schedule"
        assert figures[kind]["granted_per_s"] > 0
        assert figures[kind]["p99_ms"] is not None
    assert figures["admitted_per_s"] > 0 and figures["generator_cpu_cores"] >= 0
