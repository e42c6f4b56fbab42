"""Page tokens (AIP-158) and the live-room pages they step through: no room twice, none skipped."""

import random

import pytest

from townhall.admission.rooms import RoomBook, live_order
from townhall.core import pages
from townhall.core.errors import InvalidArgument
from townhall.v1.common_pb2 import Room, RoomState


def test_a_token_gives_back_its_key_for_the_request_it_was_made_for() -> None:
    token = pages.seal("followers/7", b"\x00\x01key")
    assert pages.unseal(token, "followers/7") == b"\x00\x01key"
    assert token.isascii() and "=" not in token and len(token) < 64


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("not a token", "page_token is not a token this service made"),
        ("", "page_token is not a token this service made"),
        ("A" * 300, "page_token is 300 characters; a token is at most 256"),
    ],
)
def test_a_token_that_is_not_ours_is_refused_naming_the_field(token: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        pages.unseal(token, "followers/7")


def test_a_changed_or_cut_token_is_refused() -> None:
    token = pages.seal("followers/7", (12345).to_bytes(8, "big"))
    for bad in (token[:-2], token[:5] + ("B" if token[5] != "B" else "C") + token[6:], token + "AA"):
        with pytest.raises(InvalidArgument, match="not a token this service made"):
            pages.unseal(bad, "followers/7")


def test_another_requests_token_is_refused() -> None:
    token = pages.seal("followers/7", b"k")
    with pytest.raises(InvalidArgument, match="page_token belongs to another request"):
        pages.unseal(token, "followers/8")
    with pytest.raises(InvalidArgument, match="resume_cursor belongs to another request"):
        pages.unseal(token, "inbox/7", "resume_cursor")


def test_page_size_zero_is_the_default_and_a_large_one_is_clamped() -> None:
    assert pages.page_size(0, 50, 500) == 50
    assert pages.page_size(7, 50, 500) == 7
    assert pages.page_size(10_000, 50, 500) == 500
    with pytest.raises(InvalidArgument, match="page_size must not be negative, not -1"):
        pages.page_size(-1, 50, 500)


def _live(book: RoomBook, room_id: str, started_ms: int) -> None:
    book.apply(
        Room(room_id=room_id, host_id=1, state=RoomState.ROOM_STATE_LIVE, started_at_ms=started_ms, version=1)
    )


def _pages(book: RoomBook, size: int, between: list[str] | None = None) -> list[str]:
    seen: list[str] = []
    after = None
    while True:
        page, more = book.live_page(after, size)
        seen += [r.room_id for r in page]
        if not more:
            return seen
        after = live_order(page[-1])
        if between is not None:  # rooms start while the reader pages
            for _ in range(3):
                room_id = f"new{len(between)}"
                between.append(room_id)
                _live(book, room_id, 10_000 + len(between))


def test_live_pages_hold_every_room_once_newest_first_ties_by_id() -> None:
    book = RoomBook()
    rng = random.Random(5)
    for i in range(1_234):
        _live(book, f"r{i:04}", rng.randrange(100))  # many rooms started in the same millisecond
    listed = _pages(book, 50)
    assert len(listed) == len(set(listed)) == 1_234
    assert listed == [r.room_id for r in book.live()]
    assert [r.room_id for r in book.live()] == [r.room_id for r in sorted(book.live(), key=live_order)]


def test_rooms_started_while_paging_shift_no_page() -> None:
    """By key, not offset: an offset would list the last room of each page again as new rooms arrive."""
    book = RoomBook()
    for i in range(600):
        _live(book, f"r{i:04}", 1_000 + i // 7)
    before = [r.room_id for r in book.live()]
    started: list[str] = []
    listed = _pages(book, 100, started)
    assert started, "rooms started between pages"
    assert listed == before, "every room live throughout, once, in order; the new ones sort before the pages"


def test_an_ended_room_drops_out_without_moving_the_next_page() -> None:
    book = RoomBook()
    for i in range(10):
        _live(book, f"r{i}", 100 - i)
    page, more = book.live_page(None, 4)
    assert [r.room_id for r in page] == ["r0", "r1", "r2", "r3"] and more
    book.apply(Room(room_id="r2", host_id=1, state=RoomState.ROOM_STATE_ENDED, version=2))
    page, more = book.live_page(live_order(page[-1]), 4)
    assert [r.room_id for r in page] == ["r4", "r5", "r6", "r7"] and more
    page, more = book.live_page(live_order(page[-1]), 4)
    assert ([r.room_id for r in page], more) == (["r8", "r9"], False)
    # A newer version of a live room keeps its place; a forgotten room leaves the index.
    book.apply(
        Room(
            room_id="r5", host_id=1, state=RoomState.ROOM_STATE_LIVE, started_at_ms=95, version=2, crowd=True
        )
    )
    book.forget("r8")
    assert [(r.room_id, r.crowd) for r in book.live()][3:6] == [("r4", False), ("r5", True), ("r6", False)]
    assert (book.live_count(), [r.room_id for r in book.live()][-1]) == (8, "r9")
