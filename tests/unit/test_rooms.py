"""The room state machine: who may start and end a room, and what each change yields."""

import pytest

from townhall.admission import rooms
from townhall.admission.rooms import RoomBook, new_room_id, role_of, room_id_for
from townhall.core import validation
from townhall.core.errors import FailedPrecondition, NotFound, PermissionDenied
from townhall.v1.common_pb2 import Role, RoomState

HOST, OTHER = 7, 8


def _book_with_room() -> tuple[RoomBook, str]:
    book = RoomBook()
    room = book.created(HOST, "Hello", [11, 12], 0, now_ms=1_000)
    assert book.apply(room)
    return book, room.room_id


def test_host_starts_and_ends_a_room_each_change_a_new_version() -> None:
    book, room_id = _book_with_room()
    started = book.started(room_id, HOST, now_ms=2_000)
    assert (started.state, started.version, started.started_at_ms) == (RoomState.ROOM_STATE_LIVE, 2, 2_000)
    assert book.get(room_id).state == RoomState.ROOM_STATE_CREATED, "proposals are not stored until applied"
    book.apply(started)
    assert [r.room_id for r in book.live()] == [room_id]
    ended = book.ended(room_id, HOST, now_ms=3_000)
    book.apply(ended)
    assert (ended.state, ended.version) == (RoomState.ROOM_STATE_ENDED, 3)
    assert book.live() == []


def test_only_the_host_may_start_or_end() -> None:
    book, room_id = _book_with_room()
    with pytest.raises(PermissionDenied, match="only the host"):
        book.started(room_id, OTHER, now_ms=2_000)
    with pytest.raises(PermissionDenied, match="only the host"):
        book.ended(room_id, OTHER, now_ms=2_000)


def test_repeated_start_and_end_are_idempotent_and_ended_rooms_stay_ended() -> None:
    book, room_id = _book_with_room()
    book.apply(book.started(room_id, HOST, 2_000))
    assert book.started(room_id, HOST, 2_500) is book.get(room_id)
    book.apply(book.ended(room_id, HOST, 3_000))
    assert book.ended(room_id, HOST, 3_500) is book.get(room_id)
    with pytest.raises(FailedPrecondition, match="has ended"):
        book.started(room_id, HOST, 4_000)


def test_unknown_room_is_not_found() -> None:
    with pytest.raises(NotFound, match="does not exist"):
        RoomBook().get("nope")


def test_apply_keeps_the_newest_version_whatever_the_order() -> None:
    book, room_id = _book_with_room()
    v2 = book.started(room_id, HOST, 2_000)
    book.apply(v2)
    v3 = book.ended(room_id, HOST, 3_000)
    assert book.apply(v3)
    assert not book.apply(v2), "a replayed older version must not win"
    assert book.get(room_id).version == 3


def test_roles_host_speaker_listener() -> None:
    book, room_id = _book_with_room()
    room = book.get(room_id)
    assert role_of(room, HOST) == Role.ROLE_HOST
    assert role_of(room, 11) == Role.ROLE_SPEAKER
    assert role_of(room, 99) == Role.ROLE_LISTENER


def test_only_a_live_room_is_marked_crowd_and_marking_it_again_changes_nothing() -> None:
    book = RoomBook()
    room = book.created(1, "t", [], 0, 1000)
    book.apply(room)
    assert book.crowded(room.room_id) is book.get(room.room_id), "a room that is not live is left as it is"
    book.apply(book.started(room.room_id, 1, 2000))
    crowded = book.crowded(room.room_id)
    assert crowded.crowd and crowded.version == book.get(room.room_id).version + 1
    book.apply(crowded)
    assert book.crowded(room.room_id) is book.get(room.room_id)


def test_a_live_room_is_pending_announcement_until_its_announced_version_is_applied() -> None:
    book = RoomBook()
    room = book.created(1, "t", [], 0, now_ms=1)
    book.apply(room)
    live = book.started(room.room_id, 1, now_ms=2)
    assert (live.state, live.announced) == (RoomState.ROOM_STATE_LIVE, False)
    book.apply(live)
    # The owner failed here: the next owner finds the room and announces it.
    assert [r.room_id for r in book.unannounced()] == [room.room_id]
    announced = book.announced(room.room_id)
    assert (announced.version, announced.announced) == (3, True)
    book.apply(announced)
    assert book.unannounced() == []
    assert book.announced(room.room_id) is book.get(room.room_id), "announcing twice changes nothing"
    book.apply(book.ended(room.room_id, 1, now_ms=3))
    assert book.unannounced() == []


def test_the_book_counts_a_hosts_recent_creations_and_forgets_rooms() -> None:
    book = RoomBook()
    for at in (1_000, 2_000, 3_000):
        book.apply(book.created(HOST, "r", [], 0, now_ms=at))
    other = book.created(OTHER, "r", [], 0, now_ms=2_500)
    book.apply(other)
    assert book.created_since(HOST, 1_500) == [2_000, 3_000]
    assert book.created_since(OTHER, 0) == [2_500]
    ended = book.ended(other.room_id, OTHER, now_ms=4_000)
    book.apply(ended)
    assert book.ended_before(4_001) == [other.room_id] and book.ended_before(4_000) == []
    assert len(book.unstarted_before(2_500)) == 2  # the host's rooms of 1_000 and 2_000
    assert book.forget(other.room_id) and not book.forget(other.room_id)
    assert book.find(other.room_id) is None
    book.prune_created(10_000)
    assert book.created_since(HOST, 0) == []


def test_a_never_started_room_expires_into_ended_and_a_started_one_does_not() -> None:
    book, room_id = _book_with_room()
    expired = book.expired(room_id, now_ms=9_000)
    assert (expired.state, expired.ended_at_ms, expired.version) == (RoomState.ROOM_STATE_ENDED, 9_000, 2)
    book.apply(book.started(room_id, HOST, now_ms=2_000))
    assert book.expired(room_id, now_ms=9_000) is book.get(room_id)


def test_a_fresh_room_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A room id is typed on command lines (`townhall room start ID`), where "-..." is taken for an option."""
    draws = iter([b"\xf8" + bytes(11), bytes(12)])  # the first would be "-AAA..."
    monkeypatch.setattr(rooms.secrets, "token_bytes", lambda n: next(draws))
    assert new_room_id() == "A" * 16


def test_idempotent_room_ids_never_start_with_a_dash_and_stay_the_same() -> None:
    ids = [room_id_for(HOST, f"key-{i}") for i in range(2_000)]  # 1 in 64 hashes starts with "-"
    assert not [i for i in ids if i.startswith("-")]
    assert ids == [room_id_for(HOST, f"key-{i}") for i in range(2_000)], "the same id on every attempt"
    assert len(set(ids)) == len(ids) and all(validation.room_id(i) for i in ids)
