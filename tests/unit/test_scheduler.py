"""Scheduled rooms: the room book's rules and the scheduler's tick, without a network."""

from __future__ import annotations

import pytest

from townhall.admission.rooms import RoomBook
from townhall.admission.scheduler import Scheduler
from townhall.core.errors import FailedPrecondition, PermissionDenied
from townhall.v1.common_pb2 import Room, RoomState


def _book_with_room(host: int = 1) -> tuple[RoomBook, Room]:
    book = RoomBook()
    room = book.created(host, "later", [], 0, now_ms=1_000)
    book.apply(room)
    return book, room


def test_only_the_host_schedules_a_created_room_and_it_becomes_due_at_its_time() -> None:
    book, room = _book_with_room()
    with pytest.raises(PermissionDenied):
        book.scheduled(room.room_id, 2, 5_000)
    scheduled = book.scheduled(room.room_id, 1, 5_000)
    assert (scheduled.state, scheduled.scheduled_start_ms, scheduled.version) == (
        RoomState.ROOM_STATE_SCHEDULED,
        5_000,
        2,
    )
    book.apply(scheduled)
    assert book.due(4_999) == []
    assert [r.room_id for r in book.due(5_000)] == [room.room_id]
    started = book.started(room.room_id, 1, 5_001)
    assert started.state == RoomState.ROOM_STATE_LIVE
    book.apply(started)
    with pytest.raises(FailedPrecondition):
        book.scheduled(room.room_id, 1, 9_000)


class FakeStore:
    def __init__(self, book: RoomBook) -> None:
        self.book = book
        self.started: list[tuple[str, int]] = []

    async def announce_pending(self, owns: object) -> int:
        return 0

    async def start(self, room_id: str, caller: int) -> Room:
        self.started.append((room_id, caller))
        room = self.book.started(room_id, caller, 10**13)
        self.book.apply(room)
        return room


async def test_the_scheduler_starts_due_rooms_it_owns_as_their_host() -> None:
    book, room = _book_with_room(host=7)
    book.apply(book.scheduled(room.room_id, 7, 1))
    store = FakeStore(book)
    assert await Scheduler(store, owns=lambda _r: False).tick() == 0  # type: ignore[arg-type]
    assert await Scheduler(store).tick() == 1  # type: ignore[arg-type]
    assert store.started == [(room.room_id, 7)]
    assert await Scheduler(store).tick() == 0, "a started room is not started again"  # type: ignore[arg-type]
