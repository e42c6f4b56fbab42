"""Notifier faults: SIGTERM (or kill -9) of a notifier while it works on a follower fan-out.

Two notifiers share the fan-out (one consumer group); the one stopped is not the owner of the
host's graph shard, so the plan is complete and the question is only whether the tasks it was
working on are done by the other one. Offsets are committed after the output is acknowledged,
so nothing is lost; a notification may be written twice and is de-duplicated at the Inbox.
A user connected to the stopped notifier's Inbox sees its stream end cleanly, not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc

from townhall.client import Client, Endpoints
from townhall.core import sharding
from townhall.core.config import KafkaConfig
from townhall_tools.devtools.fanout import counting_inbox, import_followers
from townhall_tools.devtools.topology import Process, Topology
from townhall_tools.faults.cluster import endpoints, exited, fault, fresh_user, restore, user
from townhall_tools.faults.measure import Outcome, Progress, until

FOLLOWERS = 1500
WAIT_S = 90.0


def notifier_env() -> dict[str, str]:
    """A slow fan-out of small tasks, so the fault lands in its middle."""
    return {
        "TOWNHALL_NOTIFIER_TASK_USERS": "10",
        "TOWNHALL_NOTIFIER_WORKER_RATE": "10",
        "TOWNHALL_NOTIFIER_BULK_THRESHOLD": "100",
        "TOWNHALL_NOTIFIER_WORKER_TASKS": "4",
    }


async def _inbox_ends(client: Client) -> str:
    """Holds an Inbox stream open until it ends; how it ended ("ok" or the status code)."""
    call = client.notifications()
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "ok"


async def notifier_fault(topology: Topology, kill: bool) -> Outcome:
    """One run: the notifier that does not own the host's graph is stopped mid-fan-out."""
    how = "kill -9" if kill else "SIGTERM"
    outcome = Outcome(f"notifier-{'kill' if kill else 'sigterm'}", f"{how} of a notifier mid-fan-out")
    kafka = KafkaConfig(bootstrap=topology.bootstrap, topic_prefix=topology.topic_prefix)
    notifiers = topology.of("notifier")
    # Notifiers know each other by their internal addresses: the graph is sharded over those.
    members = sorted(p.internal for p in notifiers)
    celebrity = fresh_user()
    owner = sharding.owner(f"user:{celebrity}", members)
    proc: Process = next(p for p in notifiers if p.internal != owner)
    followers = list(range(celebrity + 1, celebrity + 1 + FOLLOWERS))
    host = user(endpoints(topology), celebrity)
    reader = user(Endpoints(endpoints(topology).admission, proc.grpc), followers[0])
    faulted_proc = False
    try:
        await import_followers(owner, celebrity, followers)
        # A follower connected to the notifier that will be stopped.
        inbox_stream = asyncio.create_task(_inbox_ends(reader))
        async with counting_inbox(kafka, followers) as inbox:
            room = (await host.create_room("fault: notifier")).room_id
            await host.start_room(room)
            await until(lambda: inbox.delivered(room) >= FOLLOWERS // 5, WAIT_S, "the fan-out starting")
            with Progress(lambda: inbox.delivered(room)) as progress:
                faulted = time.monotonic()
                notified_at_fault = inbox.delivered(room)
                fault(topology, proc, kill)
                faulted_proc = True
                await until(lambda: inbox.delivered(room) == FOLLOWERS, WAIT_S, "every follower notified")
                done = time.monotonic()
            await asyncio.sleep(1.0)  # replays still on their way count as duplicates, not as news
            got = inbox.got(room)
        ended = await asyncio.wait_for(inbox_stream, 30)
        if not kill:
            status = await exited(proc)
            outcome.expect(status == 0, f"the stopped notifier exited with {status}")
        outcome.figures.update(
            followers=FOLLOWERS,
            notified_at_fault=notified_at_fault,
            fanout_done_after_s=round(done - faulted, 3),
            # The longest the fan-out stood still: the other notifier taking the work over.
            stall_s=progress.longest_stall(faulted, done),
            notifications_lost=FOLLOWERS - sum(1 for c in got.values() if c),
            notified_twice=sum(1 for c in got.values() if c > 1),
        )
        outcome.expect(outcome.figures["notifications_lost"] == 0, "followers were not notified")
        outcome.expect(
            outcome.figures["notified_twice"] == 0,
            "a follower was notified twice at one Inbox (de-duplication)",
        )
        if not kill:
            outcome.expect(ended == "ok", f"the Inbox stream of the stopped notifier ended with {ended}")
        outcome.figures["errors"] = 0 if kill or ended == "ok" else 1
    finally:
        for client in (host, reader):
            with contextlib.suppress(Exception):
                await client.close()
        if faulted_proc:
            outcome.figures["restore_s"] = round(await restore(topology, proc), 3)
    return outcome


async def run(topology: Topology, kill: bool) -> Outcome:
    """A run whose unexpected failure (a timeout) becomes a problem of the outcome, not a crash."""
    try:
        return await notifier_fault(topology, kill)
    except TimeoutError as exc:
        return Outcome(f"notifier-{'kill' if kill else 'sigterm'}", "", problems=[str(exc)])
