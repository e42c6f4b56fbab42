"""WatchRoom and live counts across two admission processes on a real broker (docs/live-state.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from tests.integration.helpers import client
from tests.integration.test_admission_cluster import Cluster, live_room, user
from tests.integration.test_moderation import figures
from townhall.admission.tallies import TALLY_EVERY_S, TALLY_TTL_S
from townhall.client import Client
from townhall.core.auth import SUBSCRIBE
from townhall.core.config import KafkaConfig
from townhall.v1.common_pb2 import ROLE_SPEAKER, RoomState
from townhall.v1.rooms_pb2 import RoomEvent, RoomUpdate

pytestmark = pytest.mark.kafka
# Presence flush (0.1 s) + Kafka + the watch interval (0.25 s), with room for a busy machine.
WITHIN_S = 15.0


@pytest.fixture(scope="module")
def cluster(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cl = Cluster(kafka, tmp_path_factory.mktemp("watch-cluster"), 2)
    try:
        for proc in cl.processes:
            cl.start(proc)
        yield cl
    finally:
        for proc in cl.processes:
            cl.stop(proc)


class Watching:
    """A WatchRoom stream read in the background: every update it got, in order."""

    def __init__(self, c: Client, room_id: str) -> None:
        self.call = c.watch_room(room_id)
        self.updates: list[RoomUpdate] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.ended = False
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for update in self.call:
                self.updates.append(update)
            self.ended = True
        except grpc.aio.AioRpcError as exc:
            self.error = exc

    def events(self) -> list[tuple[int, int]]:
        return [(e.kind, e.user_id) for u in self.updates for e in u.events]

    async def until(self, check: Callable[[Watching], Any], what: str) -> None:
        deadline = time.monotonic() + WITHIN_S
        while not check(self):
            assert time.monotonic() < deadline, f"not seen in {WITHIN_S} s: {what}; got {self.updates}"
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def listeners(w: Watching) -> int:
    return w.updates[-1].counts.listeners if w.updates else -1


async def test_counts_follow_listeners_joining_and_leaving_on_either_process(cluster: Cluster) -> None:
    host = user()
    room_id = await live_room(cluster, host)
    watcher = Watching(client(cluster.addresses[1], user(), grants=(SUBSCRIBE,)), room_id)
    try:
        await watcher.until(lambda w: w.updates, "the first update")
        first = watcher.updates[0]
        assert first.room.room_id == room_id and first.room.state == RoomState.ROOM_STATE_LIVE
        assert first.counts.speakers == 1 and first.counts.listeners == 0
        crowd = [client(cluster.addresses[i % 2], user(), grants=(SUBSCRIBE,)) for i in range(6)]
        for c in crowd:
            await c.join(room_id)
        joined = time.monotonic()
        # Three seated through each process: this process counts its own, the other's from its tallies.
        await watcher.until(lambda w: listeners(w) == 6, "6 listeners")
        seen_joins = time.monotonic() - joined
        for c in crowd[:3]:  # two of process 0's, one of process 1's
            await c.leave(room_id)
        left = time.monotonic()
        await watcher.until(lambda w: listeners(w) == 3, "3 listeners after 3 left")
        # Recorded, not asserted (a busy machine): the stated bound is the presence flush (0.1 s) plus
        # Kafka's delivery, plus up to admission.watch_counts_s (1 s) before the watcher's next update.
        figures(
            "watch_counts",
            {
                "joins_seen_after_s": round(seen_joins, 3),
                "leaves_seen_after_s": round(time.monotonic() - left, 3),
            },
        )
        # Every process comes to the same count, each within the bound (a process sees the other's leaves
        # at that one's next tally, once a second): the one watched got there first.
        for address in cluster.addresses:
            reader = client(address, user())
            deadline = time.monotonic() + WITHIN_S
            while (counted := (await reader.get_room(room_id)).counts.listeners) != 3:
                assert time.monotonic() < deadline, f"{address} counts {counted} listeners, not 3"
                await asyncio.sleep(0.05)
            listed = [r for r in await reader.live_rooms() if r.room_id == room_id]
            assert listed[0].counts.listeners == 3 and listed[0].counts.speakers == 1
            await reader.close()
        for c in crowd:
            await c.close()
    finally:
        await watcher.close()


async def test_a_watcher_sees_the_stage_hands_and_bans_as_they_happen(cluster: Cluster) -> None:
    host_id = user()
    room_id = await live_room(cluster, host_id)
    host = client(cluster.addresses[1], host_id)
    fan = client(cluster.addresses[0], user())
    heckler = client(cluster.addresses[0], user(), grants=(SUBSCRIBE,))
    audience = client(cluster.addresses[0], user(), grants=(SUBSCRIBE,))
    # The host watches on one process, the audience and the heckler on the other.
    moderator, public, banned = (
        Watching(host, room_id),
        Watching(audience, room_id),
        Watching(heckler, room_id),
    )
    try:
        for w in (moderator, public, banned):
            await w.until(lambda w: w.updates, "the first update")
        await fan.raise_hand(room_id)
        await moderator.until(
            lambda w: (RoomEvent.KIND_HAND_RAISED, fan.user) in w.events(), "the fan's raised hand"
        )
        await host.invite(room_id, fan.user)  # a raised hand invited is on stage at once
        for w in (moderator, public):
            await w.until(
                lambda w: any(
                    e.kind == RoomEvent.KIND_ROLE and e.user_id == fan.user and e.role == ROLE_SPEAKER
                    for u in w.updates
                    for e in u.events
                ),
                "the fan promoted to speaker",
            )
        await moderator.until(lambda w: w.updates[-1].counts.speakers == 2, "2 on stage")
        # The audience never saw the hand: other users' raised hands are the moderators' to see.
        assert (RoomEvent.KIND_HAND_RAISED, fan.user) not in public.events()
        assert fan.user in public.updates[-1].room.speaker_ids
        await host.remove(room_id, heckler.user, ban=True)
        await moderator.until(lambda w: (RoomEvent.KIND_BANNED, heckler.user) in w.events(), "the ban")
        await banned.until(lambda w: w.error is not None, "the banned user's stream ended")
        assert banned.error is not None and banned.error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert all(kind != RoomEvent.KIND_BANNED for kind, _ in public.events()), "bans: moderators only"
        await host.end_room(room_id)
        await public.until(lambda w: w.ended, "the stream ends with the room")
        assert (RoomEvent.KIND_STATE, 0) in public.events()
        assert public.updates[-1].room.state == RoomState.ROOM_STATE_ENDED
    finally:
        for w in (moderator, public, banned):
            await w.close()
        for c in (host, fan, heckler, audience):
            await c.close()


async def test_the_seats_of_a_process_that_died_drop_out_of_the_count(cluster: Cluster) -> None:
    """Stated bound: a dead process's seats stay counted until its last tally is TALLY_TTL_S (15 s) old."""
    room_id = await live_room(cluster, user())
    watcher = Watching(client(cluster.addresses[1], user(), grants=(SUBSCRIBE,)), room_id)
    doomed = cluster.processes[0]
    crowd = [client(cluster.addresses[0], user(), grants=(SUBSCRIBE,)) for _ in range(2)]
    try:
        for c in crowd:
            await c.join(room_id)
        await watcher.until(lambda w: listeners(w) == 2, "the other process's 2 listeners")
        assert doomed.popen is not None
        doomed.popen.kill()
        doomed.popen.wait(10)
        killed = time.monotonic()
        deadline = killed + TALLY_TTL_S + WITHIN_S
        while listeners(watcher) != 0:
            assert time.monotonic() < deadline, f"still counted: {watcher.updates[-1]}"
            await asyncio.sleep(0.2)
        gone_after = time.monotonic() - killed
        # Its last tally came at most TALLY_EVERY_S before the kill: it drops out 10..15 s after it.
        assert gone_after >= TALLY_TTL_S - TALLY_EVERY_S - 1, "dropped before its tallies were stale"
        figures("watch_dead_process", {"seats_dropped_after_s": round(gone_after, 1)})
    finally:
        for c in crowd:
            await c.close()
        await watcher.close()
        if doomed.popen is not None and doomed.popen.poll() is not None:
            cluster.start(doomed)
