"""Kafka with SASL_SSL and ACLs: the broker helper's secure mode (devtools/kafka_broker.py, Security), what
the chart's bundled broker runs.

A broker of its own (SCRAM-SHA-512 users made at format, StandardAuthorizer, nothing allowed without an
ACL); admission, relay and notifier each connect as their own principal, over TLS, and the whole path
works: a room start reaches a follower's Inbox, a relay cuts a banned listener, admission places on the
relay's load reports. Each principal writes only its own topics, and a client without a valid user
cannot connect at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError
from prometheus_client import REGISTRY

from tests.integration.helpers import TOKENS, config_for, rpc_error
from townhall.admission.app import AdmissionApp
from townhall.client import Client, Endpoints
from townhall.core import server
from townhall.core.auth import GRANTS
from townhall.core.config import Config, KafkaConfig, TlsConfig
from townhall.core.kafka import Topics, client_options
from townhall.notifier.app import NotifierApp
from townhall.relay.app import RelayApp
from townhall_tools.devtools.kafka_broker import Broker, Security, free_port

pytestmark = pytest.mark.kafka

PREFIX = "secure"
GROUP = "townhall-notifier"
TOPICS = Topics(PREFIX)
WAIT_S = 30.0
RELAY_CAPACITY = 777  # what the relay reports, so its report is seen arriving at admission


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Security]]:
    """A SASL_SSL broker with ACLs, its topics and each service's ACLs created (as admin)."""
    folder = tmp_path_factory.mktemp("secure-kafka")
    security = Security(folder / "pki")
    broker = Broker(folder / "data", port=free_port(), security=security)
    broker.start()
    try:
        broker.grant(TOPICS, GROUP, partitions=4)
        yield broker, security
    finally:
        broker.stop()


def as_user(secure: tuple[Broker, Security], user: str) -> KafkaConfig:
    broker, security = secure
    return security.client(user, broker.bootstrap, PREFIX, partitions=4)


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_S} s"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(app: Any, config: Config, listen: str = "127.0.0.1:0") -> AsyncIterator[str]:
    started = await asyncio.wait_for(server.start(app, config, listen), WAIT_S)
    try:
        yield f"127.0.0.1:{started.port}"
    finally:
        await server.stop(app, started, grace_s=1.0)


def skipped() -> float:
    return sum(
        s.value
        for metric in REGISTRY.collect()
        if metric.name == "townhall_kafka_records_skipped"
        for s in metric.samples
        if s.name.endswith("_total") and s.labels.get("topic", "").startswith(f"{PREFIX}.")
    )


async def test_every_service_runs_on_sasl_ssl_as_its_own_principal(
    secure: tuple[Broker, Security], tmp_path: Path
) -> None:
    relay_address = f"127.0.0.1:{free_port()}"
    relay_config = config_for(
        as_user(secure, "relay"),
        relay={
            "listen": relay_address,
            "load_report_s": 0.2,
            "follow_room_state": True,
            "listener_capacity": RELAY_CAPACITY,
        },
    )
    admission_config = config_for(
        as_user(secure, "admission"), admission={"relays": (relay_address,)}, relay={"load_report_s": 0.2}
    )
    notifier_config = config_for(
        as_user(secure, "notifier"), notifier={"data_dir": str(tmp_path), "group_id": GROUP}
    )
    admission = AdmissionApp(admission_config)
    async with (
        running(RelayApp(relay_config), relay_config, relay_address),
        running(admission, admission_config) as admission_address,
        running(NotifierApp(notifier_config), notifier_config) as notifier_address,
    ):
        endpoints = Endpoints(admission_address, notifier_address, TlsConfig())
        host, fan, listener = (
            Client(endpoints, u, TOKENS.mint(u, GRANTS)) for u in (9_100_001, 9_100_002, 9_100_003)
        )
        try:
            await fan.follow(host.user)
            inbox = fan.notifications()
            await asyncio.wait_for(inbox.initial_metadata(), WAIT_S)
            room = await host.start_room((await host.create_room("Over SASL_SSL")).room_id)
            note = await asyncio.wait_for(inbox.read(), WAIT_S)  # room-started, fan-out, notifications
            assert note.room_id == room.room_id
            inbox.cancel()
            # The relay's load report (relay principal) reaches admission's placer.
            await until(lambda: admission.placer.capacity(relay_address) == RELAY_CAPACITY, "a load report")
            grant = await listener.join(room.room_id)
            assert grant.relay_address == relay_address
            stream = listener.subscribe(grant, room.room_id)
            await asyncio.wait_for(stream.initial_metadata(), WAIT_S)
            await host.remove(room.room_id, listener.user, ban=True)  # read by the relay from room-state
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await asyncio.wait_for(stream.read(), WAIT_S)
            assert cut.value.code() == grpc.StatusCode.PERMISSION_DENIED
            error = await rpc_error(listener.join(room.room_id))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            for c in (host, fan, listener):
                await c.close()
    assert skipped() == 0, "every record on the secure topics was signed and valid"


async def test_each_principal_writes_only_its_own_topics(secure: tuple[Broker, Security]) -> None:
    allowed: dict[str, set[str]] = {}
    for user, (writes, _) in TOPICS.access().items():
        config = as_user(secure, user)
        producer = AIOKafkaProducer(bootstrap_servers=config.bootstrap, **client_options(config))
        await asyncio.wait_for(producer.start(), WAIT_S)
        try:
            for topic in TOPICS.all():
                try:
                    await asyncio.wait_for(producer.send_and_wait(topic, b"probe", key=b"k"), WAIT_S)
                except TopicAuthorizationFailedError:
                    continue
                allowed.setdefault(user, set()).add(topic)
        finally:
            await producer.stop()
        assert allowed.get(user, set()) == set(writes), user
    assert TOPICS.room_state not in allowed["relay"] and TOPICS.room_state not in allowed["notifier"]
    # Reading is granted the same way: the relay may not read what the notifier delivers.
    relay = as_user(secure, "relay")
    reader = AIOKafkaConsumer(
        TOPICS.notifications, bootstrap_servers=relay.bootstrap, **client_options(relay)
    )
    with pytest.raises(TopicAuthorizationFailedError):
        await asyncio.wait_for(reader.start(), WAIT_S)
        await asyncio.wait_for(reader.getmany(timeout_ms=5_000), WAIT_S)
    await reader.stop()


@pytest.mark.parametrize(
    "how",
    ["plaintext", "tls without a user", "a wrong password", "an unknown user", "a CA it does not trust"],
)
async def test_a_client_without_a_valid_user_cannot_connect(
    secure: tuple[Broker, Security], how: str, tmp_path: Path
) -> None:
    good = as_user(secure, "relay")
    options: dict[str, Any] = client_options(good)
    if how == "plaintext":
        options = {}
    elif how == "tls without a user":
        options = client_options(KafkaConfig(bootstrap=good.bootstrap, security_protocol="SSL", ca=good.ca))
    elif how == "a wrong password":
        options["sasl_plain_password"] = "not-the-password"
    elif how == "an unknown user":
        options["sasl_plain_username"] = "mallory"
    else:
        other = Security(tmp_path / "other-ca")
        other.make_certificates()
        options = client_options(dataclasses.replace(good, ca=str(other.ca)))
    producer = AIOKafkaProducer(bootstrap_servers=good.bootstrap, request_timeout_ms=5_000, **options)
    try:
        with pytest.raises((KafkaError, OSError, TimeoutError)):
            await asyncio.wait_for(producer.start(), 20)
            await asyncio.wait_for(producer.send_and_wait(TOPICS.room_state, b"x", key=b"k"), 10)
    finally:
        await producer.stop()
