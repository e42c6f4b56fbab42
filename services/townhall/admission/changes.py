"""What changed between two versions of a room, as WatchRoom's events tell it (pure).

Both versions are given as the watcher may see them (stage.shown_to), so an event a watcher may not
see (another user's raised hand, a ban) is never derived for it.
"""

from __future__ import annotations

from collections.abc import Iterable

from townhall.v1.common_pb2 import ROLE_COHOST, ROLE_HOST, ROLE_LISTENER, ROLE_SPEAKER, Role, Room
from townhall.v1.rooms_pb2 import RoomEvent

_LISTS = (
    ("hand_ids", RoomEvent.KIND_HAND_RAISED, RoomEvent.KIND_HAND_LOWERED),
    ("invited_ids", RoomEvent.KIND_INVITED, RoomEvent.KIND_INVITATION_CLOSED),
    ("muted_ids", RoomEvent.KIND_MUTED, RoomEvent.KIND_UNMUTED),
)


def roles(room: Room) -> dict[int, Role.ValueType]:
    """The stage: each member's role."""
    stage = dict.fromkeys(room.speaker_ids, ROLE_SPEAKER)
    stage.update(dict.fromkeys(room.cohost_ids, ROLE_COHOST))
    stage[room.host_id] = ROLE_HOST
    return stage


def events(before: Room, after: Room) -> list[RoomEvent]:
    """The events that take `before` to `after` (two versions of one room): state, roles, hands,
    invitations, mutes, removals, bans, in that order; within a kind, in the order of the room's lists."""
    out: list[RoomEvent] = []
    if after.state != before.state:
        out.append(RoomEvent(kind=RoomEvent.KIND_STATE, state=after.state))
    was, now = roles(before), roles(after)
    for user in _ordered(now, was):
        role = now.get(user, ROLE_LISTENER)
        if role != was.get(user, ROLE_LISTENER):
            out.append(RoomEvent(kind=RoomEvent.KIND_ROLE, user_id=user, role=role))
    for name, added, gone in _LISTS:
        _diff(getattr(before, name), getattr(after, name), added, gone, out)
    removed = {(r.user_id, r.version) for r in before.removals}
    for removal in after.removals:
        if (removal.user_id, removal.version) not in removed:
            out.append(RoomEvent(kind=RoomEvent.KIND_REMOVED, user_id=removal.user_id))
    _diff(before.banned_ids, after.banned_ids, RoomEvent.KIND_BANNED, RoomEvent.KIND_UNBANNED, out)
    return out


def _diff(
    before: Iterable[int],
    after: Iterable[int],
    added: RoomEvent.Kind.ValueType,
    gone: RoomEvent.Kind.ValueType,
    out: list[RoomEvent],
) -> None:
    old, new = list(before), list(after)
    was, now = set(old), set(new)
    out.extend(RoomEvent(kind=gone, user_id=user) for user in old if user not in now)
    out.extend(RoomEvent(kind=added, user_id=user) for user in new if user not in was)


def _ordered(*stages: dict[int, Role.ValueType]) -> list[int]:
    return list(dict.fromkeys(user for stage in stages for user in stage))
