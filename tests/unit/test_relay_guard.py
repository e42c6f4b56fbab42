"""The relay's Guard (relay/guard.py): which streams a room version ends, and which it refuses to open."""

from __future__ import annotations

import grpc
import pytest

from tests.unit import stage_helpers
from townhall.admission import stage
from townhall.core.errors import TownhallError
from townhall.core.tickets import Ticket
from townhall.relay.guard import BANNED, DEMOTED, ENDED, LISTEN, PUBLISH, REMOVED, STAGE, Guard, Watch
from townhall.v1.common_pb2 import ROLE_COHOST, ROLE_HOST, ROLE_LISTENER, ROLE_SPEAKER, Room

HOST, COHOST, SPEAKER, LISTENER = 1, 2, 3, 10
NOW, TTL_MS = 10_000_000, 3_600_000


def live_room() -> Room:
    return stage_helpers.live_room(HOST, (COHOST,), (SPEAKER,))


def ticket(room: Room, user: int, role: int, version: int | None = None) -> Ticket:
    return Ticket(room.room_id, user, role, "relay:1", 0, (), room.version if version is None else version)


def cut_log(guard: Guard, room: Room) -> list[tuple[int, str, str]]:
    return sorted((w.user_id, w.kind, reason) for w, reason in guard.apply(room))


def opened(guard: Guard, t: Ticket, kind: str) -> tuple[Watch, list[bool]]:
    cuts: list[bool] = []
    watch = guard.admit(t, kind)
    watch.on_cut = lambda: cuts.append(True)
    return watch, cuts


def test_a_removal_ends_the_users_streams_here_and_no_one_elses() -> None:
    guard, room = Guard(), live_room()
    guard.apply(room)
    listener, listener_cuts = opened(guard, ticket(room, LISTENER, ROLE_LISTENER), LISTEN)
    speaker, _ = opened(guard, ticket(room, SPEAKER, ROLE_SPEAKER), PUBLISH)
    other, _ = opened(guard, ticket(room, 11, ROLE_LISTENER), LISTEN)
    removed = stage.remove(room, HOST, LISTENER, False, NOW, TTL_MS)
    assert cut_log(guard, removed) == [(LISTENER, LISTEN, REMOVED)]
    assert listener_cuts == [True] and listener.error is not None
    assert listener.error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "was removed from room" in str(listener.error) and "join the room again" in str(listener.error)
    assert speaker.error is None and other.error is None
    # The same version read again (a replay, another partition's order) cuts nothing more.
    assert guard.apply(removed) == [] and guard.apply(room) == []


def test_a_removed_user_old_ticket_is_refused_and_a_new_one_is_not() -> None:
    guard, room = Guard(), live_room()
    old = ticket(room, LISTENER, ROLE_LISTENER)
    removed = stage.remove(room, HOST, LISTENER, False, NOW, TTL_MS)
    guard.apply(removed)
    with pytest.raises(TownhallError, match="was removed"):
        guard.admit(old, LISTEN)
    assert guard.admit(ticket(removed, LISTENER, ROLE_LISTENER), LISTEN).error is None


def test_a_banned_user_is_refused_with_any_ticket_until_unbanned_and_rejoined() -> None:
    guard, room = Guard(), live_room()
    old = ticket(room, LISTENER, ROLE_LISTENER)
    guard.apply(room)
    guard.admit(old, LISTEN)
    banned = stage.remove(room, COHOST, LISTENER, True, NOW, TTL_MS)
    assert cut_log(guard, banned) == [(LISTENER, LISTEN, BANNED)]
    for t in (old, ticket(banned, LISTENER, ROLE_LISTENER)):
        with pytest.raises(TownhallError, match=f"user {LISTENER} is banned") as error:
            guard.admit(t, LISTEN)
        assert error.value.code == grpc.StatusCode.PERMISSION_DENIED
    unbanned = stage.unban(banned, HOST, LISTENER)
    guard.apply(unbanned)
    with pytest.raises(TownhallError, match="was removed"):
        guard.admit(old, LISTEN)
    assert guard.admit(ticket(unbanned, LISTENER, ROLE_LISTENER), LISTEN).error is None


def test_a_demoted_speaker_loses_publishing_and_the_stage_feed_but_may_still_listen() -> None:
    guard, room = Guard(), live_room()
    guard.apply(room)
    stage_ticket = ticket(room, SPEAKER, ROLE_SPEAKER)
    publishing, _ = opened(guard, stage_ticket, PUBLISH)
    hearing, _ = opened(guard, stage_ticket, STAGE)
    listening, _ = opened(guard, stage_ticket, LISTEN)  # a stage ticket on an edge listens as audience
    demoted = stage.set_role(room, COHOST, SPEAKER, ROLE_LISTENER)
    assert cut_log(guard, demoted) == [(SPEAKER, PUBLISH, DEMOTED), (SPEAKER, STAGE, DEMOTED)]
    assert publishing.error is not None and "no longer on the stage" in str(publishing.error)
    assert hearing.error is not None and listening.error is None
    with pytest.raises(TownhallError, match="no longer on the stage"):
        guard.admit(stage_ticket, PUBLISH)
    # Promoted again: the same stage ticket publishes.
    guard.apply(stage.set_role(demoted, HOST, SPEAKER, ROLE_SPEAKER))
    assert guard.admit(stage_ticket, PUBLISH).error is None


def test_mute_is_a_flag_the_publisher_reads_per_frame() -> None:
    guard, room = Guard(), live_room()
    guard.apply(room)
    publishing, cuts = opened(guard, ticket(room, SPEAKER, ROLE_SPEAKER), PUBLISH)
    other, _ = opened(guard, ticket(room, COHOST, ROLE_COHOST), PUBLISH)
    muted = stage.mute(room, HOST, SPEAKER, True)
    assert guard.apply(muted) == [] and cuts == []
    assert publishing.muted and not other.muted
    assert guard.admit(ticket(muted, SPEAKER, ROLE_SPEAKER), PUBLISH).muted, "a new stream starts muted"
    guard.apply(stage.mute(muted, HOST, SPEAKER, False))
    assert not publishing.muted


def test_an_ended_room_ends_every_stream_with_failed_precondition() -> None:
    guard, room = Guard(), live_room()
    guard.apply(room)
    watches = [
        opened(guard, ticket(room, HOST, ROLE_HOST), PUBLISH)[0],
        opened(guard, ticket(room, LISTENER, ROLE_LISTENER), LISTEN)[0],
    ]
    ended = stage.abandoned(room, NOW)
    assert [reason for _, reason in guard.apply(ended)] == [ENDED, ENDED]
    for watch in watches:
        assert watch.error is not None and watch.error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "has ended" in str(watch.error)
    with pytest.raises(TownhallError, match="has ended"):
        guard.admit(ticket(ended, LISTENER, ROLE_LISTENER, version=ended.version + 5), LISTEN)


def test_a_ticket_newer_than_the_relays_copy_is_trusted_until_the_copy_catches_up() -> None:
    guard, room = Guard(), live_room()
    guard.apply(room)
    raised = stage.raise_hand(room, LISTENER)
    promoted = stage.invite(raised, HOST, LISTENER)  # the relay has not read this version yet
    fresh = ticket(promoted, LISTENER, ROLE_SPEAKER)
    publishing = guard.admit(fresh, PUBLISH)
    assert publishing.error is None
    assert guard.apply(raised) == [], "an older version than the ticket's does not judge it"
    assert guard.apply(promoted) == []
    assert cut_log(guard, stage.set_role(promoted, HOST, LISTENER, ROLE_LISTENER)) == [
        (LISTENER, PUBLISH, DEMOTED)
    ]


def test_a_room_the_relay_has_not_read_lets_valid_tickets_through() -> None:
    guard, room = Guard(), live_room()
    watch = guard.admit(ticket(room, LISTENER, ROLE_LISTENER), LISTEN)
    assert watch.error is None and guard.streams(room.room_id) == 1
    guard.release(watch)
    assert guard.streams(room.room_id) == 0
    guard.release(watch)  # twice is harmless


def test_leads_are_reported_per_room_from_the_rules_or_else_from_the_tickets() -> None:
    guard, room = Guard(), live_room()
    unread = Room(room_id="unread", host_id=50, version=1)
    for t, kind in (
        (ticket(room, HOST, ROLE_HOST), PUBLISH),
        (ticket(room, SPEAKER, ROLE_SPEAKER), PUBLISH),
        (ticket(room, LISTENER, ROLE_LISTENER), LISTEN),
        (ticket(unread, 50, ROLE_HOST), STAGE),
        (ticket(unread, 51, ROLE_LISTENER), LISTEN),
    ):
        guard.admit(t, kind)
    guard.apply(room)
    assert guard.leads() == {room.room_id: [HOST], "unread": [50]}
    # After a hand-over the old host is a co-host, still a lead; a listener made co-host is one too.
    handed = stage.hand_over(room, COHOST)
    guard.apply(stage.set_role(handed, COHOST, LISTENER, ROLE_COHOST))
    assert guard.leads()[room.room_id] == [HOST, LISTENER]


def test_a_users_third_stream_of_a_kind_ends_their_oldest_and_other_kinds_and_users_are_untouched() -> None:
    replaced: list[Watch] = []
    guard, room = Guard(streams_per_user=2, on_replaced=replaced.append), live_room()
    t = ticket(room, SPEAKER, ROLE_SPEAKER)
    first, first_cuts = opened(guard, t, LISTEN)
    second, _ = opened(guard, t, STAGE)  # subscribe streams: listen and stage count together
    publishing, _ = opened(guard, t, PUBLISH)
    other, _ = opened(guard, ticket(room, LISTENER, ROLE_LISTENER), LISTEN)
    assert guard.holds(t, LISTEN) == 2 and guard.holds(t, PUBLISH) == 1
    third, _ = opened(guard, t, LISTEN)
    assert first_cuts == [True] and replaced == [first]
    assert first.error is not None and first.error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "newer Subscribe stream" in str(first.error) and "at most 2 per user" in str(first.error)
    assert [w.error for w in (second, third, publishing, other)] == [None] * 4
    assert guard.streams(room.room_id) == 4
    guard.release(first)  # the cut stream's handler releases it later: harmless
    assert guard.streams(room.room_id) == 4


def test_a_leave_voids_the_listeners_older_tickets_and_not_a_ticket_from_a_later_join() -> None:
    guard, room = Guard(ticket_ttl_s=600), live_room()
    before = Ticket(room.room_id, LISTENER, ROLE_LISTENER, "relay:1", 0, (), room.version, NOW)
    after = Ticket(room.room_id, LISTENER, ROLE_LISTENER, "relay:1", 0, (), room.version, NOW + 500)
    speaker = Ticket(room.room_id, SPEAKER, ROLE_SPEAKER, "relay:1", 0, (), room.version, NOW)
    listening, cuts = opened(guard, before, LISTEN)
    on_edge, _ = opened(guard, speaker, LISTEN)
    assert guard.left(room.room_id, [(LISTENER, NOW + 100), (SPEAKER, NOW + 100)], NOW + 200) == [
        (listening, "left")
    ]
    assert cuts == [True] and listening.error is not None
    assert listening.error.code == grpc.StatusCode.PERMISSION_DENIED and "left room" in str(listening.error)
    assert on_edge.error is None, "a Leave frees listener seats only: stage tickets are the room's to revoke"
    with pytest.raises(TownhallError, match="left room"):
        guard.admit(before, LISTEN)
    assert guard.admit(after, LISTEN).error is None
    # Once every ticket issued before the leave has expired, the leave is forgotten.
    assert guard.leaves == 2
    guard.expire(NOW + 100 + 600_000 + 61_000)
    assert guard.leaves == 0


def test_an_ended_rooms_rules_are_kept_until_its_tickets_expired() -> None:
    guard, room = Guard(ticket_ttl_s=600), live_room()
    ended = stage.abandoned(room, NOW)
    guard.apply(ended)
    assert guard.expire(NOW + 600_000) == 0 and guard.rules(room.room_id) is not None
    assert guard.expire(NOW + 600_000 + 61_000) == 1 and guard.rules(room.room_id) is None
    guard.apply(room)
    guard.forget(room.room_id)  # a deleted record of a live room (never written) is not trusted
    assert guard.rules(room.room_id) is not None
