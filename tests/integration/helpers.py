"""Helpers for integration tests: in-process servers on loopback and Kafka readers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer

from townhall.admission.app import AdmissionApp
from townhall.client import Client, Endpoints
from townhall.core import server
from townhall.core.auth import GRANTS, Tokens
from townhall.core.config import DEV_AUTH, DEV_ENV, Config, KafkaConfig, TlsConfig, load
from townhall.v1 import admission_pb2
from townhall_tools.devtools.kafka_broker import free_port
from townhall_tools.devtools.topology import Topology
from townhall_tools.faults.measure import Outcome
from townhall_tools.faults.runner import topology_for

# Test servers run with the development keys (the tests' own topology): tokens minted with them are accepted.
TOKENS = Tokens(DEV_AUTH)
metadata = TOKENS.metadata


def client(
    address: str, user: int, grants: Iterable[str] = GRANTS, tls: TlsConfig | None = None, crowd: str = ""
) -> Client:
    """A Client for `user` (all grants unless told) calling admission and notifier at `address`."""
    return Client(Endpoints(address, address, tls or TlsConfig(), crowd), user, TOKENS.mint(user, grants))


def config_for(kafka: KafkaConfig, **sections: dict[str, Any]) -> Config:
    """Default config with the development keys on the test broker, each service's internal port on a
    free loopback port, with section overrides."""
    internal = {
        name: {"internal_listen": f"127.0.0.1:{free_port()}"} for name in ("admission", "relay", "notifier")
    }
    config = dataclasses.replace(load(env=DEV_ENV), kafka=kafka)
    for name, changes in internal.items():
        config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **changes)})
    for name, changes in sections.items():
        config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **changes)})
    return config


def users() -> tuple[int, int, int]:
    """Three user ids no other test uses (random, in a range of their own)."""
    base = random.randrange(1, 2**40) * 10
    return base + 1, base + 2, base + 3


def dial(address: str, host: str | None = None) -> grpc.aio.Channel:
    """A channel with a connection of its own (channels to one target share one by default) to the
    server at `address`, dialled at `host` instead of the address's host if given."""
    target = f"{host}:{address.rpartition(':')[2]}" if host else address
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


@asynccontextmanager
async def serving(app: server.App, config: Config, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serves `app` on a free port of `host` (loopback), and its internal port as configured; yields
    the client address; drains it afterwards.

    With host "[::]" the server takes both 127.0.0.1 and ::1: two client addresses on one machine.
    """
    internal = getattr(config, app.auth.kind).internal_listen
    running = await server.start(app, config, f"{host}:0", internal)
    try:
        yield f"{host}:{running.port}"
    finally:
        await server.stop(app, running, grace_s=1.0)


@asynccontextmanager
async def admission_members(
    kafka: KafkaConfig, count: int, tickets: dict[str, Any] | None = None, **admission: Any
) -> AsyncIterator[list[tuple[str, AdmissionApp]]]:
    """`count` admission processes in this one on the test broker, each a member with the others (its
    internal port), with `admission` settings added; yields each one's client address and app, and
    stops them afterwards."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    members = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    started: list[tuple[str, AdmissionApp, server.Running]] = []
    try:
        for address, member in zip(addresses, members, strict=True):
            own = {"listen": address, "internal_listen": member, "members": tuple(members), **admission}
            config = config_for(kafka, admission=own, **({"tickets": tickets} if tickets else {}))
            app = AdmissionApp(config)
            started.append((address, app, await server.start(app, config, address, member)))
        yield [(address, app) for address, app, _ in started]
    finally:
        for _, app, running in started:
            await server.stop(app, running, grace_s=0.5)


async def wait_for_record(
    kafka: KafkaConfig, topic: str, match: Callable[[bytes, bytes], bool], timeout_s: float = 15.0
) -> tuple[bytes, bytes]:
    """The first record of `topic` (from the beginning) that matches, or TimeoutError."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    if match(record.key or b"", record.value or b""):
                        return record.key or b"", record.value or b""
        raise TimeoutError(f"no matching record on {topic} within {timeout_s} s")
    finally:
        await consumer.stop()


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    """The error an awaited call raises (fails the test if it succeeds)."""
    try:
        await asyncio.wait_for(call, 15)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded but should have failed")


async def refused_with(call: Any, code: grpc.StatusCode, message: str) -> None:
    """An awaited call fails with `code` and a message that says `message`."""
    error = await rpc_error(call)
    assert (error.code(), message in (error.details() or "")) == (code, True), error.details()


async def join_outcome(stub: Any, room_id: str, metadata: Any) -> tuple[str, grpc.aio.AioRpcError | None]:
    """One Join on `stub`: "granted", "waiting" or the refusal's status name, with the refusal."""
    try:
        reply = await stub.Join(admission_pb2.JoinRequest(room_id=room_id), metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc
    return ("granted" if reply.HasField("grant") else "waiting"), None


def processes_on(kafka: KafkaConfig, root: Path, counts: dict[str, int], name: str) -> Iterator[Topology]:
    """`counts` processes of each service, started as `townhall dev` starts them (free ports, warning
    logs) on the session broker under topics of their own (prefix `name`-...); stopped after."""
    topology = Topology(
        root,
        counts,
        fixed_ports=False,
        env={"TOWNHALL_LOG_LEVEL": "warning"},
        kafka=kafka.bootstrap,
        topic_prefix=f"{name}-{uuid.uuid4().hex[:8]}",
    )
    topology.start()
    try:
        yield topology
    finally:
        topology.stop()


def fault_topology(
    group: str, tmp_path_factory: pytest.TempPathFactory, kafka: KafkaConfig | None
) -> Iterator[Topology]:
    """The processes a group of fault scenarios runs on (townhall_tools.faults.runner.GROUPS), started as
    `townhall dev` starts them, on the session broker (or a broker of their own); stopped after."""
    topology = topology_for(
        group, tmp_path_factory.mktemp(f"faults-{group}"), kafka.bootstrap if kafka else None
    )
    topology.start()
    try:
        yield topology
    finally:
        topology.stop()


def recorded(outcome: Outcome, folder: Path) -> Outcome:
    """Writes a fault run's figures to `folder` (and the test log), returns it."""
    print(json.dumps(outcome.as_dict()))
    (folder / f"{outcome.scenario}.json").write_text(json.dumps(outcome.as_dict(), indent=2))
    return outcome
