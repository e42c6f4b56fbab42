"""A Kafka broker restart during a join storm, room changes and a follower fan-out.

Joins are admitted from local state, so they go on while the broker is away; their presence
events wait in a bounded queue and what does not fit is dropped and counted
(townhall_events_dropped_total). Room changes wait for Kafka and are answered once it is back
(the client tries again while admission says UNAVAILABLE). The fan-out resumes from its
committed offsets. Afterwards: every acknowledged room change is in the room-state topic and on
every replica, and every follower has been notified.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc

from townhall.client import Client
from townhall.core.config import KafkaConfig
from townhall.core.tasks import cancel
from townhall.devtools.fanout import counting_inbox, import_followers
from townhall.devtools.topology import Topology
from townhall.faults.admission import Ledger, change_rooms, check_announced, check_replicas, check_topic
from townhall.faults.cluster import endpoints, fresh_user, metric, user, user_metadata
from townhall.faults.measure import Outcome, until
from townhall.v1.admission_pb2 import JoinRequest

FOLLOWERS = 1500
JOIN_RATE = 100.0  # joins/s offered to the hot room, open loop
HOSTS = 4
WAIT_S = 90.0
# Room changes wait for Kafka: clients here are patient enough to outlast the restart.
PATIENCE_S = 120.0


def kafka_env() -> dict[str, str]:
    """Small queues (so drops show) and a slow fan-out (so the restart lands in its middle)."""
    return {
        "TOWNHALL_ADMISSION_EVENT_QUEUE": "20",
        "TOWNHALL_NOTIFIER_TASK_USERS": "10",
        "TOWNHALL_NOTIFIER_WORKER_RATE": "25",
        "TOWNHALL_NOTIFIER_BULK_THRESHOLD": "100",
    }


async def _storm(client: Client, room_id: str, outcomes: Counter[str], stop: asyncio.Event) -> None:
    """Joins offered at JOIN_RATE whatever the answers (open loop), each by a new user."""
    request = JoinRequest(room_id=room_id)
    user = fresh_user()
    pending: set[asyncio.Task[None]] = set()

    async def one(uid: int) -> None:
        try:
            reply = await client.admission.Join(request, metadata=user_metadata(uid), timeout=10)
            outcomes["granted" if reply.HasField("grant") else "waiting"] += 1
        except grpc.aio.AioRpcError as exc:
            outcomes[exc.code().name] += 1

    start = time.monotonic()
    sent = 0
    while not stop.is_set():
        due = start + sent / JOIN_RATE - time.monotonic()
        if due > 0:
            await asyncio.sleep(due)
        user += 1
        sent += 1
        task = asyncio.create_task(one(user))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)


async def broker_restart(topology: Topology, kill: bool) -> Outcome:
    """One run: the topology's own broker is stopped (or killed) and started again mid-storm."""
    how = "kill -9" if kill else "clean stop"
    outcome = Outcome(f"kafka-{'kill' if kill else 'restart'}", f"Kafka broker {how} and start")
    broker = topology.broker
    assert broker is not None, "the topology must run its own broker"
    kafka = KafkaConfig(bootstrap=topology.bootstrap, topic_prefix=topology.topic_prefix)
    notifier = topology.of("notifier")[0]
    ends = endpoints(topology)
    celebrity = fresh_user()
    followers = list(range(celebrity + 1, celebrity + 1 + FOLLOWERS))
    ledger = Ledger()
    outcomes: Counter[str] = Counter()
    phases: dict[str, Counter[str]] = {}
    stop = asyncio.Event()
    clients: list[Client] = []
    tasks: list[asyncio.Task[None]] = []
    dropped_before = sum(metric(p, "townhall_events_dropped_total") for p in topology.of("admission"))
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
            client = user(ends, fresh_user())
            clients.append(client)
            tasks.append(
                asyncio.create_task(
                    change_rooms(client, members[index % len(members)], members, ledger, stop)
                )
            )
        tasks.append(asyncio.create_task(_storm(storm, hot, outcomes, stop)))
        async with counting_inbox(kafka, followers) as inbox:
            room = (await host.create_room("fault: celebrity")).room_id
            await host.start_room(room)
            await until(lambda: inbox.delivered(room) >= FOLLOWERS // 10, WAIT_S, "the fan-out starting")
            phases["before"] = Counter(outcomes)
            stopped = time.monotonic()
            if kill:
                await asyncio.to_thread(broker.kill)
            else:
                await asyncio.to_thread(broker.stop)
            notified_at_stop = inbox.delivered(room)
            await asyncio.to_thread(broker.start)
            back = time.monotonic()
            phases["outage"] = Counter(outcomes) - phases["before"]
            await until(lambda: inbox.delivered(room) == FOLLOWERS, WAIT_S, "every follower notified")
            fanned_out = time.monotonic()
            await until(lambda: any(t > back for t in ledger.answered), WAIT_S, "room changes answered again")
            changes_back = min(t for t in ledger.answered if t > back)
            got = inbox.got(room)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        tasks = []
        phases["after"] = Counter(outcomes) - phases["before"] - phases["outage"]
        lost, forks = await check_topic(topology, ledger)
        stale = await check_replicas(members, ledger)
        unannounced = await check_announced(topology, ledger)
        dropped = sum(metric(p, "townhall_events_dropped_total") for p in topology.of("admission"))
        join_errors = {
            k: v for k, v in outcomes.items() if k not in ("granted", "waiting", "RESOURCE_EXHAUSTED")
        }
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
            joins=sum(outcomes.values()),
            joins_admitted_during_outage=phases["outage"]["granted"],
            joins_admitted_after=phases["after"]["granted"],
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
        outcome.expect(not join_errors, f"joins failed: {join_errors}")
        outcome.expect(not ledger.errors, f"clients saw errors: {ledger.errors[:3]}")
    finally:
        stop.set()
        await cancel(*tasks)
        for client in clients:
            await client.close()
        if broker.process is None or broker.process.poll() is not None:
            await asyncio.to_thread(broker.start)
    return outcome


async def run(topology: Topology, kill: bool) -> Outcome:
    """A run whose unexpected failure (a timeout) becomes a problem of the outcome, not a crash."""
    try:
        return await broker_restart(topology, kill)
    except TimeoutError as exc:
        return Outcome(f"kafka-{'kill' if kill else 'restart'}", "", problems=[str(exc)])
