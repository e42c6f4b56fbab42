"""A Kafka broker restart during a join storm, room changes and a follower fan-out.

Joins are admitted from local state, so they go on while the broker is away; their presence
events wait in a bounded queue and what does not fit is dropped and counted
(townhall_events_dropped_total). Besides the storm (one client, one connection), new users arrive
while the broker is away, each on a connection of its own that takes SLOW_LINK_S to set up (TLS over
a mobile network; a busy admission process): every join must be answered, none UNAVAILABLE. Room
changes wait for Kafka and are answered once it is back (the client tries again while admission says
UNAVAILABLE). The fan-out resumes from its committed offsets. Afterwards: every acknowledged room
change is in the room-state topic and on every replica, and every follower has been notified.

`outage_s` holds the broker down at least that long (its own start, 10-30 s here, comes on top).
What is asserted does not depend on how fast the machine is: the storm never sends the joins it
missed while the test process stalled in a burst (that would test the server's overload shedding,
CANCELLED, instead), and keeps at most MAX_IN_FLIGHT joins in flight; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc

from townhall.client import Client, Endpoints
from townhall.core.config import KafkaConfig
from townhall.core.tasks import cancel
from townhall.v1.admission_pb2 import JoinRequest
from townhall_tools.devtools.fanout import counting_inbox, import_followers
from townhall_tools.devtools.links import slow_handshake
from townhall_tools.devtools.topology import Topology
from townhall_tools.faults.admission import Ledger, change_rooms, check_announced, check_replicas, check_topic
from townhall_tools.faults.cluster import endpoints, fresh_user, metric, user, user_metadata
from townhall_tools.faults.measure import Outcome, until

FOLLOWERS = 1500
JOIN_RATE = 100.0  # joins/s offered to the hot room, open loop
MAX_IN_FLIGHT = 200  # joins of the storm waiting for an answer at once (2 s of it); beyond, skipped
CATCH_UP = 10  # slots of the storm a late sender makes up at once (0.1 s of it); older ones are skipped
HOSTS = 4
WAIT_S = 90.0
# Room changes wait for Kafka: clients here are patient enough to outlast the restart.
PATIENCE_S = 120.0
# New users joining while the broker is away, one every NEWCOMER_EVERY_S from the fault on, each on a
# new connection that takes SLOW_LINK_S to set up.
NEWCOMERS = 40
NEWCOMER_EVERY_S = 0.1
SLOW_LINK_S = 0.3
# Refusals whose details are kept for the report.
KEPT = 10
# The long outage (scenario kafka-outage): the broker held down this long, its own start on top.
LONG_OUTAGE_S = 20.0


def kafka_env() -> dict[str, str]:
    """Small queues (so drops show) and a slow fan-out (so the restart lands in its middle)."""
    return {
        "TOWNHALL_ADMISSION_EVENT_QUEUE": "20",
        # The hosts here never open a stream: host failover would end their rooms 60 s after they
        # started, which a slow run or a long outage reaches (joins would then be refused).
        "TOWNHALL_ADMISSION_HOST_GRACE_S": "0",
        "TOWNHALL_NOTIFIER_TASK_USERS": "10",
        "TOWNHALL_NOTIFIER_WORKER_RATE": "25",
        "TOWNHALL_NOTIFIER_BULK_THRESHOLD": "100",
    }


@dataclass
class Joins:
    """What joins were answered, and the first refusals (when sent, the status and its message)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    refusals: list[tuple[float, str, str]] = field(default_factory=list)
    skipped: int = 0

    async def join(self, client: Client, room_id: str, uid: int) -> None:
        """One user's first Join, as the user sees it (no retry)."""
        sent = time.monotonic()
        try:
            reply = await client.admission.Join(
                JoinRequest(room_id=room_id), metadata=user_metadata(uid), timeout=10
            )
            self.outcomes["granted" if reply.HasField("grant") else "waiting"] += 1
        except grpc.aio.AioRpcError as exc:
            self.outcomes[exc.code().name] += 1
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED and len(self.refusals) < KEPT:
                self.refusals.append((sent, exc.code().name, exc.details() or ""))

    def errors(self) -> dict[str, int]:
        """Answers that are neither an admission, a place in line, nor shedding with a retry-after."""
        fine = ("granted", "waiting", "RESOURCE_EXHAUSTED")
        return {k: v for k, v in self.outcomes.items() if k not in fine}


async def _storm(client: Client, room_id: str, joins: Joins, stop: asyncio.Event) -> None:
    """Joins offered at JOIN_RATE whatever the answers (open loop), each by a new user.

    Slots missed while this process stalled are skipped, not sent in a burst (up to CATCH_UP are made
    up), and so are slots that find MAX_IN_FLIGHT joins unanswered.
    """
    user = fresh_user()
    pending: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    slot = 0
    while not stop.is_set():
        await asyncio.sleep(max(0.0, start + slot / JOIN_RATE - time.monotonic()))
        missed = int((time.monotonic() - start) * JOIN_RATE) - slot - CATCH_UP
        if missed > 0:
            joins.skipped += missed
            slot += missed
        slot += 1
        if len(pending) >= MAX_IN_FLIGHT:
            joins.skipped += 1
            continue
        user += 1
        task = asyncio.create_task(joins.join(client, room_id, user))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)


async def _newcomers(topology: Topology, room_id: str, joins: Joins) -> None:
    """NEWCOMERS users, one every NEWCOMER_EVERY_S, each joining on a new connection that takes
    SLOW_LINK_S to set up, to the admission processes in turn."""
    members = [p.grpc for p in topology.of("admission") if not p.lane]
    notifier = endpoints(topology).notifier
    async with contextlib.AsyncExitStack() as stack:
        links = [await stack.enter_async_context(slow_handshake(m, SLOW_LINK_S)) for m in members]
        tasks = []
        first = fresh_user()
        for index in range(NEWCOMERS):
            newcomer = user(Endpoints(links[index % len(links)], notifier), first + index)
            tasks.append(asyncio.create_task(_once(newcomer, joins.join(newcomer, room_id, newcomer.user))))
            await asyncio.sleep(NEWCOMER_EVERY_S)
        await asyncio.gather(*tasks)


async def _once(client: Client, work: Coroutine[Any, Any, None]) -> None:
    try:
        await work
    finally:
        await client.close()


async def broker_restart(topology: Topology, kill: bool, outage_s: float = 0.0) -> Outcome:
    """One run: the topology's own broker is stopped (or killed), held down `outage_s` at least while
    new users join, and started again, mid-storm."""
    outcome = Outcome(_name(kill, outage_s), _fault(kill, outage_s))
    broker = topology.broker
    assert broker is not None, "the topology must run its own broker"
    kafka = KafkaConfig(bootstrap=topology.bootstrap, topic_prefix=topology.topic_prefix)
    notifier = topology.of("notifier")[0]
    ends = endpoints(topology)
    celebrity = fresh_user()
    followers = list(range(celebrity + 1, celebrity + 1 + FOLLOWERS))
    ledger = Ledger()
    storm_joins, newcomer_joins = Joins(), Joins()
    phases: dict[str, Counter[str]] = {}
    stop = asyncio.Event()
    clients: list[Client] = []
    tasks: list[asyncio.Task[None]] = []
    dropped_before = sum(metric(p, "townhall_events_dropped_total") for p in topology.of("admission"))
    stopped = back = float("inf")
    try:
        await import_followers(notifier.internal, celebrity, followers)
        host = user(ends, celebrity, retry_s=PATIENCE_S)
        hot_host = user(ends, fresh_user())
        storm = user(ends, fresh_user())
        clients += [host, hot_host, storm]
        hot = (await hot_host.create_room("fault: hot")).room_id
        await hot_host.start_room(hot)
        members = sorted(p.grpc for p in topology.of("admission"))
        for index in range(HOSTS):
            client = user(ends, fresh_user(), retry_s=PATIENCE_S)
            clients.append(client)
            tasks.append(
                asyncio.create_task(
                    change_rooms(client, members[index % len(members)], members, ledger, stop)
                )
            )
        tasks.append(asyncio.create_task(_storm(storm, hot, storm_joins, stop)))
        async with counting_inbox(kafka, followers) as inbox:
            room = (await host.create_room("fault: celebrity")).room_id
            await host.start_room(room)
            # Each look walks every follower's queue: a few a second are enough.
            await until(lambda: inbox.delivered(room) >= FOLLOWERS // 10, WAIT_S, "the fan-out starting", 0.1)
            phases["before"] = Counter(storm_joins.outcomes)
            stopped = time.monotonic()
            if kill:
                await asyncio.to_thread(broker.kill)
            else:
                await asyncio.to_thread(broker.stop)
            notified_at_stop = inbox.delivered(room)
            await asyncio.wait_for(_newcomers(topology, hot, newcomer_joins), WAIT_S)
            await asyncio.sleep(max(0.0, stopped + outage_s - time.monotonic()))
            await asyncio.to_thread(broker.start)
            back = time.monotonic()
            phases["outage"] = Counter(storm_joins.outcomes) - phases["before"]
            await until(lambda: inbox.delivered(room) == FOLLOWERS, WAIT_S, "every follower notified", 0.1)
            fanned_out = time.monotonic()
            await until(lambda: any(t > back for t in ledger.answered), WAIT_S, "room changes answered again")
            changes_back = min(t for t in ledger.answered if t > back)
            got = inbox.got(room)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        tasks = []
        phases["after"] = Counter(storm_joins.outcomes) - phases["before"] - phases["outage"]
        lost, forks = await check_topic(kafka, ledger)
        stale = await check_replicas(members, ledger)
        unannounced = await check_announced(topology, ledger)
        dropped = sum(metric(p, "townhall_events_dropped_total") for p in topology.of("admission"))
        join_errors = Counter(storm_joins.errors()) + Counter(newcomer_joins.errors())
        newcomers = newcomer_joins.outcomes
        outcome.figures.update(
            outage_s=round(back - stopped, 3),
            changes_answered_after_s=round(changes_back - back, 3),
            fanout_done_after_s=round(fanned_out - back, 3),
            changes_acked=sum(len(v) for v in ledger.acked.values()),
            lost=lost,
            forks=forks,
            stale_replicas=stale,
            half_made=unannounced,
            followers=FOLLOWERS,
            notified_before_restart=notified_at_stop,
            notifications_lost=FOLLOWERS - sum(1 for c in got.values() if c),
            notified_twice=sum(1 for c in got.values() if c > 1),
            joins=sum(storm_joins.outcomes.values()),
            joins_skipped=storm_joins.skipped,
            joins_admitted_during_outage=phases["outage"]["granted"],
            joins_admitted_after=phases["after"]["granted"],
            newcomers_during_outage=sum(newcomers.values()),
            newcomers_admitted=newcomers["granted"],
            join_errors=sum(join_errors.values()),
            presence_events_dropped=dropped - dropped_before,
            errors=len(ledger.errors),
        )
        outcome.expect(lost == 0, f"{lost} acknowledged room changes are not in the room-state topic")
        outcome.expect(forks == 0, f"{forks} room versions were written twice with different contents")
        outcome.expect(stale == 0, f"{stale} replicas miss an acknowledged change")
        outcome.expect(unannounced == 0, f"{unannounced} started rooms were never announced")
        outcome.expect(outcome.figures["notifications_lost"] == 0, "followers were not notified")
        outcome.expect(phases["outage"]["granted"] > 0, "no join was admitted while the broker was away")
        outcome.expect(newcomers["granted"] > 0, "no new user was admitted while the broker was away")
        first = _refusals(storm_joins, newcomer_joins, stopped, back)
        outcome.expect(not join_errors, f"joins failed: {dict(join_errors)}; first: {first}")
        outcome.expect(not ledger.errors, f"clients saw errors: {ledger.errors[:3]}")
    finally:
        stop.set()
        await cancel(*tasks)
        for client in clients:
            await client.close()
        if broker.process is None or broker.process.poll() is not None:
            await asyncio.to_thread(broker.start)
    return outcome


def _refusals(storm: Joins, newcomers: Joins, stopped: float, back: float) -> list[str]:
    """The kept refusals, saying who was refused and when (relative to the fault)."""

    def when(at: float) -> str:
        return "before the fault" if at < stopped else "with the broker away" if at < back else "after it"

    return [
        f"{who} {when(at)}: {code} {details}"
        for who, joins in (("storm", storm), ("newcomer", newcomers))
        for at, code, details in joins.refusals
    ]


def _name(kill: bool, outage_s: float) -> str:
    return "kafka-outage" if outage_s else f"kafka-{'kill' if kill else 'restart'}"


def _fault(kill: bool, outage_s: float) -> str:
    held = f", held down {outage_s:g} s," if outage_s else ""
    return f"Kafka broker {'kill -9' if kill else 'clean stop'}{held} and start"


async def run(topology: Topology, kill: bool, outage_s: float = 0.0) -> Outcome:
    """A run whose unexpected failure (a timeout) becomes a problem of the outcome, not a crash."""
    try:
        return await broker_restart(topology, kill, outage_s)
    except TimeoutError as exc:
        return Outcome(_name(kill, outage_s), _fault(kill, outage_s), problems=[str(exc)])
