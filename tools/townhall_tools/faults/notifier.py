"""Notifier faults: SIGTERM (or kill -9) of a notifier while it works on a follower fan-out.

Two notifiers share the fan-out (one consumer group); the one stopped is not the owner of the
host's graph shard, so the plan is complete and the question is only whether the tasks it was
working on are done by the other one. Offsets are committed after the output is acknowledged,
so nothing is lost; a notification may be written twice and is de-duplicated at the Inbox.
A user connected to the stopped notifier's Inbox sees its stream end cleanly, not an error, and once the
fan-out is done resumes on the other notifier from its cursor: it gets the room it missed, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc

from townhall.client import Client, Endpoints, InboxCursor
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


async def _inbox_ends(client: Client, seen: InboxCursor, got: list[str]) -> str:
    """Holds an Inbox stream open until it ends, noting the rooms of what is new in `got`; how it ended
    ("ok" or the status code)."""
    call = client.notifications()
    try:
        async for note in call:
            if seen.fresh(note):
                got.append(note.room_id)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "ok"


async def _resumed(client: Client, seen: InboxCursor, got: list[str], room: str) -> float:
    """Reconnects with the cursor until the room's notification is among `got`; how long that took."""
    started = time.monotonic()
    call = client.notifications(seen.cursor)
    try:
        async with asyncio.timeout(WAIT_S):
            while room not in got:
                note = await call.read()
                if note is grpc.aio.EOF:
                    break
                if seen.fresh(note):
                    got.append(note.room_id)
    finally:
        call.cancel()
    return time.monotonic() - started


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
    reader = user(Endpoints(endpoints(topology).admission, proc.grpc), followers[-1])
    survivor = next(p for p in notifiers if p is not proc)
    # After the fault the reader resumes on the other notifier, from the last notification it saw.
    again = user(Endpoints(endpoints(topology).admission, survivor.grpc), followers[-1])
    seen, reader_got = InboxCursor(), list[str]()
    small = user(endpoints(topology), fresh_user())
    faulted_proc = False
    try:
        await import_followers(owner, celebrity, followers)
        # A follower connected to the notifier that will be stopped (the last: most likely notified after
        # the fault), with a cursor from a small host's room.
        await import_followers(sharding.owner(f"user:{small.user}", members), small.user, [followers[-1]])
        inbox_stream = asyncio.create_task(_inbox_ends(reader, seen, reader_got))
        warm_up = (await small.create_room("fault: warm-up")).room_id
        await small.start_room(warm_up)
        await until(lambda: warm_up in reader_got, WAIT_S, "the reader's first notification")
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
        before = room in reader_got
        # Back once the fan-out is done: what it missed comes from the topic (notifier/inbox_resume.py).
        resumed_s = await _resumed(again, seen, reader_got, room)
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
            # The reader of the stopped notifier, back on the other one with its cursor: the room once.
            reader_notified=reader_got.count(room),
            reader_notified_on_resume=not before,
            reader_resumed_s=round(resumed_s, 3),
        )
        outcome.expect(
            outcome.figures["reader_notified"] == 1,
            f"the reader resumed on the other notifier was notified {reader_got.count(room)} times, not once",
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
        for client in (host, reader, again, small):
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
