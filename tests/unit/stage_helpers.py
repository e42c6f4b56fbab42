"""A live room with a stage, for the unit tests of the stage rules, the relay's guard and host failover."""

from __future__ import annotations

from townhall.admission import stage
from townhall.admission.rooms import RoomBook
from townhall.v1.common_pb2 import ROLE_COHOST, Room


def live_room(host: int, cohosts: tuple[int, ...] = (), speakers: tuple[int, ...] = ()) -> Room:
    """A started room of `host`, with these co-hosts and speakers (made by the host, as a client would)."""
    book = RoomBook()
    room = book.created(host, "Stage", list(speakers), 0, now_ms=1_000)
    book.apply(room)
    room = book.started(room.room_id, host, now_ms=2_000)
    for cohost in cohosts:
        room = stage.set_role(room, host, cohost, ROLE_COHOST)
    return room
