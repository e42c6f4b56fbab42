"""Services started before Kafka or their topics (a fresh install): they wait, NOT_SERVING, within
server.kafka_wait_s, and serve once the topics exist; past the bound they stop saying what is missing."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.helpers import config_for
from townhall.admission.app import AdmissionApp
from townhall.core import server
from townhall.core.config import DEV_ENV, Config, KafkaConfig
from townhall.core.kafka import KafkaUnreachable, Topics, ensure_topics, wait_for_topics
from townhall.notifier.app import NotifierApp
from townhall.relay.app import RelayApp
from townhall_tools.devtools.kafka_broker import free_port

pytestmark = pytest.mark.kafka

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
APPS: dict[str, Callable[[Config], server.App]] = {
    "admission": AdmissionApp,
    "relay": RelayApp,
    "notifier": NotifierApp,
}
# Topics created this late: past the 40 s a Kafka client's request waits before it gives up (aiokafka's
# request_timeout_ms), where a service that does not wait for them stops.
TOPICS_LATE_S = 45.0


def _config(kafka: KafkaConfig, tmp_path: Path, prefix: str, wait_s: float) -> Config:
    return config_for(
        dataclasses.replace(kafka, topic_prefix=prefix),
        server={"health_port": free_port(), "kafka_wait_s": wait_s},
        notifier={"data_dir": str(tmp_path / "notifier"), "group_id": f"{prefix}-notifier"},
    )


async def _status(health: health_pb2_grpc.HealthStub) -> int | None:
    try:
        return (await health.Check(health_pb2.HealthCheckRequest(), timeout=1)).status
    except grpc.aio.AioRpcError:
        return None


async def test_services_started_before_their_topics_wait_and_serve_once_they_exist(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    """All three at once, their topics created after a Kafka client's request would have given up: each
    waits (NOT_SERVING on its probes' port, saying which topics it misses), then serves."""
    prefix = f"wait-{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    needs = {
        "admission": topics.used_by("admission"),
        "relay": (topics.relay_load, topics.room_state, topics.presence),
        "notifier": topics.used_by("notifier"),
    }
    async with AsyncExitStack() as stack:
        starting: dict[str, asyncio.Task[server.Running]] = {}
        apps: dict[str, server.App] = {}
        health: dict[str, health_pb2_grpc.HealthStub] = {}
        logs = stack.enter_context(structlog.testing.capture_logs())
        for service, make in APPS.items():
            config = _config(kafka, tmp_path / service, prefix, wait_s=300)
            apps[service] = app = make(config)
            internal = getattr(config, service).internal_listen
            starting[service] = asyncio.create_task(server.start(app, config, "127.0.0.1:0", internal))
            stack.push_async_callback(_abandon, starting[service], app)
            address = f"127.0.0.1:{config.server.health_port}"
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            health[service] = health_pb2_grpc.HealthStub(channel)
        await asyncio.sleep(TOPICS_LATE_S)
        for service, stub in health.items():
            assert not starting[service].done(), f"{service} did not wait for its topics"
            assert await _status(stub) == NOT_SERVING, service
        waiting = [entry for entry in logs if entry["event"] == "waiting for kafka"]
        for service, needed in needs.items():
            assert any(entry["missing"] == list(needed) for entry in waiting), (service, waiting[:3])
        await ensure_topics(dataclasses.replace(kafka, topic_prefix=prefix))
        for service, stub in health.items():
            running = await asyncio.wait_for(starting[service], 60)
            assert await _status(stub) == SERVING, service
            await server.stop(apps[service], running, grace_s=1.0)


async def _abandon(starting: asyncio.Task[server.Running], app: server.App) -> None:
    """Stops a start still under way when the test ends early."""
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await app.close()


async def test_a_bounded_wait_names_the_missing_topics(kafka: KafkaConfig) -> None:
    prefix = f"wait-{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    # One of the relay's topics exists: only the others are named.
    await ensure_topics(dataclasses.replace(kafka, topic_prefix=prefix))
    absent = f"{prefix}.nope"
    began = time.monotonic()
    with pytest.raises(KafkaUnreachable) as waited:
        await wait_for_topics(kafka, [topics.relay_load, absent], within_s=2.0)
    assert 2.0 <= time.monotonic() - began < 10
    message = str(waited.value)
    assert "within server.kafka_wait_s (2 s)" in message
    assert f"topics missing: {absent}" in message and topics.relay_load not in message


async def test_a_bounded_wait_for_a_broker_that_is_not_there_says_so() -> None:
    nowhere = KafkaConfig(bootstrap=f"127.0.0.1:{free_port()}")
    with pytest.raises(KafkaUnreachable, match=rf"broker at {nowhere.bootstrap} not reachable"):
        await wait_for_topics(nowhere, Topics("x").used_by("relay"), within_s=1.0)


def test_a_process_whose_wait_expires_exits_with_the_reason(kafka: KafkaConfig) -> None:
    """`python -m townhall.relay`: one line on stderr says what is missing; exit status 1, no traceback."""
    prefix = f"wait-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        **DEV_ENV,
        "TOWNHALL_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "TOWNHALL_KAFKA_TOPIC_PREFIX": prefix,
        "TOWNHALL_SERVER_KAFKA_WAIT_S": "2",
        "TOWNHALL_RELAY_LISTEN": f"127.0.0.1:{free_port()}",
        "TOWNHALL_RELAY_INTERNAL_LISTEN": f"127.0.0.1:{free_port()}",
        "TOWNHALL_RELAY_METRICS_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "townhall.relay"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "townhall relay: Kafka not ready within server.kafka_wait_s (2 s): topics missing:"
    )
    assert f"{prefix}.relay-load" in last and "Traceback" not in done.stderr
