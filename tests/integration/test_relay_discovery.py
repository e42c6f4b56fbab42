"""Relays come and go while admission runs (separate processes, the real broker): a relay started after
admission gets listeners once it reports and answers its health probe; a relay that is killed or drains
gets none; a relay that reports but was never found serving never gets any."""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.helpers import client, metadata
from townhall.client import Client
from townhall.core.config import DEV_AUTH, KafkaConfig
from townhall.core.kafka import Topics
from townhall.core.provenance import RELAY, RecordSigner, Writer
from townhall.core.sharding import owner
from townhall.internal.v1.events_pb2 import RelayLoad
from townhall.v1 import admission_pb2, admission_pb2_grpc
from townhall_tools.devtools.kafka_broker import free_port
from townhall_tools.devtools.topology import Process, Topology

pytestmark = pytest.mark.kafka
REPORT_S = 0.3
WITHIN_S = 20.0


@pytest.fixture
def cluster(kafka: KafkaConfig, tmp_path: Path) -> Iterator[Topology]:
    """One admission process that knows one relay (its seed); more relays are started by the test."""
    env = {"TOWNHALL_RELAY_LOAD_REPORT_S": str(REPORT_S), "TOWNHALL_LOG_LEVEL": "warning"}
    topology = Topology(
        tmp_path,
        {"relay": 1, "admission": 1},
        fixed_ports=False,
        env=env,
        kafka=kafka.bootstrap,
        topic_prefix=f"disc-{uuid.uuid4().hex[:8]}",
    )
    topology.start()
    try:
        yield topology
    finally:
        topology.stop()


class Site:
    """A host making live rooms and fresh listeners joining them, on one admission process.

    A room's listeners all go to its origin (well below relay.edge_target), and its origin is the first
    of the live relays in the room's rendezvous order: a room whose order starts with relay R is joined
    on R exactly while admission places on R.
    """

    def __init__(self, admission: str) -> None:
        self.host: Client = client(admission, random.randrange(1, 2**40) * 1000 + 999)
        self._channel = grpc.aio.insecure_channel(admission)
        self._stub = admission_pb2_grpc.AdmissionStub(self._channel)
        self._next = random.randrange(1, 2**40) * 1000

    async def room_led_by(self, relay: str, among: list[str]) -> str:
        """A live room whose rendezvous order over `among` starts with `relay`."""
        for _ in range(40):  # each room has about a 1/len(among) chance
            room = await self.host.create_room("Relays come and go")
            if owner(room.room_id, among) == relay:
                await self.host.start_room(room.room_id)
                return room.room_id
        raise AssertionError(f"no room led by {relay} among {among}")

    async def join(self, room_id: str) -> tuple[int, str]:
        """A new listener's join; (user, the relay it was sent to)."""
        self._next += 1
        request = admission_pb2.JoinRequest(room_id=room_id)
        reply = await self._stub.Join(request, metadata=metadata(self._next), timeout=10)
        assert reply.HasField("grant"), reply
        return self._next, reply.grant.relay_address

    async def until(self, room_id: str, relay: str, what: str) -> int:
        """Joins the room until a listener is sent to `relay` (within WITHIN_S); that listener."""
        deadline = time.monotonic() + WITHIN_S
        while time.monotonic() < deadline:
            user, placed = await self.join(room_id)
            if placed == relay:
                return user
            await asyncio.sleep(0.1)
        raise AssertionError(f"not within {WITHIN_S:.0f} s: {what}")

    async def close(self) -> None:
        await self._channel.close()
        await self.host.close()


async def relays_known(admission: Process) -> float:
    """townhall_admission_relays_known of a running admission process."""
    url = f"http://127.0.0.1:{admission.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    line = next(x for x in text.splitlines() if x.startswith("townhall_admission_relays_known "))
    return float(line.split()[1])


async def report_forever(kafka: KafkaConfig, topic: str, relay: str) -> None:
    """Load reports of a relay that does not exist (nothing listens at its address), signed as that relay
    with the topology's (development) service key."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    signer = RecordSigner(DEV_AUTH, Writer(RELAY, relay))
    await producer.start()
    try:
        while True:
            report = RelayLoad(relay=relay, capacity=100, at_ms=time.time_ns() // 1_000_000)
            value, key = report.SerializeToString(), relay.encode()
            headers = signer.headers(topic, key, value)
            await producer.send_and_wait(topic, value, key=key, headers=headers)
            await asyncio.sleep(REPORT_S)
    finally:
        await producer.stop()


async def test_relays_added_after_admission_get_listeners_and_relays_that_go_away_get_none(
    cluster: Topology, kafka: KafkaConfig
) -> None:
    admission = cluster.of("admission")[0]
    seed = cluster.of("relay")[0].grpc
    site = Site(admission.grpc)
    phantom = f"127.0.0.1:{free_port()}"
    phantom_reports = asyncio.create_task(
        report_forever(kafka, Topics(cluster.topic_prefix).relay_load, phantom)
    )
    try:
        # A relay started now (admission was told of the seed only) gets the listeners of its rooms.
        late = cluster.add("relay")
        room = await site.room_led_by(late.grpc, [seed, late.grpc])
        user = await site.until(room, late.grpc, "the new relay gets a listener")
        listener = client(admission.grpc, user)
        grant = await listener.join(room)
        assert grant.relay_address == late.grpc
        stream = listener.subscribe(grant, room)
        await asyncio.wait_for(stream.initial_metadata(), 10)  # the relay took the ticket
        stream.cancel()
        await listener.close()

        # A relay that reports but does not answer is found and probed, but never placed on.
        deadline = time.monotonic() + WITHIN_S
        while await relays_known(admission) < 3:  # the seed, the new relay, the phantom
            assert time.monotonic() < deadline, "the reporting relay was not found"
            await asyncio.sleep(0.2)
        phantoms = await site.room_led_by(phantom, [seed, late.grpc, phantom])
        assert {(await site.join(phantoms))[1] for _ in range(5)} <= {seed, late.grpc}

        # Killed: after a couple of probe intervals its rooms' listeners go to the seed, for good.
        cluster.kill(late)
        await site.until(room, seed, "the killed relay's room moves to a live relay")
        assert {(await site.join(room))[1] for _ in range(10)} == {seed}

        # Drained (SIGTERM: NOT_SERVING first): likewise, and its goodbye makes admission forget it.
        draining = cluster.add("relay")
        drained = await site.room_led_by(draining.grpc, [seed, draining.grpc])
        await site.until(drained, draining.grpc, "the second new relay gets a listener")
        known = await relays_known(admission)
        cluster.terminate(draining)
        await site.until(drained, seed, "the draining relay's room moves to a live relay")
        assert {(await site.join(drained))[1] for _ in range(10)} == {seed}
        assert draining.popen is not None
        await asyncio.to_thread(draining.popen.wait, 30)
        deadline = time.monotonic() + WITHIN_S
        while await relays_known(admission) >= known:
            assert time.monotonic() < deadline, "the relay that said goodbye is still known"
            await asyncio.sleep(0.2)
    finally:
        phantom_reports.cancel()
        await asyncio.gather(phantom_reports, return_exceptions=True)
        await site.close()


async def test_a_relay_advertising_an_address_admission_cannot_reach_is_probed_at_its_internal_port(
    cluster: Topology,
) -> None:
    """kind's per-relay NodePorts: a relay advertises the host's 127.0.0.1:<base + ordinal>, which nothing
    inside the cluster listens on. Admission probes it at its internal address (from its reports), places
    listeners on it, and their tickets name the advertised address, which the relay accepts."""
    admission = cluster.of("admission")[0]
    seed = cluster.of("relay")[0].grpc
    unreachable = free_port()  # like a NodePort seen from inside a pod: nobody listens there
    ordinal = 3
    env = {
        "TOWNHALL_RELAY_ADVERTISE": "127.0.0.1",
        "TOWNHALL_RELAY_ADVERTISE_PORT_BASE": str(unreachable - ordinal),
        "TOWNHALL_RELAY_ORDINAL": str(ordinal),
    }
    external = cluster.add("relay", env=env)
    advertised = f"127.0.0.1:{unreachable}"
    site = Site(admission.grpc)
    try:
        room = await site.room_led_by(advertised, [seed, advertised])
        user = await site.until(room, advertised, "the relay with an unreachable address gets a listener")
        listener = client(admission.grpc, user)
        grant = await listener.join(room)
        assert grant.relay_address == advertised
        # The client side reaches the relay (here at its listen port, as kind forwards the NodePort).
        grant.relay_address = external.grpc
        stream = listener.subscribe(grant, room)
        await asyncio.wait_for(stream.initial_metadata(), 10)  # the relay took the ticket for its address
        stream.cancel()
        await listener.close()
    finally:
        await site.close()
