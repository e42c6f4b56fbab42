"""The stage and moderation rules (admission/stage.py): who may do what, limits, idempotency, versions."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.unit import stage_helpers
from townhall.admission import stage
from townhall.admission.rooms import MAX_SPEAKERS, RoomBook, role_of
from townhall.core.errors import FailedPrecondition, LimitReached, PermissionDenied, TownhallError
from townhall.v1.common_pb2 import ROLE_COHOST, ROLE_LISTENER, ROLE_SPEAKER, Role, Room, RoomState

HOST, COHOST, SPEAKER, LISTENER, OTHER = 1, 2, 3, 10, 11
TTL_MS = 3_600_000
NOW = 10_000_000


def live_room() -> Room:
    """A live room: host 1, co-host 2, speaker 3."""
    return stage_helpers.live_room(HOST, (COHOST,), (SPEAKER,))


def remove(room: Room, actor: int, user: int, ban: bool = False, now: int = NOW) -> Room:
    return stage.remove(room, actor, user, ban, now, TTL_MS)


def test_a_raised_hand_approved_by_a_co_host_puts_the_listener_on_stage() -> None:
    room = live_room()
    raised = stage.raise_hand(room, LISTENER)
    assert list(raised.hand_ids) == [LISTENER] and raised.version == room.version + 1
    approved = stage.invite(raised, COHOST, LISTENER)
    assert role_of(approved, LISTENER) == ROLE_SPEAKER
    assert list(approved.hand_ids) == [] and approved.version == raised.version + 1
    assert list(room.hand_ids) == [], "the room given is never changed in place"


def test_an_invitation_is_accepted_or_declined_by_the_invited_user_only() -> None:
    room = live_room()
    invited = stage.invite(room, HOST, LISTENER)
    assert list(invited.invited_ids) == [LISTENER] and role_of(invited, LISTENER) == ROLE_LISTENER
    with pytest.raises(FailedPrecondition, match="has not been invited"):
        stage.accept_invite(invited, OTHER)
    with pytest.raises(FailedPrecondition, match="accept the invitation"):
        stage.raise_hand(invited, LISTENER)
    accepted = stage.accept_invite(invited, LISTENER)
    assert role_of(accepted, LISTENER) == ROLE_SPEAKER and list(accepted.invited_ids) == []
    declined = stage.lower_hand(invited, LISTENER)
    assert list(declined.invited_ids) == [] and role_of(declined, LISTENER) == ROLE_LISTENER


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("raise a hand", lambda r: stage.raise_hand(stage.raise_hand(r, LISTENER), LISTENER)),
        ("lower a hand not raised", lambda r: stage.lower_hand(r, LISTENER)),
        ("invite twice", lambda r: stage.invite(stage.invite(r, HOST, LISTENER), HOST, LISTENER)),
        ("invite a speaker", lambda r: stage.invite(r, HOST, SPEAKER)),
        ("accept when on stage", lambda r: stage.accept_invite(r, SPEAKER)),
        ("make a speaker a speaker", lambda r: stage.set_role(r, HOST, SPEAKER, ROLE_SPEAKER)),
        ("demote a listener", lambda r: stage.set_role(r, HOST, LISTENER, ROLE_LISTENER)),
        ("unmute the unmuted", lambda r: stage.mute(r, HOST, SPEAKER, False)),
        ("mute twice", lambda r: stage.mute(stage.mute(r, HOST, SPEAKER, True), HOST, SPEAKER, True)),
        ("remove twice", lambda r: remove(remove(r, HOST, SPEAKER), HOST, SPEAKER)),
        ("ban twice", lambda r: remove(remove(r, HOST, OTHER, True), HOST, OTHER, True)),
        ("remove the banned", lambda r: remove(remove(r, HOST, OTHER, True), HOST, OTHER)),
        ("unban the unbanned", lambda r: stage.unban(r, HOST, OTHER)),
        ("leave the stage as a listener", lambda r: stage.leave_stage(r, LISTENER)),
    ],
)
def test_a_repeated_change_that_already_holds_returns_the_room_unchanged(
    name: str, change: Callable[[Room], Room]
) -> None:
    room = live_room()
    once = change(room)
    # Written at most once: the second call of the pair returned what the first made.
    assert once.version <= room.version + 1, name


def test_moderating_needs_the_host_or_a_co_host() -> None:
    room = stage.raise_hand(live_room(), LISTENER)
    changes = {
        "invite users to speak": lambda actor: stage.invite(room, actor, OTHER),
        "change roles": lambda actor: stage.set_role(room, actor, LISTENER, ROLE_SPEAKER),
        "mute speakers": lambda actor: stage.mute(room, actor, SPEAKER, True),
        "remove users": lambda actor: remove(room, actor, LISTENER),
        "unban users": lambda actor: stage.unban(room, actor, OTHER),
    }
    for doing, change in changes.items():
        for actor in (SPEAKER, LISTENER):
            with pytest.raises(PermissionDenied, match=rf"only the host and co-hosts of room .* may {doing}"):
                change(actor)
        assert change(HOST) is not None and change(COHOST) is not None


def test_nobody_moderates_themselves_but_anyone_on_stage_except_the_host_may_leave_it() -> None:
    room = live_room()
    for actor in (HOST, COHOST):
        with pytest.raises(PermissionDenied, match="cannot invite themselves"):
            stage.invite(room, actor, actor)
        with pytest.raises(PermissionDenied, match="cannot change their own role"):
            stage.set_role(room, actor, actor, ROLE_LISTENER)
        with pytest.raises(PermissionDenied, match="cannot mute or unmute themselves"):
            stage.mute(room, actor, actor, True)
        with pytest.raises(PermissionDenied, match="cannot remove themselves"):
            remove(room, actor, actor)
    for member in (COHOST, SPEAKER):
        left = stage.leave_stage(stage.mute(room, HOST, member, True), member)
        assert role_of(left, member) == ROLE_LISTENER and member not in left.muted_ids
    with pytest.raises(FailedPrecondition, match="host cannot leave the stage"):
        stage.leave_stage(room, HOST)


def test_the_host_is_never_demoted_muted_or_removed() -> None:
    room = live_room()
    with pytest.raises(PermissionDenied, match="keeps their role"):
        stage.set_role(room, COHOST, HOST, ROLE_LISTENER)
    with pytest.raises(PermissionDenied, match="cannot be muted"):
        stage.mute(room, COHOST, HOST, True)
    with pytest.raises(PermissionDenied, match="cannot be removed"):
        remove(room, COHOST, HOST, ban=True)


def test_a_co_host_cannot_act_on_another_co_host_nor_make_co_hosts() -> None:
    room = stage.set_role(live_room(), HOST, 4, ROLE_COHOST)  # co-hosts 2 and 4
    with pytest.raises(PermissionDenied, match=r"only the host .* makes or unmakes co-hosts"):
        stage.set_role(room, COHOST, 4, ROLE_LISTENER)
    with pytest.raises(PermissionDenied, match=r"only the host .* makes or unmakes co-hosts"):
        stage.set_role(room, COHOST, SPEAKER, ROLE_COHOST)
    with pytest.raises(PermissionDenied, match=r"only the host .* mutes or unmutes a co-host"):
        stage.mute(room, COHOST, 4, True)
    with pytest.raises(PermissionDenied, match=r"only the host .* removes a co-host"):
        remove(room, COHOST, 4, ban=True)
    # What a co-host may do: manage speakers and listeners.
    assert role_of(stage.set_role(room, COHOST, SPEAKER, ROLE_LISTENER), SPEAKER) == ROLE_LISTENER
    assert SPEAKER in stage.mute(room, COHOST, SPEAKER, True).muted_ids
    # The host may do all of it.
    assert role_of(stage.set_role(room, HOST, 4, ROLE_SPEAKER), 4) == ROLE_SPEAKER


def test_co_host_and_speaker_limits() -> None:
    room = stage.set_role(live_room(), HOST, 4, ROLE_COHOST)
    assert len(room.cohost_ids) == stage.MAX_COHOSTS
    with pytest.raises(LimitReached, match="2 co-hosts, the most it may"):
        stage.set_role(room, HOST, SPEAKER, ROLE_COHOST)
    for user in range(100, 100 + MAX_SPEAKERS - 1):
        room = stage.set_role(room, HOST, user, ROLE_SPEAKER)
    assert len(room.speaker_ids) == MAX_SPEAKERS
    hand = stage.raise_hand(room, LISTENER)
    invited = stage.invite(room, HOST, LISTENER)
    for full in (
        lambda: stage.set_role(room, HOST, LISTENER, ROLE_SPEAKER),
        lambda: stage.invite(hand, HOST, LISTENER),
        lambda: stage.accept_invite(invited, LISTENER),
        lambda: stage.set_role(room, HOST, COHOST, ROLE_SPEAKER),
    ):
        with pytest.raises(LimitReached, match=f"full \\({MAX_SPEAKERS} speakers\\)"):
            full()


def test_hands_invitations_bans_and_removals_are_bounded() -> None:
    room = live_room()
    for user in range(1000, 1000 + stage.MAX_HANDS):
        room = stage.raise_hand(room, user)
    with pytest.raises(LimitReached, match="100 raised hands"):
        stage.raise_hand(room, LISTENER)
    room = live_room()
    for user in range(1000, 1000 + stage.MAX_INVITES):
        room = stage.invite(room, HOST, user)
    with pytest.raises(LimitReached, match="20 pending invitations"):
        stage.invite(room, HOST, LISTENER)
    room = live_room()
    del room.removals[:]
    room.banned_ids.extend(range(5000, 5000 + stage.MAX_BANS))
    with pytest.raises(LimitReached, match="1000 bans"):
        remove(room, HOST, LISTENER, ban=True)
    assert LISTENER not in remove(room, HOST, LISTENER).banned_ids, "a removal without a ban still works"


def test_removals_are_kept_for_the_ticket_lifetime_only() -> None:
    room = live_room()
    for user in range(2000, 2000 + stage.MAX_REMOVALS):
        room = remove(room, HOST, user, now=NOW)
    with pytest.raises(LimitReached, match="removed 256 users within the ticket lifetime"):
        remove(room, HOST, LISTENER, now=NOW + 1)
    later = remove(room, HOST, LISTENER, now=NOW + TTL_MS)  # every earlier ticket has expired by now
    assert [(r.user_id, r.version) for r in later.removals] == [(LISTENER, later.version)]


def test_a_removal_voids_older_tickets_and_takes_the_user_off_every_list() -> None:
    room = stage.mute(live_room(), HOST, SPEAKER, True)
    room = stage.raise_hand(room, LISTENER)
    removed = remove(room, COHOST, SPEAKER)
    assert role_of(removed, SPEAKER) == ROLE_LISTENER and SPEAKER not in removed.muted_ids
    assert [(r.user_id, r.version, r.at_ms) for r in removed.removals] == [(SPEAKER, removed.version, NOW)]
    assert list(removed.banned_ids) == []
    banned = remove(removed, HOST, LISTENER, ban=True)
    assert list(banned.banned_ids) == [LISTENER] and list(banned.hand_ids) == []
    # Removed again later: one entry per user, with the newer version.
    again = remove(stage.invite(banned, HOST, SPEAKER), HOST, SPEAKER)
    assert sorted((r.user_id, r.version) for r in again.removals) == [
        (SPEAKER, again.version),
        (LISTENER, banned.version),
    ]


def test_a_banned_user_cannot_ask_to_speak_nor_be_put_on_stage_until_unbanned() -> None:
    room = remove(live_room(), HOST, LISTENER, ban=True)
    with pytest.raises(PermissionDenied, match="banned"):
        stage.raise_hand(room, LISTENER)
    for change in (
        lambda r: stage.invite(r, HOST, LISTENER),
        lambda r: stage.set_role(r, HOST, LISTENER, ROLE_SPEAKER),
    ):
        with pytest.raises(FailedPrecondition, match="unban them first"):
            change(room)
    unbanned = stage.unban(room, COHOST, LISTENER)
    assert list(unbanned.banned_ids) == [] and len(unbanned.removals) == 1, "old tickets stay void"
    assert (
        role_of(stage.invite(stage.raise_hand(unbanned, LISTENER), HOST, LISTENER), LISTENER) == ROLE_SPEAKER
    )


def test_mute_is_for_stage_members_and_survives_a_move_between_co_host_and_speaker() -> None:
    room = live_room()
    with pytest.raises(FailedPrecondition, match="not on the stage"):
        stage.mute(room, HOST, LISTENER, True)
    muted = stage.mute(room, HOST, SPEAKER, True)
    promoted = stage.set_role(muted, HOST, SPEAKER, ROLE_COHOST)
    assert role_of(promoted, SPEAKER) == ROLE_COHOST and SPEAKER in promoted.muted_ids
    assert SPEAKER not in stage.set_role(muted, HOST, SPEAKER, ROLE_LISTENER).muted_ids
    assert SPEAKER not in stage.mute(muted, COHOST, SPEAKER, False).muted_ids


def test_nothing_changes_in_an_ended_room_and_hands_are_raised_only_in_a_live_one() -> None:
    room = live_room()
    ended = stage.abandoned(room, now_ms=NOW)
    assert (ended.state, ended.ended_at_ms, ended.version) == (
        RoomState.ROOM_STATE_ENDED,
        NOW,
        room.version + 1,
    )
    assert stage.abandoned(ended, NOW + 1) is ended
    changes: list[Callable[[Room], Room]] = [
        lambda r: stage.lower_hand(r, LISTENER),
        lambda r: stage.invite(r, HOST, LISTENER),
        lambda r: stage.accept_invite(r, LISTENER),
        lambda r: stage.set_role(r, HOST, SPEAKER, ROLE_LISTENER),
        lambda r: stage.mute(r, HOST, SPEAKER, True),
        lambda r: remove(r, HOST, LISTENER, ban=True),
        lambda r: stage.unban(r, HOST, LISTENER),
        lambda r: stage.leave_stage(r, SPEAKER),
        lambda r: stage.raise_hand(r, LISTENER),
    ]
    for change in changes:
        with pytest.raises(FailedPrecondition, match="has ended"):
            change(ended)
    created = RoomBook().created(HOST, "Later", [], 0, now_ms=1)
    with pytest.raises(FailedPrecondition, match="is created, not live"):
        stage.raise_hand(created, LISTENER)
    assert role_of(stage.set_role(created, HOST, 5, ROLE_SPEAKER), 5) == ROLE_SPEAKER, "a stage set up ahead"


def test_a_hand_over_makes_the_co_host_host_and_the_old_host_a_co_host() -> None:
    room = stage.set_role(live_room(), HOST, 4, ROLE_COHOST)
    room = stage.mute(room, HOST, 4, True)
    handed = stage.hand_over(room, 4)
    assert handed.host_id == 4 and list(handed.cohost_ids) == [COHOST, HOST]
    assert 4 not in handed.muted_ids and handed.version == room.version + 1
    assert role_of(handed, HOST) == Role.ROLE_COHOST
    with pytest.raises(FailedPrecondition, match="not a co-host"):
        stage.hand_over(room, SPEAKER)


def test_a_listing_leaves_out_bans_and_removals() -> None:
    room = live_room()
    assert stage.basic(room) is room
    banned = remove(room, HOST, LISTENER, ban=True)
    shown = stage.basic(banned)
    assert list(shown.banned_ids) == [] and list(shown.removals) == [] and shown.version == banned.version
    assert list(banned.banned_ids) == [LISTENER]


def test_errors_say_what_is_wrong_and_map_to_statuses() -> None:
    room = live_room()
    cases: list[tuple[Callable[[], Room], str]] = [
        (lambda: stage.set_role(room, LISTENER, SPEAKER, ROLE_LISTENER), "PERMISSION_DENIED"),
        (lambda: stage.accept_invite(room, LISTENER), "FAILED_PRECONDITION"),
    ]
    for change, code in cases:
        with pytest.raises(TownhallError) as error:
            change()
        assert error.value.code.name == code
        assert room.room_id in str(error.value)


def test_the_book_answers_ban_checks_for_the_join_path_from_the_newest_version() -> None:
    book = RoomBook()
    room = live_room()
    book.apply(room)
    assert not book.banned(room.room_id, LISTENER)
    banned = remove(room, HOST, LISTENER, ban=True)
    book.apply(banned)
    assert book.banned(room.room_id, LISTENER) and not book.banned(room.room_id, OTHER)
    assert not book.apply(room), "an older version never wins"
    assert book.banned(room.room_id, LISTENER)
    book.apply(stage.unban(banned, HOST, LISTENER))
    assert not book.banned(room.room_id, LISTENER)
    assert not book.banned("no-such-room", LISTENER)
    assert role_of(room, COHOST) == ROLE_COHOST
