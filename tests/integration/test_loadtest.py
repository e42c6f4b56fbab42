"""The join load generator against a real admission process: open-loop arrivals, figures per room class."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest
from rich.console import Console

from tests.chart.helpers import REPO
from tests.integration.helpers import config_for, serving
from townhall.admission.app import AdmissionApp
from townhall.core.config import DEV_AUTH, KafkaConfig, TlsConfig
from townhall_tools.bench import join_load_ghz
from townhall_tools.bench.join_load import Load, make_rooms, offer, wait_live

pytestmark = pytest.mark.kafka
# Rates in a generator's figures that are answers or the generator's own end of run, not refusals.
_ANSWERS = ("sent", "granted", "waiting", "cancelled", "unavailable")


async def test_open_loop_load_is_offered_and_measured_per_room_class(kafka: KafkaConfig) -> None:
    config = config_for(kafka)
    async with serving(AdmissionApp(config), config) as address:
        hot, colds = await make_rooms(address, 3, DEV_AUTH, TlsConfig())
        await wait_live([address], [hot, *colds], DEV_AUTH, TlsConfig())
        load = Load((address,), hot, 200.0, tuple(colds), 30.0, seconds=2.0, warmup_s=0.5, generators=1)
        figures = await offer(load, [os.getpid()], "test", Console(quiet=True))
    for kind, rate in (("hot", 200.0), ("cold", 30.0)):
        # Every arrival the schedule has in the measured window, however late the generator started or
        # ran on a busy machine (the schedule decides, not the clock: bench/join_generator.py).
        assert (figures[kind]["sent_per_s"], figures[kind]["unsent"]) == (rate, 0), (
            "arrivals follow the schedule"
        )
        assert figures[kind]["granted_per_s"] > 0
        assert figures[kind]["p99_ms"] is not None
        # Every measured call counted in the second it was due (what joinstorm.png plots).
        per_second = figures[kind]["per_second"]
        assert all(len(series) == 2 for series in per_second.values())
        assert sum(map(sum, per_second.values())) == rate * load.seconds
    assert figures["admitted_per_s"] > 0 and figures["generator_cpu_cores"] >= 0


async def test_the_compiled_generator_joins_as_a_new_user_with_a_valid_token_on_every_call(
    kafka: KafkaConfig,
) -> None:
    """deploy/tools/joinload (ghz's runner) signs a token per call: every join is a first admit, none refused."""
    built = await asyncio.to_thread(
        subprocess.run,
        [str(REPO / "deploy" / "tools" / "install-joinload.sh")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr
    config = config_for(kafka)
    app = AdmissionApp(config)
    async with serving(app, config) as address:
        hot, colds = await make_rooms(address, 1, DEV_AUTH, TlsConfig())
        await wait_live([address], [hot, *colds], DEV_AUTH, TlsConfig())
        load = Load((address,), hot, 100.0, tuple(colds), 20.0, seconds=2.0, warmup_s=0.5,
                    ghz=str(REPO / ".cache" / "bin" / "joinload"))  # fmt: skip
        figures = await offer(load, [os.getpid()], "test", Console(quiet=True))
        admitted = app.admitter.listeners(hot)
    for kind in ("hot", "cold"):
        c = figures[kind]
        refused = {k: v for k, v in c.items() if k.endswith("_per_s") and k[:-6] not in _ANSWERS}
        assert c["granted_per_s"] > 0 and not any(refused.values()), c  # no token refused, none shed
        # Calls still in flight when the generator stops end as cancelled or unavailable: at most one
        # per worker (more would be the server's doing).
        cut = (c.get("cancelled_per_s", 0) + c.get("unavailable_per_s", 0)) * load.seconds
        assert cut <= join_load_ghz.WORKERS, c
        # Per second from ghz's per-call details; the window starts at either generator's first call,
        # so the later one may have a few calls past its end.
        per_second = c["per_second"]
        assert all(len(series) == 2 for series in per_second.values())
        assert sum(per_second["granted"]) >= 0.9 * c["granted_per_s"] * load.seconds, c
    # Distinct users: the hot room holds one listener per call, none a rejoin of an earlier one.
    assert admitted >= 0.9 * figures["hot"]["sent_per_s"] * 2.0
