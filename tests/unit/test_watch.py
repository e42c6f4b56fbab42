"""WatchRoom's logic without a network: events between versions, shared bytes, coalescing, slow readers,
bounds; and the listener tallies they count from."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.stage_helpers import live_room
from townhall.admission import stage
from townhall.admission.changes import events
from townhall.admission.presence import Presence
from townhall.admission.rooms import RoomBook
from townhall.admission.tallies import TALLY_EVERY_S, Tallies
from townhall.admission.watch import BANNED, DRAINING, ENDED, WatchHub
from townhall.core.auth import MODERATE, SUBSCRIBE, Principal
from townhall.core.errors import PermissionDenied, ResourceExhausted, Unavailable
from townhall.internal.v1.events_pb2 import PresenceEvent
from townhall.v1.common_pb2 import ROLE_LISTENER, ROLE_SPEAKER, Room, RoomState
from townhall.v1.rooms_pb2 import RoomEvent, RoomUpdate

HOST, FAN, OTHER = 1, 2, 3
K = RoomEvent


def kinds(before: Room, after: Room) -> list[tuple[int, int]]:
    return [(e.kind, e.user_id) for e in events(before, after)]


def test_events_say_what_changed_between_two_versions() -> None:
    room = live_room(HOST, speakers=(OTHER,))
    hand = stage.raise_hand(room, FAN)
    assert kinds(room, hand) == [(K.KIND_HAND_RAISED, FAN)]
    on_stage = stage.invite(hand, HOST, FAN)  # a raised hand invited is on stage at once
    assert kinds(hand, on_stage) == [(K.KIND_ROLE, FAN), (K.KIND_HAND_LOWERED, FAN)]
    assert events(hand, on_stage)[0].role == ROLE_SPEAKER
    banned = stage.remove(on_stage, HOST, OTHER, True, now_ms=5_000, ticket_ttl_ms=60_000)
    assert kinds(on_stage, banned) == [(K.KIND_ROLE, OTHER), (K.KIND_REMOVED, OTHER), (K.KIND_BANNED, OTHER)]
    assert events(on_stage, banned)[0].role == ROLE_LISTENER
    # Two changes seen as one (coalesced): the events of both.
    assert kinds(room, banned)[:2] == [(K.KIND_ROLE, FAN), (K.KIND_ROLE, OTHER)]
    assert kinds(banned, banned) == []


def test_tallies_sum_the_other_processes_latest_counts_and_forget_the_silent() -> None:
    now = [0.0]
    tallies = Tallies("me", ttl_s=15, clock=lambda: now[0])
    tallies.observe("r", "a", 10)
    tallies.observe("r", "b", 5)
    tallies.observe("r", "a", 7)  # a count, not a difference: the latest replaces the last
    tallies.observe("r", "me", 1_000)  # this process counts its own seats exactly
    assert tallies.listeners("r") == 12
    now[0] = 10.0
    tallies.observe("r", "b", 6)
    now[0] = 20.0  # a's tally is 20 s old: it stopped publishing
    assert tallies.listeners("r") == 6
    assert tallies.prune() == 1
    tallies.observe("r", "b", 0)
    assert tallies.listeners("r") == 0 and tallies.prune() == 0


class Recorder:
    def __init__(self) -> None:
        self.events: list[PresenceEvent] = []

    def offer(self, topic: str, key: bytes, value: bytes) -> bool:
        self.events.append(PresenceEvent.FromString(value))
        return True


def test_presence_tallies_changed_rooms_each_flush_and_every_room_again_every_few_seconds() -> None:
    queue, seats, now = Recorder(), {"a": 3, "b": 0}, [0.0]
    presence = Presence(queue, "t", "pod-0", 100, seats=lambda: seats, clock=lambda: now[0])  # type: ignore[arg-type]
    presence.flush()
    assert {(e.room_id, e.listeners) for e in queue.events} == {("a", 3), ("b", 0)}
    assert all(e.kind == PresenceEvent.KIND_TALLY and e.member == "pod-0" for e in queue.events)
    queue.events.clear()
    presence.flush()
    assert queue.events == []  # nothing changed
    seats["a"] = 4
    del seats["b"]
    presence.flush()
    assert [(e.room_id, e.listeners) for e in queue.events] == [("a", 4)]  # b was at 0 already
    queue.events.clear()
    now[0] = TALLY_EVERY_S
    presence.flush()
    assert [(e.room_id, e.listeners) for e in queue.events] == [("a", 4)]  # repeated: a lost one is made good


class Hub:
    """A WatchHub over one live room, its counts from a dict."""

    def __init__(self, room: Room, queue: int = 8, per_user: int = 4, max_streams: int = 100) -> None:
        self.book = RoomBook()
        self.book.apply(room)
        self.room_id = room.room_id
        self.seated = {room.room_id: 0}
        self.hub = WatchHub(
            self.book, self.seated.__getitem__, 0.05, 0.05, max_streams, per_user, queue=queue
        )

    def change(self, room: Room) -> None:
        self.book.apply(room)
        self.hub.changed(room)


def drain(hub: WatchHub, watch: object) -> list[bytes]:
    out = []
    while (data := hub.take(watch)) is not None:  # type: ignore[arg-type]
        out.append(data)
    return out


def who(user: int, *grants: str) -> Principal:
    return Principal(user, frozenset(grants or (SUBSCRIBE,)))


async def test_one_serialisation_for_the_audience_and_the_moderator_sees_more() -> None:
    h = Hub(live_room(HOST))
    hub = h.hub
    a, b = hub.open(h.room_id, who(10)), hub.open(h.room_id, who(11))
    host = hub.open(h.room_id, who(HOST, MODERATE))
    for w in (a, b, host):
        first = RoomUpdate.FromString(drain(hub, w)[0])
        assert first.room.room_id == h.room_id and first.counts.speakers == 1 and not first.events
    h.change(stage.raise_hand(h.book.get(h.room_id), FAN))
    await asyncio.sleep(0.1)
    # Another user's raised hand is not the audience's to see: no update at all for them.
    assert drain(hub, a) == [] and drain(hub, b) == []
    update = RoomUpdate.FromString(drain(hub, host)[0])
    assert [(e.kind, e.user_id) for e in update.events] == [(K.KIND_HAND_RAISED, FAN)]
    assert list(update.room.hand_ids) == [FAN]
    h.change(stage.invite(h.book.get(h.room_id), HOST, FAN))  # the hand approved: the fan is on stage
    await asyncio.sleep(0.1)
    got_a, got_b = drain(hub, a), drain(hub, b)
    assert len(got_a) == 1 and got_a[0] is got_b[0]  # the same bytes object: serialised once
    assert [(e.kind, e.user_id) for e in RoomUpdate.FromString(got_a[0]).events] == [(K.KIND_ROLE, FAN)]


async def test_changes_within_the_interval_arrive_together_and_counts_follow_the_seats() -> None:
    h = Hub(live_room(HOST))
    hub = h.hub
    w = hub.open(h.room_id, who(10))
    drain(hub, w)
    room = h.book.get(h.room_id)
    room = stage.set_role(room, HOST, FAN, ROLE_SPEAKER)
    h.change(room)
    room = stage.set_role(room, HOST, OTHER, ROLE_SPEAKER)
    h.change(room)
    await asyncio.sleep(0.15)
    updates = [RoomUpdate.FromString(d) for d in drain(hub, w)]
    assert len(updates) == 1
    assert [(e.kind, e.user_id) for e in updates[0].events] == [(K.KIND_ROLE, FAN), (K.KIND_ROLE, OTHER)]
    assert updates[0].counts.speakers == 3
    h.seated[h.room_id] = 42
    hub.recount()
    await asyncio.sleep(0.1)
    counts = [RoomUpdate.FromString(d) for d in drain(hub, w)]
    assert len(counts) == 1 and not counts[0].HasField("room") and counts[0].counts.listeners == 42


async def test_a_slow_reader_gets_one_resync_not_a_growing_queue() -> None:
    h = Hub(live_room(HOST), queue=2)
    hub = h.hub
    slow = hub.open(h.room_id, who(10))
    for n in range(1, 6):
        h.seated[h.room_id] = n
        hub.flush(h.room_id)
        assert slow.queued <= 2
    got = [RoomUpdate.FromString(d) for d in drain(hub, slow)]
    assert len(got) == 1 and got[0].resync and got[0].room.room_id == h.room_id
    assert got[0].counts.listeners == 5  # the room as it is now


async def test_streams_are_bounded_per_user_and_per_process_and_a_ban_ends_the_stream() -> None:
    h = Hub(live_room(HOST), per_user=2, max_streams=3)
    hub = h.hub
    hub.open(h.room_id, who(10))
    hub.open(h.room_id, who(10))
    with pytest.raises(ResourceExhausted, match=r"max_watch_streams_per_user"):
        hub.open(h.room_id, who(10))
    heckler = hub.open(h.room_id, who(OTHER))
    with pytest.raises(ResourceExhausted, match=r"\(admission\.max_watch_streams\)"):
        hub.open(h.room_id, who(12))
    hub.close(heckler)
    heckler = hub.open(h.room_id, who(OTHER))
    h.change(stage.remove(h.book.get(h.room_id), HOST, OTHER, True, now_ms=5_000, ticket_ttl_ms=60_000))
    hub.flush(h.room_id)
    assert heckler.reason == BANNED and hub.take(heckler) is None
    with pytest.raises(PermissionDenied):
        hub.open(h.room_id, who(OTHER))


async def test_the_update_that_ends_the_room_is_the_last() -> None:
    h = Hub(live_room(HOST))
    hub = h.hub
    w = hub.open(h.room_id, who(10))
    drain(hub, w)
    h.change(h.book.ended(h.room_id, HOST, now_ms=9_000))
    hub.flush(h.room_id)
    assert w.reason == ENDED
    last = [RoomUpdate.FromString(d) for d in drain(hub, w)]
    assert last[-1].room.state == RoomState.ROOM_STATE_ENDED
    assert [(e.kind, e.state) for e in last[-1].events] == [(K.KIND_STATE, RoomState.ROOM_STATE_ENDED)]


async def test_draining_ends_every_stream_and_refuses_new_ones() -> None:
    h = Hub(live_room(HOST))
    hub = h.hub
    w = hub.open(h.room_id, who(10))
    hub.drain()
    assert w.reason == DRAINING and hub.take(w) is None  # ended at once: the client watches elsewhere
    with pytest.raises(Unavailable, match="watch the room again"):
        hub.open(h.room_id, who(11))
