"""The stage and its moderation: pure rules that each return a room's next version (no I/O).

Each function takes the room as held and returns either the same object (the change already holds:
a repeated call is answered without a write) or a new version to be written to Kafka, or raises with
the status the caller gets. Who may do what:

| change                  | who                          | refused                                          |
|-------------------------|------------------------------|--------------------------------------------------|
| raise / lower hand      | the user, for themselves     | banned; on stage already; room not live           |
| accept an invitation    | the invited user             | not invited; the stage is full                    |
| leave the stage         | a co-host or speaker         | the host (ends the room instead)                  |
| invite, approve a hand  | host, co-host                | banned target; yourself; the stage is full        |
| make / unmake co-host   | host                         | more than MAX_COHOSTS                             |
| speaker / listener      | host; co-host for non-co-hosts | the host; yourself; the stage is full           |
| mute / unmute           | host; co-host for speakers   | the host; yourself; not on stage                  |
| remove (and ban), unban | host; co-host for non-co-hosts | the host; yourself; too many bans or removals   |
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableSequence

from townhall.admission.rooms import MAX_SPEAKERS, role_of
from townhall.core.auth import MODERATE
from townhall.core.errors import FailedPrecondition, LimitReached, PermissionDenied, Reason
from townhall.core.validation import MAX_BANS as MAX_BANS
from townhall.core.validation import MAX_COHOSTS as MAX_COHOSTS
from townhall.core.validation import MAX_HANDS as MAX_HANDS
from townhall.core.validation import MAX_INVITES as MAX_INVITES
from townhall.core.validation import MAX_REMOVALS as MAX_REMOVALS
from townhall.v1.common_pb2 import ROLE_COHOST, ROLE_LISTENER, ROLE_SPEAKER, Removal, Role, Room, RoomState

# The lists a user is taken off when they leave the stage or are removed.
_PLACES = ("cohost_ids", "speaker_ids", "muted_ids", "hand_ids", "invited_ids")


def on_stage(room: Room, user: int) -> bool:
    """Whether the user is the host, a co-host or a speaker of the room."""
    return user == room.host_id or user in room.cohost_ids or user in room.speaker_ids


def moderates(room: Room, user: int, grants: Iterable[str]) -> bool:
    """Whether the user may moderate the room: its host or a co-host, with the `moderate` grant."""
    return MODERATE in grants and (user == room.host_id or user in room.cohost_ids)


def shown_to(room: Room, user: int, grants: Iterable[str]) -> Room:
    """The room as `user` may see it: moderators see everything; anyone else sees no bans or removals,
    and of the raised hands and invitations only their own."""
    if moderates(room, user, grants):
        return room
    return _public(room, user)


def basic(room: Room) -> Room:
    """The room in the BASIC view (ListLiveRooms, and GetRoom if asked): no bans, removals, raised hands
    or invitations, for anyone."""
    return _public(room, 0)


def _public(room: Room, user: int) -> Room:
    hidden = ("banned_ids", "removals", "hand_ids", "invited_ids")
    if not any(getattr(room, name) for name in hidden):
        return room
    shown = Room()
    shown.CopyFrom(room)
    del shown.banned_ids[:]
    del shown.removals[:]
    for name in ("hand_ids", "invited_ids"):
        own = user in getattr(room, name)
        del getattr(shown, name)[:]
        if own:
            getattr(shown, name).append(user)
    return shown


def raise_hand(room: Room, user: int) -> Room:
    """The user asks to speak."""
    _live(room)
    if user in room.banned_ids:
        raise PermissionDenied(f"user {user} is banned from room {room.room_id}", reason=Reason.BANNED)
    if on_stage(room, user):
        raise FailedPrecondition(f"user {user} is on the stage of room {room.room_id} already")
    if user in room.invited_ids:
        raise FailedPrecondition(
            f"user {user} is invited to speak in room {room.room_id}: accept the invitation instead"
        )
    if user in room.hand_ids:
        return room
    _room_in(
        room, "hand_ids", MAX_HANDS, "raised hands", "raise yours again once the hosts have answered some"
    )
    return _with(room, "hand_ids", user)


def lower_hand(room: Room, user: int) -> Room:
    """The user withdraws a raised hand or declines an invitation to speak."""
    _not_ended(room)
    if user not in room.hand_ids and user not in room.invited_ids:
        return room
    return _without(room, user, ("hand_ids", "invited_ids"))


def invite(room: Room, actor: int, user: int) -> Room:
    """A moderator invites `user` to speak; a raised hand is approved at once (the user speaks)."""
    _not_ended(room)
    _moderator(room, actor, "invite users to speak")
    if user == actor:
        raise PermissionDenied(f"user {actor} cannot invite themselves")
    _not_banned(room, user)
    if on_stage(room, user) or user in room.invited_ids:
        return room
    if user in room.hand_ids:
        return _to_speakers(room, user, ("hand_ids",))
    _room_in(
        room, "invited_ids", MAX_INVITES, "pending invitations", "wait for answers or ask for raised hands"
    )
    return _with(room, "invited_ids", user)


def accept_invite(room: Room, user: int) -> Room:
    """The invited user becomes a speaker."""
    _not_ended(room)
    if on_stage(room, user):
        return room
    if user not in room.invited_ids:
        raise FailedPrecondition(
            f"user {user} has not been invited to speak in room {room.room_id} (RaiseHand asks to)",
            reason=Reason.NOT_INVITED,
        )
    return _to_speakers(room, user, ("hand_ids", "invited_ids"))


def set_role(room: Room, actor: int, user: int, role: Role.ValueType) -> Room:
    """A moderator makes `user` a co-host, a speaker or a listener (off the stage)."""
    _not_ended(room)
    _moderator(room, actor, "change roles")
    if user == actor:
        raise PermissionDenied(f"user {actor} cannot change their own role (LeaveStage steps down)")
    if user == room.host_id:
        raise PermissionDenied(f"the host of room {room.room_id} keeps their role")
    current = role_of(room, user)
    if ROLE_COHOST in (current, role) and actor != room.host_id:
        raise PermissionDenied(f"only the host of room {room.room_id} makes or unmakes co-hosts")
    if current == role:
        return room
    if role == ROLE_LISTENER:
        return _without(room, user, _PLACES)
    _not_banned(room, user)
    if role == ROLE_COHOST and len(room.cohost_ids) >= MAX_COHOSTS:
        raise LimitReached(
            f"room {room.room_id} has {MAX_COHOSTS} co-hosts, the most it may; make one a speaker first"
        )
    if role == ROLE_SPEAKER:
        _speaker_slot(room)
    # A stage member keeps being muted across co-host and speaker; a listener's hand or invitation is done.
    changed = _without(room, user, ("cohost_ids", "speaker_ids", "hand_ids", "invited_ids"))
    (changed.cohost_ids if role == ROLE_COHOST else changed.speaker_ids).append(user)
    return changed


def mute(room: Room, actor: int, user: int, muted: bool) -> Room:
    """A moderator mutes (or unmutes) a stage member: the origin relay drops their frames."""
    _not_ended(room)
    _moderator(room, actor, "mute speakers")
    if user == actor:
        raise PermissionDenied(f"user {actor} cannot mute or unmute themselves here (mute your microphone)")
    if user == room.host_id:
        raise PermissionDenied(f"the host of room {room.room_id} cannot be muted")
    if user in room.cohost_ids and actor != room.host_id:
        raise PermissionDenied(f"only the host of room {room.room_id} mutes or unmutes a co-host")
    if not on_stage(room, user):
        raise FailedPrecondition(f"user {user} is not on the stage of room {room.room_id}")
    if (user in room.muted_ids) == muted:
        return room
    return _with(room, "muted_ids", user) if muted else _without(room, user, ("muted_ids",))


def remove(room: Room, actor: int, user: int, ban: bool, now_ms: int, ticket_ttl_ms: int) -> Room:
    """A moderator removes `user`: off every list, tickets void; with `ban`, they cannot join again.

    The removal is recorded with the new room version: relays refuse the user's tickets of older
    versions. Entries older than the ticket lifetime are dropped (every ticket they void has expired).
    """
    _not_ended(room)
    _moderator(room, actor, "remove users")
    if user == actor:
        raise PermissionDenied(f"user {actor} cannot remove themselves (Admission.Leave leaves the room)")
    if user == room.host_id:
        raise PermissionDenied(f"the host of room {room.room_id} cannot be removed")
    if user in room.cohost_ids and actor != room.host_id:
        raise PermissionDenied(f"only the host of room {room.room_id} removes a co-host")
    current = [r for r in room.removals if r.at_ms > now_ms - ticket_ttl_ms]
    removed = any(r.user_id == user for r in current)
    banned = user in room.banned_ids
    holds = any(user in getattr(room, place) for place in _PLACES)
    if removed and not holds and (banned or not ban):
        return room
    if ban and not banned:
        _room_in(room, "banned_ids", MAX_BANS, "bans", "unban someone first (or remove without a ban)")
    others = [r for r in current if r.user_id != user]
    if len(others) >= MAX_REMOVALS:
        raise LimitReached(
            f"room {room.room_id} has removed {MAX_REMOVALS} users within the ticket lifetime, "
            "the most it records; try again later"
        )
    changed = _without(room, user, _PLACES)
    if ban and not banned:
        changed.banned_ids.append(user)
    del changed.removals[:]
    changed.removals.extend(others)
    changed.removals.append(Removal(user_id=user, version=changed.version, at_ms=now_ms))
    return changed


def unban(room: Room, actor: int, user: int) -> Room:
    """A moderator lifts a ban; the user's old tickets stay void."""
    _not_ended(room)
    _moderator(room, actor, "unban users")
    if user not in room.banned_ids:
        return room
    return _without(room, user, ("banned_ids",))


def leave_stage(room: Room, user: int) -> Room:
    """A co-host or speaker steps down to listener (also lowering a hand, declining an invitation)."""
    _not_ended(room)
    if user == room.host_id:
        raise FailedPrecondition(
            f"the host cannot leave the stage of room {room.room_id}; EndRoom ends the room"
        )
    if not any(user in getattr(room, place) for place in _PLACES):
        return room
    return _without(room, user, _PLACES)


def hand_over(room: Room, cohost: int) -> Room:
    """The room after its host is gone: `cohost` hosts it and the old host takes their co-host place."""
    _not_ended(room)
    if room.host_id == cohost:
        return room
    if cohost not in room.cohost_ids:
        raise FailedPrecondition(f"user {cohost} is not a co-host of room {room.room_id}")
    changed = _next(room)
    cohosts = [room.host_id if c == cohost else c for c in room.cohost_ids]
    del changed.cohost_ids[:]
    changed.cohost_ids.extend(cohosts)
    changed.host_id = cohost
    _keep(changed.muted_ids, lambda u: u != cohost)
    return changed


def abandoned(room: Room, now_ms: int) -> Room:
    """The room ended because neither its host nor a co-host stayed connected."""
    if room.state == RoomState.ROOM_STATE_ENDED:
        return room
    changed = _next(room)
    changed.state = RoomState.ROOM_STATE_ENDED
    changed.ended_at_ms = now_ms
    return changed


def _live(room: Room) -> None:
    _not_ended(room)
    if room.state != RoomState.ROOM_STATE_LIVE:
        state = RoomState.Name(room.state).removeprefix("ROOM_STATE_").lower()
        raise FailedPrecondition(f"room {room.room_id} is {state}, not live", reason=Reason.ROOM_NOT_LIVE)


def _not_ended(room: Room) -> None:
    if room.state == RoomState.ROOM_STATE_ENDED:
        raise FailedPrecondition(f"room {room.room_id} has ended", reason=Reason.ROOM_ENDED)


def _moderator(room: Room, actor: int, doing: str) -> None:
    if actor != room.host_id and actor not in room.cohost_ids:
        raise PermissionDenied(f"only the host and co-hosts of room {room.room_id} may {doing}")


def _not_banned(room: Room, user: int) -> None:
    if user in room.banned_ids:
        raise FailedPrecondition(
            f"user {user} is banned from room {room.room_id}; unban them first", reason=Reason.BANNED
        )


def _speaker_slot(room: Room) -> None:
    if len(room.speaker_ids) >= MAX_SPEAKERS:
        raise LimitReached(
            f"the stage of room {room.room_id} is full ({MAX_SPEAKERS} speakers); "
            "move a speaker off the stage first"
        )


def _to_speakers(room: Room, user: int, leaving: Iterable[str]) -> Room:
    """`user` off the `leaving` lists and onto the stage as a speaker, if a speaker's place is free."""
    _speaker_slot(room)
    changed = _without(room, user, leaving)
    changed.speaker_ids.append(user)
    return changed


def _next(room: Room) -> Room:
    changed = Room()
    changed.CopyFrom(room)
    changed.version = room.version + 1
    return changed


def _room_in(room: Room, place: str, limit: int, what: str, advice: str) -> None:
    if len(getattr(room, place)) >= limit:
        raise LimitReached(f"room {room.room_id} has {limit} {what}, the most it holds; {advice}")


def _with(room: Room, place: str, user: int) -> Room:
    changed = _next(room)
    getattr(changed, place).append(user)
    return changed


def _without(room: Room, user: int, places: Iterable[str]) -> Room:
    changed = _next(room)
    for place in places:
        _keep(getattr(changed, place), lambda u: u != user)
    return changed


def _keep(ids: MutableSequence[int], keep: Callable[[int], bool]) -> None:
    kept = [u for u in ids if keep(u)]
    if len(kept) != len(ids):
        del ids[:]
        ids.extend(kept)
