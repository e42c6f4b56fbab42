"""Two admission processes on a real broker: shared rooms, forwarded room changes, leases, fairness."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.helpers import client, join_outcome, metadata, rpc_error
from townhall.core.config import DEV_ENV, KafkaConfig
from townhall.core.sharding import owner
from townhall.v1 import admission_pb2, admission_pb2_grpc
from townhall.v1.common_pb2 import RoomState
from townhall_tools.devtools.kafka_broker import free_port
from townhall_tools.devtools.processes import wait_serving
from townhall_tools.devtools.topology import CROWD_PENDING, Process

pytestmark = pytest.mark.kafka
ADMIT_RATE = 300  # joins/s per process: small, so a test can storm a room past it
CROWD_JOINS_PER_S = 100  # a room whose joins pass this is marked crowd by its owner


class Cluster:
    """Admission processes started as `townhall dev` starts them, on the session broker."""

    def __init__(self, kafka: KafkaConfig, root: Path, count: int) -> None:
        self.kafka = kafka
        self.root = root
        self.processes = [
            Process("admission", i, f"127.0.0.1:{free_port()}", 0, internal=f"127.0.0.1:{free_port()}")
            for i in range(count)
        ]
        # One crowd-lane process beside the owners, as `townhall dev` and the chart run it.
        self.crowd = Process(
            "admission", 0, f"127.0.0.1:{free_port()}", 0, lane="crowd", internal=f"127.0.0.1:{free_port()}"
        )

    @property
    def addresses(self) -> list[str]:
        """The client ports."""
        return [p.grpc for p in self.processes]

    @property
    def members(self) -> list[str]:
        """The internal ports: what the members know each other by, and rooms are owned over."""
        return [p.internal for p in self.processes]

    def home(self, room_id: str) -> str:
        """The client port of the room's owner."""
        return self.addresses[self.members.index(owner(room_id, self.members))]

    def start(self, proc: Process) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOWNHALL_")}
        env.update(
            DEV_ENV,
            TOWNHALL_KAFKA_BOOTSTRAP=self.kafka.bootstrap,
            TOWNHALL_ADMISSION_LISTEN=proc.grpc,
            TOWNHALL_ADMISSION_INTERNAL_LISTEN=proc.internal,
            TOWNHALL_ADMISSION_METRICS_PORT="0",
            TOWNHALL_ADMISSION_MEMBERS=",".join(self.members),
            TOWNHALL_ADMISSION_ADMIT_RATE=str(ADMIT_RATE),
            TOWNHALL_ADMISSION_LEASE_MIN="4",
            TOWNHALL_ADMISSION_CROWD_JOINS_PER_S=str(CROWD_JOINS_PER_S),
            # The storm test is about fairness, not the overload guard: every join (each from a new
            # user whose token is verified) must reach the admitter even on a busy 2-core machine,
            # instead of being cancelled by gRPC's pending-call limit.
            TOWNHALL_ADMISSION_MAX_PENDING_REQUESTS="4096",
            TOWNHALL_LOG_LEVEL="warning",
        )
        if proc.lane:
            env.update(
                TOWNHALL_ADMISSION_OWNER="false", TOWNHALL_ADMISSION_MAX_PENDING_REQUESTS=str(CROWD_PENDING)
            )
        log = open(self.root / f"{proc.name}.log", "ab")  # noqa: SIM115
        proc.popen = subprocess.Popen(
            [sys.executable, "-m", "townhall.admission"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        wait_serving(proc.popen, proc.grpc, proc.name, 60)

    def stop(self, proc: Process) -> None:
        if proc.popen is not None and proc.popen.poll() is None:
            proc.popen.terminate()
            try:
                proc.popen.wait(15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)


@pytest.fixture(scope="module")
def cluster(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cl = Cluster(kafka, tmp_path_factory.mktemp("admission-cluster"), 2)
    try:
        for proc in [*cl.processes, cl.crowd]:
            cl.start(proc)
        yield cl
    finally:
        for proc in [*cl.processes, cl.crowd]:
            cl.stop(proc)


def user() -> int:
    return random.randrange(1, 2**40) * 1000


async def live_room(cluster: Cluster, host: int, listener_limit: int = 0, via: int = 0) -> str:
    """A started room, created and started through process `via`, visible on every process."""
    c = client(cluster.addresses[via], host)
    room = await c.create_room("Cluster room", listener_limit=listener_limit)
    await c.start_room(room.room_id)
    await c.close()
    for address in cluster.addresses:
        await wait_live(address, room.room_id)
    return room.room_id


async def wait_live(address: str, room_id: str) -> None:
    c = client(address, 1)
    try:
        for _ in range(100):
            try:
                room = await c.get_room(room_id)
                if room.state == RoomState.ROOM_STATE_LIVE:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"room {room_id} not live on {address}")
    finally:
        await c.close()


async def test_owner_only_changes_are_forwarded_from_a_non_owner(cluster: Cluster) -> None:
    host = user()
    for _ in range(6):  # room ids are random: some are owned by each process
        a = client(cluster.addresses[0], host)
        room = await a.create_room("Forwarded")
        home = cluster.home(room.room_id)
        other = next(x for x in cluster.addresses if x != home)
        c = client(other, host)
        started = await c.start_room(room.room_id)
        assert started.state == RoomState.ROOM_STATE_LIVE
        await wait_live(home, room.room_id)
        denied = await rpc_error(client(other, host + 1).end_room(room.room_id))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED, "the owner's answer comes back as is"
        ended = await c.end_room(room.room_id)
        assert (ended.state, ended.version) == (
            RoomState.ROOM_STATE_ENDED,
            4,
        )  # created, live, announced, ended
        for x in (a, c):
            await x.close()


async def test_the_listener_limit_holds_across_processes(cluster: Cluster) -> None:
    limit = 40
    room_id = await live_room(cluster, user(), listener_limit=limit)
    stubs = [admission_pb2_grpc.AdmissionStub(client(a, 1)._admission) for a in cluster.addresses]
    base = user()

    async def try_join(i: int) -> bool:
        request = admission_pb2.JoinRequest(room_id=room_id)
        for _ in range(20):  # come back while told to wait, as the client library does
            try:
                reply = await stubs[i % 2].Join(request, metadata=metadata(base + i), timeout=10)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return False
            if reply.HasField("grant"):
                return True
            await asyncio.sleep(reply.waiting.retry_after_ms / 1000)
        return False

    admitted = sum(await asyncio.gather(*(try_join(i) for i in range(150))))
    # Leases never add up to more than the limit; spare admits may sit on either process.
    assert limit - 2 * 4 <= admitted <= limit


async def crowd_room(cluster: Cluster) -> str:
    """A live room whose joins passed the crowd threshold, marked crowd on every process."""
    room_id = await live_room(cluster, user())
    c = client(cluster.addresses[0], 1)
    stub = admission_pb2_grpc.AdmissionStub(c._admission)
    request = admission_pb2.JoinRequest(room_id=room_id)
    base = user()
    # ~3x the threshold for two seconds, on the default lane: the owner sees the demand in its leases.
    for wave in range(10):
        joins = (stub.Join(request, metadata=metadata(base + wave * 1000 + i), timeout=10) for i in range(60))
        await asyncio.gather(*joins, return_exceptions=True)
        await asyncio.sleep(0.2)
    for address in cluster.addresses:
        seen = client(address, 1)
        deadline = asyncio.get_running_loop().time() + 15
        while not (await seen.get_room(room_id)).crowd:
            assert asyncio.get_running_loop().time() < deadline, "the room was never marked crowd"
            await asyncio.sleep(0.1)
        await seen.close()
    await c.close()
    return room_id


async def test_a_room_that_draws_a_crowd_is_joined_on_the_crowd_lane(cluster: Cluster) -> None:
    room_id = await crowd_room(cluster)
    listener = client(cluster.processes[1].grpc, user(), crowd=cluster.crowd.grpc)
    room = await listener.get_room(room_id)  # as a client learns of it (or from a notification)
    assert room.crowd and room_id in listener.crowd_rooms
    grant = await listener.join(room_id)
    assert grant.ticket and grant.relay_address
    # The crowd-lane process owns no room: a room created through it belongs to an owner, and works.
    via_crowd = client(cluster.crowd.grpc, user())
    created = await via_crowd.create_room("Made through the crowd lane")
    assert cluster.home(created.room_id) in cluster.addresses
    assert (await via_crowd.start_room(created.room_id)).state == RoomState.ROOM_STATE_LIVE
    await wait_live(cluster.crowd.grpc, created.room_id)
    assert (await client(cluster.crowd.grpc, user()).join(created.room_id)).ticket
    for c in (listener, via_crowd):
        await c.close()


async def test_cold_rooms_are_admitted_while_a_hot_room_is_shed(cluster: Cluster) -> None:
    hot = await crowd_room(cluster)
    colds = [await live_room(cluster, user(), via=i % 2) for i in range(5)]
    # The storm arrives on the crowd lane, as clients that know the room draws a crowd send it.
    stub = admission_pb2_grpc.AdmissionStub(client(cluster.crowd.grpc, 1)._admission)
    cold_stub = admission_pb2_grpc.AdmissionStub(client(cluster.addresses[0], 1)._admission)
    outcomes: dict[str, int] = {}
    base = user()

    async def hot_join(i: int) -> None:
        kind, exc = await join_outcome(stub, hot, metadata(base + i))
        if exc is not None:
            if kind == "RESOURCE_EXHAUSTED":  # shed by the fair budget, with a jittered retry-after
                assert 1000 <= int(dict(exc.trailing_metadata() or ())["retry-after-ms"]) <= 3000
            else:  # or refused by gRPC itself when the crowd lane's short queue is full
                assert kind == "CANCELLED", exc
        outcomes[kind] = outcomes.get(kind, 0) + 1

    async def storm() -> None:
        # Open loop: 3x the process's admit budget, started on schedule whatever the answers.
        tasks = []
        for i in range(3 * ADMIT_RATE * 2):
            tasks.append(asyncio.create_task(hot_join(i)))
            if i % 30 == 0:
                await asyncio.sleep(30 / (3 * ADMIT_RATE))
        await asyncio.gather(*tasks)

    async def cold_join(i: int) -> str:
        request = admission_pb2.JoinRequest(room_id=colds[i % 5])
        for _ in range(10):  # a waiting answer (capacity on its way) is fine; shedding is not
            try:
                reply = await cold_stub.Join(request, metadata=metadata(base + 10_000_000 + i), timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            if reply.HasField("grant"):
                return "granted"
            await asyncio.sleep(reply.waiting.retry_after_ms / 1000)
        return "waited too long"

    storming = asyncio.create_task(storm())
    await asyncio.sleep(0.3)
    cold = await asyncio.gather(*(cold_join(i) for i in range(20)))
    await storming
    assert cold == ["granted"] * 20, "every cold-room join is admitted during the storm"
    shed = outcomes.get("RESOURCE_EXHAUSTED", 0) + outcomes.get("CANCELLED", 0)
    assert shed > ADMIT_RATE, outcomes
    assert outcomes.get("granted", 0) >= ADMIT_RATE, outcomes


async def test_a_restarted_process_rebuilds_every_room(cluster: Cluster) -> None:
    host = user()
    rooms = [await live_room(cluster, host, via=i % 2) for i in range(4)]
    proc = cluster.processes[1]
    cluster.stop(proc)
    cluster.start(proc)
    c = client(proc.grpc, host)
    for room_id in rooms:
        room = await c.get_room(room_id)
        assert room.state == RoomState.ROOM_STATE_LIVE
        assert (await client(proc.grpc, user()).join(room_id, give_up_after_s=5)).ticket
    ended = await c.end_room(rooms[0])  # owned here or forwarded: either way it works after the restart
    assert ended.state == RoomState.ROOM_STATE_ENDED
    await c.close()
