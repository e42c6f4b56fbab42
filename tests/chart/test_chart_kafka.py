"""The chart's bundled broker, run from what the chart renders, with Apache Kafka's jars on loopback.

No cluster here: the rendered start script, server.properties, generated users and certificate, the init
container's keystore step and the topics Job's script run as a kubelet would run them, with the mount
paths pointed at temporary folders and KAFKA_HOME at the broker image's layout (deploy/kafka's bin/
scripts and log4j configs, the jars of deploy/kafka/pom.xml). Then each service's rendered Kafka settings
connect as its own user, over TLS, and may write exactly its own topics.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError

from tests.chart.helpers import RELEASE, REPO, Manifest, by_kind, workload
from tests.chart.test_chart import Render, configmap, container_env, job_script, kafka_files, topics_job
from townhall.core.config import KafkaConfig
from townhall.core.config import load as load_config
from townhall.core.kafka import Topics, client_options
from townhall_tools.devtools.kafka_broker import _accepts, _ready, fetch_jars, free_port

pytestmark = pytest.mark.kafka

KAFKA_IMAGE = REPO / "deploy" / "kafka"
WAIT_S = 30.0


def kafka_home(folder: Path) -> Path:
    """A KAFKA_HOME laid out as the broker image's (deploy/kafka/Dockerfile): its bin/ scripts and log4j
    configs, and the Maven jars as libs/."""
    shutil.copytree(KAFKA_IMAGE / "bin", folder / "bin")
    (folder / "config").mkdir()
    for name in ("log4j.properties", "tools-log4j.properties"):
        shutil.copy(KAFKA_IMAGE / name, folder / "config" / name)
    (folder / "libs").symlink_to(fetch_jars(), target_is_directory=True)
    return folder


def localize(text: str, mounts: dict[str, str]) -> str:
    """`text` with each mounted path (or address) replaced by its local stand-in."""
    for path, local in mounts.items():
        text = text.replace(path, local)
    return text


def secret(manifests: list[Manifest], name: str) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in by_kind(manifests, "Secret")[name]["data"].items()}


def write_all(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
        (folder / name).chmod(0o600)
    return folder


@pytest.fixture
def chart_broker(render: Render, tmp_path: Path) -> Iterator[tuple[list[Manifest], str, Path]]:
    """The default scenario's broker, started by the chart's script; yields (manifests, bootstrap, users dir)."""
    manifests = render(None)
    files = kafka_files(manifests)
    users = write_all(tmp_path / "users", secret(manifests, f"{RELEASE}-kafka-users"))
    tls = write_all(tmp_path / "tls", secret(manifests, f"{RELEASE}-kafka-tls"))
    port, controller = free_port(), free_port()
    bootstrap = f"127.0.0.1:{port}"  # the generated certificate names 127.0.0.1 too
    mounts = {
        "/var/run/kafka-keystore/": f"{tmp_path / 'keystore'}/",
        "/etc/kafka/tls/": f"{tls}/",
        "/var/lib/kafka/data/": f"{tmp_path / 'data'}/",
    }
    service = configmap(manifests)["TOWNHALL_KAFKA_BOOTSTRAP"]
    props = localize(
        files["server.properties"],
        {
            **mounts,
            "127.0.0.1:9093": f"127.0.0.1:{controller}",
            f"CLIENT://0.0.0.0:{service.rpartition(':')[2]}": f"CLIENT://{bootstrap}",
            f"CLIENT://{service}": f"CLIENT://{bootstrap}",
        },
    )
    write_all(
        tmp_path / "config", {"server.properties": props.encode(), "start.sh": files["start.sh"].encode()}
    )
    spec = workload(manifests, "kafka")["spec"]["template"]["spec"]
    # The init container: the certificate's key as the PKCS#8 keystore Kafka reads.
    (init,) = spec["initContainers"]
    (tmp_path / "keystore").mkdir()
    assert init["command"][0] == "python"
    subprocess.run(
        [sys.executable, *(localize(a, mounts) for a in init["command"][1:])], check=True, timeout=60
    )
    (c,) = spec["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    home = kafka_home(tmp_path / "kafka")
    log = tmp_path / "broker.log"
    with log.open("wb") as out:
        broker = subprocess.Popen(
            ["bash", str(tmp_path / "config" / "start.sh")],
            env={
                **os.environ,
                **env,
                "KAFKA_HOME": str(home),
                "BROKER_CONFIG": str(tmp_path / "config"),
                "BROKER_USERS": str(users),
                "BROKER_WORK": str(tmp_path / "work"),
                "LOG_DIR": str(tmp_path / "logs"),
                # A quick start on a busy machine (the image's default is Kafka's G1 settings, full JIT).
                "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseG1GC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true",
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not (_accepts(port) and _ready(log, 0)):
            assert broker.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the chart's broker did not start in 120 s"
            time.sleep(0.5)
        yield manifests, bootstrap, users
    finally:
        os.killpg(broker.pid, signal.SIGTERM)
        broker.wait(30)


def service_kafka(manifests: list[Manifest], service: str, bootstrap: str, users: Path) -> KafkaConfig:
    """A service's [kafka] settings as the chart renders them, with the mounted files made real."""
    (c,) = workload(manifests, service)["spec"]["template"]["spec"]["containers"]
    env = container_env(manifests, c, f"{service}-0")
    env["TOWNHALL_KAFKA_BOOTSTRAP"] = bootstrap
    env["TOWNHALL_KAFKA_PASSWORD_FILE"] = str(users / service.removesuffix("-crowd"))
    env["TOWNHALL_KAFKA_CA"] = str(users.parent / "tls" / "ca.crt")
    return load_config(env=env).kafka


async def writable(config: KafkaConfig, topics: list[str]) -> set[str]:
    producer = AIOKafkaProducer(bootstrap_servers=config.bootstrap, **client_options(config))
    await asyncio.wait_for(producer.start(), WAIT_S)
    allowed = set()
    try:
        for topic in topics:
            try:
                await asyncio.wait_for(producer.send_and_wait(topic, b"probe", key=b"k"), WAIT_S)
                allowed.add(topic)
            except TopicAuthorizationFailedError:
                pass
    finally:
        await producer.stop()
    return allowed


@pytest.mark.timeout(900)  # about 20 JVM starts (the broker and the Job's tools): minutes on a busy machine
def test_the_charts_broker_and_topics_job_let_each_service_write_only_its_own_topics(
    chart_broker: tuple[list[Manifest], str, Path], tmp_path: Path
) -> None:
    manifests, bootstrap, users = chart_broker
    mounts = {
        "/etc/kafka/users/": f"{users}/",
        "/etc/kafka/ca/": f"{users.parent / 'tls'}/",
        "/tmp/client.properties": str(tmp_path / "client.properties"),
    }
    script = localize(job_script(topics_job(manifests)), mounts)
    job_env = {
        e["name"]: e["value"]
        for e in topics_job(manifests)["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    done = subprocess.run(
        ["/bin/sh", "-ec", script],
        env={
            **os.environ,
            **job_env,
            "BOOTSTRAP": bootstrap,
            "KAFKA_HOME": str(users.parent / "kafka"),
            "LOG_DIR": str(tmp_path / "job-logs"),
        },
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    topics = Topics(configmap(manifests)["TOWNHALL_KAFKA_TOPIC_PREFIX"])
    for service in ("admission", "admission-crowd", "relay", "notifier"):
        config = service_kafka(manifests, service, bootstrap, users)
        writes = set(topics.access()[service.removesuffix("-crowd")][0])
        assert asyncio.run(writable(config, list(topics.all()))) == writes, service
    # Without a valid user nobody gets in: the relay's user with the admission password, and plaintext.
    relay = service_kafka(manifests, "relay", bootstrap, users)
    wrong = dataclasses.replace(relay, password_file=str(users / "admission"))
    for config, options in ((wrong, None), (relay, {})):
        with pytest.raises((KafkaError, OSError, TimeoutError)):
            asyncio.run(writable_or_fail(config, options))


async def writable_or_fail(config: KafkaConfig, options: dict[str, object] | None) -> None:
    settings = client_options(config) if options is None else options
    producer = AIOKafkaProducer(bootstrap_servers=config.bootstrap, request_timeout_ms=5_000, **settings)
    try:
        await asyncio.wait_for(producer.start(), 20)
    finally:
        await producer.stop()
