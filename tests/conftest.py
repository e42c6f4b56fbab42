"""Shared fixtures: the real local Kafka broker (one per test session) on loopback; Prometheus and promtool."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chart.helpers import build_tool
from townhall.core.config import KafkaConfig
from townhall.core.kafka import ensure_topics
from townhall.devtools.kafka_broker import Broker, free_port


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real Apache Kafka broker (KRaft) on 127.0.0.1, started by the project's own code."""
    broker = Broker(tmp_path_factory.mktemp("kafka"), port=free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka(kafka_broker: Broker) -> KafkaConfig:
    """Kafka config for the session broker, with the project's topics created."""
    config = KafkaConfig(bootstrap=kafka_broker.bootstrap)
    asyncio.run(ensure_topics(config))
    return config


@pytest.fixture(scope="session")
def prometheus_server() -> Path:
    """The prometheus server in .cache/bin, built from source with the Go toolchain if it is not there yet."""
    return build_tool("install-prometheus.sh", "prometheus")


@pytest.fixture(scope="session")
def promtool() -> Path:
    """promtool in .cache/bin, built with the prometheus server (deploy/tools/install-prometheus.sh)."""
    return build_tool("install-prometheus.sh", "promtool")
