"""Presence batching: joins become one record per room, kind and role; a full buffer drops and counts."""

from __future__ import annotations

from townhall.admission.presence import MAX_BATCH, Presence
from townhall.core.kafka import EVENTS_DROPPED
from townhall.internal.v1.events_pb2 import PresenceEvent
from townhall.v1.common_pb2 import Role

JOIN, LEAVE = PresenceEvent.KIND_JOIN, PresenceEvent.KIND_LEAVE


class Recorder:
    """Stands in for the EventQueue: keeps what it is offered."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, PresenceEvent]] = []

    def offer(self, topic: str, key: bytes, value: bytes) -> bool:
        self.records.append((topic, key, PresenceEvent.FromString(value)))
        return True


def test_joins_of_a_room_become_one_record_per_kind_and_role() -> None:
    queue = Recorder()
    presence = Presence(queue, "t.presence", "pod-0", capacity=100)  # type: ignore[arg-type]
    for user in (11, 12, 13):
        presence.record(JOIN, "hot", user, Role.ROLE_LISTENER)
    presence.record(JOIN, "hot", 1, Role.ROLE_HOST)
    presence.record(LEAVE, "hot", 12, Role.ROLE_UNSPECIFIED)
    presence.record(JOIN, "cold", 21, Role.ROLE_LISTENER)
    assert presence.flush() == 4
    by_key = {(e.room_id, e.kind, e.role): (key, list(e.user_ids), e.member) for _, key, e in queue.records}
    assert by_key[("hot", JOIN, Role.ROLE_LISTENER)] == (b"hot", [11, 12, 13], "pod-0")
    assert by_key[("hot", JOIN, Role.ROLE_HOST)][1] == [1]
    assert by_key[("hot", LEAVE, Role.ROLE_UNSPECIFIED)][1] == [12]
    assert by_key[("cold", JOIN, Role.ROLE_LISTENER)][:2] == (b"cold", [21])
    assert presence.flush() == 0  # nothing is sent twice


def test_a_large_batch_is_split_and_a_full_buffer_drops_and_counts() -> None:
    queue = Recorder()
    presence = Presence(queue, "t.presence", "pod-0", capacity=MAX_BATCH + 10)  # type: ignore[arg-type]
    dropped = EVENTS_DROPPED.labels("t.presence")._value.get()
    for user in range(1, MAX_BATCH + 21):
        presence.record(JOIN, "hot", user, Role.ROLE_LISTENER)
    assert EVENTS_DROPPED.labels("t.presence")._value.get() - dropped == 10
    presence.flush()
    sizes = [len(e.user_ids) for _, _, e in queue.records]
    assert sizes == [MAX_BATCH, 10]
    users = [u for _, _, e in queue.records for u in e.user_ids]
    assert users == list(range(1, MAX_BATCH + 11))  # the first ones kept, in order


def test_a_listeners_leave_is_one_record_per_relay_with_when_each_user_left() -> None:
    queue = Recorder()
    presence = Presence(queue, "t.presence", "pod-0", capacity=4)  # type: ignore[arg-type]
    presence.left("hot", 12, ["relay-a:1", "relay-b:1"], 1_000)
    presence.left("hot", 13, ["relay-a:1"], 1_007)
    presence.record(LEAVE, "hot", 14, Role.ROLE_UNSPECIFIED)  # not a listener here: no seat, no relay
    assert not presence.room_for(1), "a leave that gives a seat back is refused, never dropped"
    assert presence.flush() == 3
    by_relay = {e.relay: (list(e.user_ids), list(e.left_at_ms), e.role) for _, _, e in queue.records}
    assert by_relay == {
        "relay-a:1": ([12, 13], [1_000, 1_007], Role.ROLE_LISTENER),
        "relay-b:1": ([12], [1_000], Role.ROLE_LISTENER),
        "": ([14], [], Role.ROLE_UNSPECIFIED),
    }
    assert presence.room_for(4)


def test_the_periodic_flush_sends_leaves_at_once_and_joins_and_tallies_once_a_batch_interval() -> None:
    """Leaves void tickets on the relays, so they go at the next 100 ms tick; joins and tallies, which
    every admission process and relay reads, go once per batch interval, a record per room and kind."""
    queue, now, seats = Recorder(), [0.0], {"hot": 1}
    presence = Presence(
        queue,  # type: ignore[arg-type]
        "t.presence",
        "pod-0",
        capacity=100,
        seats=lambda: seats,
        clock=lambda: now[0],
        batch_s=1.0,
    )
    for step in range(1, 10):  # joins arriving over 0.9 s, a tick every 0.1 s
        now[0] = step / 10
        presence.record(JOIN, "hot", step, Role.ROLE_LISTENER)
        presence.tick()
    presence.left("hot", 1, ["relay-a:1"], 1_000)
    assert presence.tick() == 1
    assert [(e.kind, list(e.user_ids)) for _, _, e in queue.records] == [(LEAVE, [1])]
    assert presence.room_for(91) and not presence.room_for(92)  # the leave went; nine joins wait
    now[0] = 1.0
    presence.tick()
    kinds = [(e.kind, list(e.user_ids), e.listeners) for _, _, e in queue.records[1:]]
    assert kinds == [(JOIN, list(range(1, 10)), 0), (PresenceEvent.KIND_TALLY, [], 1)]
    assert presence.tick() == 0 and presence.room_for(100)
