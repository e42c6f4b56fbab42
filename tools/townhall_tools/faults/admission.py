"""Admission faults: kill -9 or SIGTERM of a rooms' owner while hosts change rooms and users join.

Hosts keep creating, starting and ending rooms, some owned by the victim; listeners keep
joining a live room the victim owns (with a listener limit) through the other processes. Every
change a host got an answer for is checked afterwards against the room-state topic (read from
its beginning) and against every surviving replica: none may be missing, and no room version
may exist twice with different contents (a fork). No client may see an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import grpc

from townhall.admission.rooms import room_id_for
from townhall.client import Client, Endpoints
from townhall.core.config import KafkaConfig
from townhall.core.kafka import Topics, read_to_end
from townhall.core.records import Record
from townhall.core.sharding import owner
from townhall.core.tasks import cancel
from townhall.internal.v1.events_pb2 import RoomStarted
from townhall.v1.admission_pb2 import JoinRequest
from townhall.v1.common_pb2 import Room, RoomState
from townhall_tools.devtools.topology import Process, Topology
from townhall_tools.faults.cluster import endpoints, exited, fault, fresh_user, restore, user, user_metadata
from townhall_tools.faults.measure import Outcome

SLOTS_ON_VICTIM = 4
SLOTS_ELSEWHERE = 2
PAUSE_S = 0.15
BEFORE_S = 1.5
AFTER_S = 3.0
# After the fault the listeners keep joining until the limited room is full (or this long has passed),
# then FULL_MORE_S more, so the limit is tested across the fault even on a slow run. (A room may stop
# short of its limit: admits leased to a process no join reaches stay there, by design.)
FILL_WITHIN_S = 30.0
FULL_MORE_S = 1.0
LIMIT = 30
JOINERS = 4
# About 10 joins/s in all: the limited room fills during the fault, not before it.
JOIN_PAUSE_S = 0.4


@dataclass
class Ledger:
    """Every change a host was answered for, and every error a client saw."""

    acked: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    # (started, answered, room) of each change made in a room the victim owned.
    timed: list[tuple[float, float, str]] = field(default_factory=list)
    answered: list[float] = field(default_factory=list)  # when each change was answered
    errors: list[str] = field(default_factory=list)
    granted: set[int] = field(default_factory=set)
    full: asyncio.Event = field(default_factory=asyncio.Event)  # the limited room reached its limit
    granted_after: int = 0  # admits after the fault: joins went on
    faulted: float = 0.0
    joins: int = 0

    def record(self, room: Room) -> None:
        self.acked[room.room_id].append((room.version, room.state))
        self.answered.append(time.monotonic())


def request_for(host: int, target: str, members: list[str]) -> str:
    """An idempotency key whose room lands on `target` (the room id is derived from it)."""
    while True:
        key = uuid.uuid4().hex
        if owner(room_id_for(host, key), members) == target:
            return key


async def change_rooms(
    client: Client, target: str, members: list[str], ledger: Ledger, stop: asyncio.Event
) -> None:
    """One host: create, start and end rooms owned by `target`, one change at a time."""
    victim = target == members[-1]
    while not stop.is_set():
        key = request_for(client.user, target, members)
        room_id = room_id_for(client.user, key)
        for change in ("create", "start", "end"):
            started = time.monotonic()
            try:
                if change == "create":
                    room = await client.create_room("fault: admission", request_id=key)
                elif change == "start":
                    room = await client.start_room(room_id)
                else:
                    room = await client.end_room(room_id)
            except grpc.aio.AioRpcError as exc:
                ledger.errors.append(f"{change}: {exc.code().name}: {exc.details()}")
                break
            ledger.record(room)
            if victim:
                ledger.timed.append((started, time.monotonic(), room_id))
            await asyncio.sleep(PAUSE_S)


async def _joiner(client: Client, room_id: str, first_user: int, ledger: Ledger, stop: asyncio.Event) -> None:
    """Distinct users joining one room through the processes that stay up, as fast as answered."""
    request = JoinRequest(room_id=room_id)
    user = first_user
    while not stop.is_set():
        user += 1
        ledger.joins += 1
        for _ in range(5):  # told to wait (capacity on its way): come back as asked
            try:
                reply = await client.admission.Join(request, metadata=user_metadata(user), timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # full or shed: not an error
                    ledger.errors.append(f"join: {exc.code().name}: {exc.details()}")
                break
            if reply.HasField("grant"):
                ledger.granted.add(user)
                if len(ledger.granted) >= LIMIT:
                    ledger.full.set()
                ledger.granted_after += int(bool(ledger.faulted))
                break
            await asyncio.sleep(reply.waiting.retry_after_ms / 1000)
        await asyncio.sleep(JOIN_PAUSE_S)


async def owner_fault(topology: Topology, kill: bool) -> Outcome:
    """One run: the owner of rooms under change (the last admission process) is killed or stopped."""
    how = "kill -9" if kill else "SIGTERM"
    outcome = Outcome(f"admission-{'kill' if kill else 'sigterm'}", f"{how} of a rooms' admission owner")
    # Rooms are owned by rendezvous over the members' internal addresses; clients call the client ports.
    procs = sorted(topology.of("admission"), key=lambda p: p.internal)
    members = [p.internal for p in procs]
    victim = members[-1]
    proc: Process = procs[-1]
    others = [p.grpc for p in procs[:-1]]
    survivors = Endpoints(",".join(others), others[0])
    ledger = Ledger()
    stop = asyncio.Event()
    clients: list[Client] = []
    tasks: list[asyncio.Task[None]] = []
    faulted_proc = False
    try:
        host = user(endpoints(topology), fresh_user())
        clients.append(host)
        key = request_for(host.user, victim, members)
        limited = await host.create_room("fault: limited", listener_limit=LIMIT, request_id=key)
        await host.start_room(limited.room_id)
        for target, count in [(victim, SLOTS_ON_VICTIM), *((m, SLOTS_ELSEWHERE) for m in members[:-1])]:
            for _ in range(count):
                client = user(endpoints(topology), fresh_user())
                clients.append(client)
                tasks.append(asyncio.create_task(change_rooms(client, target, members, ledger, stop)))
        for _ in range(JOINERS):
            joiner = user(survivors, fresh_user())
            clients.append(joiner)
            tasks.append(asyncio.create_task(_joiner(joiner, limited.room_id, joiner.user, ledger, stop)))
        await asyncio.sleep(BEFORE_S)
        faulted = ledger.faulted = time.monotonic()
        fault(topology, proc, kill)
        faulted_proc = True
        await asyncio.sleep(AFTER_S)
        if not kill:
            status = await exited(proc)
            outcome.expect(status == 0, f"the stopped process exited with {status}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ledger.full.wait(), FILL_WITHIN_S)
        await asyncio.sleep(FULL_MORE_S)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        tasks = []

        kafka = KafkaConfig(bootstrap=topology.bootstrap, topic_prefix=topology.topic_prefix)
        lost, forks = await check_topic(kafka, ledger)
        stale = await check_replicas(others, ledger)
        unannounced = await check_announced(topology, ledger)
        after = [(s, e) for s, e, _ in ledger.timed if s >= faulted]
        across = [e - s for s, e, _ in ledger.timed if s <= faulted <= e or s >= faulted]
        outcome.figures.update(
            changes_acked=sum(len(v) for v in ledger.acked.values()),
            rooms=len(ledger.acked),
            recovery_s=round(min((e for _, e in after), default=faulted) - faulted, 3),
            longest_change_s=round(max(across, default=0.0), 3),
            lost=lost,
            forks=forks,
            stale_replicas=stale,
            half_made=unannounced,
            joins=ledger.joins,
            admitted=len(ledger.granted),
            admitted_after_fault=ledger.granted_after,
            room_full=ledger.full.is_set(),
            limit=LIMIT,
            errors=len(ledger.errors),
        )
        outcome.expect(lost == 0, f"{lost} acknowledged room changes are not in the room-state topic")
        outcome.expect(forks == 0, f"{forks} room versions were written twice with different contents")
        outcome.expect(stale == 0, f"{stale} replicas miss an acknowledged change")
        outcome.expect(unannounced == 0, f"{unannounced} started rooms were never announced")
        outcome.expect(not ledger.errors, f"clients saw errors: {ledger.errors[:3]}")
        outcome.expect(len(ledger.granted) <= LIMIT, f"{len(ledger.granted)} admitted to a room of {LIMIT}")
        outcome.expect(bool(after), "no room change of the victim's rooms was answered after the fault")
    finally:
        stop.set()
        await cancel(*tasks)
        for client in clients:
            await client.close()
        if faulted_proc:
            outcome.figures["restore_s"] = round(await restore(topology, proc), 3)
    return outcome


async def check_topic(kafka: KafkaConfig, ledger: Ledger) -> tuple[int, int]:
    """(acknowledged changes missing from the room-state topic of `kafka`, versions written with different
    contents)."""
    written: dict[tuple[str, int], set[int]] = defaultdict(set)

    def apply(record: Record) -> None:
        # What was committed, signed or not: the log as every reader sees it (a fenced writer's aborted
        # records are not read: docs/ownership.md).
        if record.value:
            room = Room.FromString(record.value)
            written[(room.room_id, room.version)].add(room.state)

    await read_to_end(kafka, Topics(kafka.topic_prefix).room_state, apply)
    lost = sum(
        1
        for room_id, changes in ledger.acked.items()
        for version, state in changes
        if state not in written.get((room_id, version), set())
    )
    forks = sum(1 for (room_id, _), states in written.items() if room_id in ledger.acked and len(states) > 1)
    return lost, forks


async def check_announced(topology: Topology, ledger: Ledger) -> int:
    """Rooms answered as live (or later ended) that have no room-started event: half-made starts."""
    kafka = KafkaConfig(bootstrap=topology.bootstrap, topic_prefix=topology.topic_prefix)
    announced: set[str] = set()

    def apply(record: Record) -> None:
        if record.value:
            announced.add(RoomStarted.FromString(record.value).room.room_id)

    await read_to_end(kafka, Topics(kafka.topic_prefix).room_started, apply)
    started = {
        room_id
        for room_id, changes in ledger.acked.items()
        if any(state in (RoomState.ROOM_STATE_LIVE, RoomState.ROOM_STATE_ENDED) for _, state in changes)
    }
    return len(started - announced)


async def check_replicas(addresses: list[str], ledger: Ledger) -> int:
    """Replicas (room, process) that hold an older version than the last one acknowledged."""
    stale = 0
    for address in addresses:
        client = user(Endpoints(address, address), 1)
        try:
            for room_id, changes in ledger.acked.items():
                last = max(version for version, _ in changes)
                for _ in range(50):  # a replica follows the topic: give it a moment
                    if (await client.get_room(room_id)).version >= last:
                        break
                    await asyncio.sleep(0.1)
                else:
                    stale += 1
        finally:
            await client.close()
    return stale


def admission_env() -> dict[str, str]:
    """Settings for the admission topology: small leases, so capacity moves between processes; one host
    creates a room every few hundred milliseconds, so no rooms-per-host limit."""
    return {
        "TOWNHALL_ADMISSION_LEASE_MIN": "4",
        "TOWNHALL_ADMISSION_LEASE_MAX": "16",
        "TOWNHALL_ADMISSION_ROOMS_PER_HOST_PER_HOUR": "0",
    }


async def run(topology: Topology, kill: bool) -> Outcome:
    """A run whose unexpected failure (a timeout) becomes a problem of the outcome, not a crash."""
    try:
        return await owner_fault(topology, kill)
    except TimeoutError as exc:
        return Outcome(f"admission-{'kill' if kill else 'sigterm'}", "", problems=[str(exc)])
