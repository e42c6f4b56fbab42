"""Shared fixtures: the real local Kafka broker (one per test session) on loopback; Prometheus, promtool
and grpcurl."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401  (imported here, at startup: see below)
import pytest

from tests.chart.helpers import REPO, TOOLS, build_tool, install
from townhall.core.config import KafkaConfig
from townhall.core.kafka import ensure_topics
from townhall_tools.devtools.kafka_broker import Broker, free_port

# hypothesis's pytest plugin imports hypothesis in its terminal summary when no test did; pytest then rewrites
# it deep in a finished session, where CPython 3.11.7's ast.parse can fail ("AST constructor recursion depth
# mismatch") and turn a green run of a few tests red. Importing it with the conftest avoids that.

# The kind end-to-end tests need Docker and a cluster: `make kind-e2e` runs them, `make test` does not; the
# multi-host ones (containers, partitions) need Docker and root: `make cluster-e2e` runs them.
collect_ignore = [
    name for name, flag in (("e2e", "KIND_E2E"), ("hosts", "HOSTS_E2E")) if not os.environ.get(flag)
]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Builds the tools the collected tests use before the first test runs: a cold build takes minutes, more
    than the per-test timeout, and is no test's time. A build that fails is reported by its fixture."""
    if session.config.option.collectonly:
        return
    used = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for script in sorted({script for fixture, (script, _) in TOOLS.items() if fixture in used}):
        built = all(
            (REPO / ".cache" / "bin" / binary).exists() for s, binary in TOOLS.values() if s == script
        )
        if reporter is not None and not built:
            reporter.write_line(
                f"deploy/tools/{script}: building from source into .cache/bin (minutes, once)"
            )
        install(script)


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
    return build_tool("prometheus_server")


@pytest.fixture(scope="session")
def promtool() -> Path:
    """promtool in .cache/bin, built with the prometheus server (deploy/tools/install-prometheus.sh)."""
    return build_tool("promtool")


@pytest.fixture(scope="session")
def grpcurl() -> Path:
    """grpcurl in .cache/bin, built from source with the Go toolchain (deploy/tools/install-grpcurl.sh);
    its tests are skipped on a machine without Go."""
    if shutil.which("go") is None and not (REPO / ".cache" / "bin" / "grpcurl").exists():
        pytest.skip("grpcurl is built with Go, which is not on PATH")
    return build_tool("grpcurl")
