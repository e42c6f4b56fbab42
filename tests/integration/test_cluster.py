"""The sharded cluster as separate processes, as `townhall dev` runs it: 2 admission owners and a crowd-lane
process, 3 relays, a notifier, a real broker. Everything a listener does goes through Admission.Join and
the tickets it hands out."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import grpc
import pytest

from tests.integration.helpers import client, join_outcome, metadata
from tests.integration.test_relay import TIMEOUT, frame_ids, gaps, read_until
from townhall.cli.status import samples
from townhall.client import Client
from townhall.v1 import admission_pb2_grpc, relay_pb2, relay_pb2_grpc
from townhall.v1.admission_pb2 import Grant
from townhall.v1.relay_pb2 import Chunk
from townhall_tools.devtools.topology import Process, Topology

pytestmark = pytest.mark.kafka
ADMIT_RATE = 200  # joins/s per admission process: small, so the test can storm a room past it
EDGE_TARGET = 3  # listeners of a room per relay before it gets another edge


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    counts = {"admission": 2, "crowd": 1, "relay": 3, "notifier": 1}
    env = {
        "TOWNHALL_ADMISSION_ADMIT_RATE": str(ADMIT_RATE),
        "TOWNHALL_ADMISSION_LEASE_MIN": "4",
        "TOWNHALL_RELAY_EDGE_TARGET": str(EDGE_TARGET),
        "TOWNHALL_RELAY_LOAD_REPORT_S": "0.5",
        # A listener that stops reading overflows a short queue quickly, and is not cut off in the test.
        "TOWNHALL_RELAY_SUBSCRIBER_QUEUE": "5",
        "TOWNHALL_RELAY_STUCK_CUTOFF_S": "60",
        "TOWNHALL_LOG_LEVEL": "warning",
    }
    topology = Topology(tmp_path_factory.mktemp("cluster"), counts, fixed_ports=False, env=env)
    topology.start()
    try:
        yield topology
    finally:
        topology.stop()


def owners(cluster: Topology) -> list[Process]:
    return [p for p in cluster.processes if p.service == "admission" and not p.lane]


def crowd_lane(cluster: Topology) -> Process:
    return next(p for p in cluster.processes if p.lane == "crowd")


@asynccontextmanager
async def clients(cluster: Topology, count: int) -> AsyncIterator[list[Client]]:
    """`count` fresh users, alternating between the admission owners (the crowd lane known to each)."""
    base = random.randrange(1, 2**40) * 1000
    procs = owners(cluster)
    made = [client(procs[i % 2].grpc, base + i, crowd=crowd_lane(cluster).grpc) for i in range(count)]
    try:
        yield made
    finally:
        for c in made:
            await c.close()


async def live_room(host: Client, listener_limit: int = 0) -> str:
    room = await host.create_room("Cluster room", listener_limit=listener_limit)
    await host.start_room(room.room_id)
    return room.room_id


async def joined(c: Client, room_id: str) -> Grant:
    """A grant once every admission process knows the room (replicas follow the room-state topic)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        try:
            return await c.join(room_id, give_up_after_s=TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def chunks_of(got: list[tuple[float, Chunk]]) -> list[Chunk]:
    return [chunk for _, chunk in got]


def relays_up(owner: Process) -> float:
    """Relays an admission process knows and does not find down (its gauges)."""
    known = down = 0.0
    for sample in samples(owner.describe()["metrics"]):
        if sample.name == "townhall_admission_relays_known":
            known = sample.value
        elif sample.name == "townhall_admission_peers_down" and sample.labels.get("kind") == "relay":
            down = sample.value
    return known - down


async def every_owner_sees_the_relays(cluster: Topology, within_s: float = 20.0) -> list[float]:
    """Waits (bounded) until each owner's health probes found all 3 relays serving: a relay not probed
    serving yet gets no listeners, as it should not, but this test needs all three."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        up = [relays_up(owner) for owner in owners(cluster)]
        if all(n >= 3 for n in up) or asyncio.get_running_loop().time() > deadline:
            return up
        await asyncio.sleep(0.2)


async def test_a_hot_rooms_listeners_spread_over_edges_and_hear_every_frame_in_order(
    cluster: Topology,
) -> None:
    frames = 40
    up = await every_owner_sees_the_relays(cluster)
    # Each admission process counts a relay's listeners from its load reports (every 0.5 s here) plus the
    # listeners it placed there that a report may not show yet; each listener subscribes once admitted, as
    # a client does, so the reports soon show it. 18 at 3 per relay fill the origin and two edges.
    async with clients(cluster, 19) as (host, *audience):
        room_id = await live_room(host)
        stage = await joined(host, room_id)
        grants: list[Grant] = []
        calls = []
        for c in audience:
            grants.append(await joined(c, room_id))
            calls.append(c.subscribe(grants[-1], room_id))
        placed = Counter(g.relay_address for g in grants)
        edges = set(placed) - {stage.relay_address}
        assert len(edges) >= 2, (
            f"18 listeners at 3 per relay need the origin and at least two edges: {dict(placed)}, "
            f"origin {stage.relay_address} (relays up per owner: {up})"
        )
        await asyncio.sleep(0.5)  # edges open their pulls to the origin before the first word
        speaking = asyncio.create_task(host.publish(stage, [bytes([i]) * 40 for i in range(frames)]))
        heard = await asyncio.gather(
            *(read_until(call, lambda ch: len(frame_ids(ch)) >= frames, TIMEOUT * 2) for call in calls)
        )
        assert await asyncio.wait_for(speaking, TIMEOUT) == frames
    expected = [(host.user, seq) for seq in range(frames)]
    for got in heard:
        assert frame_ids(chunks_of(got))[:frames] == expected
    # Edges forward the origin's bytes: every listener sees the same chunk numbers.
    sequences = {tuple(c.sequence for c in chunks_of(got))[:5] for got in heard}
    assert len(sequences) == 1


async def test_cold_rooms_are_admitted_while_a_hot_room_is_shed_on_the_crowd_lane(cluster: Topology) -> None:
    async with clients(cluster, 6) as (host, *cold_hosts):
        hot = await live_room(host)
        colds = [await live_room(c) for c in cold_hosts]
        # The hot room's clients know it draws a crowd: they storm the crowd lane, open loop.
        channel = grpc.aio.insecure_channel(crowd_lane(cluster).grpc)
        stub = admission_pb2_grpc.AdmissionStub(channel)
        base = random.randrange(1, 2**40) * 1000
        outcomes: dict[str, int] = {}

        async def hot_join(i: int) -> None:
            kind, _ = await join_outcome(stub, hot, metadata(base + i))
            outcomes[kind] = outcomes.get(kind, 0) + 1

        async def storm() -> None:
            tasks = []
            for i in range(3 * ADMIT_RATE * 2):  # 3x the crowd process's admit budget for 2 s
                tasks.append(asyncio.create_task(hot_join(i)))
                if i % 30 == 0:
                    await asyncio.sleep(30 / (3 * ADMIT_RATE))
            await asyncio.gather(*tasks)

        storming = asyncio.create_task(storm())
        await asyncio.sleep(0.3)
        async with clients(cluster, 20) as listeners:
            cold = await asyncio.gather(
                *(joined(c, colds[i % len(colds)]) for i, c in enumerate(listeners)), return_exceptions=True
            )
        await storming
        await channel.close()
    assert all(isinstance(g, Grant) and g.ticket for g in cold), cold
    assert set(outcomes) <= {"granted", "waiting", "RESOURCE_EXHAUSTED", "CANCELLED"}, outcomes
    assert outcomes.get("RESOURCE_EXHAUSTED", 0) + outcomes.get("CANCELLED", 0) > ADMIT_RATE, outcomes
    assert outcomes.get("granted", 0) >= ADMIT_RATE, outcomes


async def test_a_cut_listener_resumes_without_missing_buffered_frames(cluster: Topology) -> None:
    async with clients(cluster, 3) as (host, listener, keeper):
        room_id = await live_room(host)
        stage = await joined(host, room_id)
        grant, keeper_grant = await joined(listener, room_id), await joined(keeper, room_id)
        first, keeping = listener.subscribe(grant, room_id), keeper.subscribe(keeper_grant, room_id)
        speaking = asyncio.create_task(host.publish(stage, [bytes([i % 256]) * 40 for i in range(150)]))
        before = chunks_of(await read_until(first, lambda ch: len(ch) >= 6))
        last = before[-1].sequence
        first.cancel()  # the connection is cut; the room goes on meanwhile
        await read_until(keeping, lambda ch: bool(ch) and ch[-1].sequence >= last + 5)
        resumed = listener.subscribe(grant, room_id, resume_after=last)
        after = chunks_of(await read_until(resumed, lambda ch: len(ch) >= 8))
        speaking.cancel()
        keeping.cancel()
        resumed.cancel()
    assert [c.sequence for c in after] == list(range(last + 1, last + 9))
    heard = [seq for _, seq in frame_ids(before + after)]
    assert heard == list(range(heard[0], heard[0] + len(heard))), "no frame missing across the cut"


async def test_a_listener_that_stops_reading_delays_no_one(cluster: Topology) -> None:
    async with clients(cluster, 4) as (host, slow_user, *healthy_users):
        room_id = await live_room(host)
        stage = await joined(host, room_id)
        slow_grant = await joined(slow_user, room_id)
        healthy_grants = [await joined(c, room_id) for c in healthy_users]
        # The slow listener's connection keeps a fixed, small flow-control window and is never read.
        _, ticket = slow_user.relay(slow_grant)
        slow_channel = grpc.aio.insecure_channel(
            slow_grant.relay_address, options=[("grpc.http2.bdp_probe", 0)]
        )
        slow = relay_pb2_grpc.RelayStub(slow_channel).Subscribe(
            relay_pb2.SubscribeRequest(room_id=room_id), metadata=ticket
        )
        healthy = [c.subscribe(g, room_id) for c, g in zip(healthy_users, healthy_grants, strict=True)]
        await asyncio.sleep(0.3)
        # 1.4 KB frames every 5 ms: the slow listener's window fills within a few chunks.
        speaking = asyncio.create_task(
            host.publish(stage, [bytes([i % 256]) * 1400 for i in range(800)], frame_ms=5)
        )
        got = await asyncio.gather(
            *(read_until(call, lambda ch: len(ch) >= 30, TIMEOUT * 2) for call in healthy)
        )
        for one in got:
            assert gaps(chunks_of(one)) == 0, "a healthy listener lost chunks"
        # The slow listener, reading again, finds the jump where its oldest chunks were dropped.
        behind = chunks_of(await read_until(slow, lambda ch: len(ch) >= 12, TIMEOUT * 2))
        assert gaps(behind) > 0
        speaking.cancel()
        for call in (slow, *healthy):
            call.cancel()
        await slow_channel.close()


async def test_a_rooms_listener_limit_holds_across_admission_processes(cluster: Topology) -> None:
    limit = 20
    async with clients(cluster, 1) as (host,):
        room_id = await live_room(host, listener_limit=limit)
    async with clients(cluster, 60) as listeners:  # alternating between the two owners
        results = await asyncio.gather(*(joined(c, room_id) for c in listeners), return_exceptions=True)
    admitted = sum(1 for r in results if isinstance(r, Grant))
    refused = [r for r in results if not isinstance(r, Grant)]
    assert all(isinstance(r, TimeoutError | grpc.aio.AioRpcError) for r in refused), refused
    # Leases never add up to more than the limit; spare admits may sit on either process.
    assert limit - 2 * 4 <= admitted <= limit
