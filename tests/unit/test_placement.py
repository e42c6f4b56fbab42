"""Edge placement: packing a room's listeners onto edges, adding edges, mid-tier levels (no network)."""

from __future__ import annotations

from collections import Counter

import pytest

from townhall.admission.placement import CONNECT_S, MAX_UNSEEN, Load, Placer, Unseen, path
from townhall.core.sharding import ranked

RELAYS = [f"10.0.0.{i}:50052" for i in range(1, 21)]
ROOM = "hot-room"


def placer(relays: list[str] = RELAYS, target: int = 10, degree: int = 3, capacity: int = 1000) -> Placer:
    return Placer(relays, edge_target=target, degree=degree, default_capacity=capacity)


def test_small_room_stays_on_its_origin() -> None:
    p = placer()
    origin = ranked(ROOM, RELAYS)[0]
    placements = [p.place(ROOM, on_stage=False, now=0.0) for _ in range(10)]
    assert {x.relay for x in placements} == {origin}
    assert all(x.upstream == () for x in placements)


def test_listeners_are_packed_to_the_target_and_edges_added_as_the_audience_grows() -> None:
    p = placer(target=10)
    order = ranked(ROOM, RELAYS)
    counts = Counter(p.place(ROOM, on_stage=False, now=0.0).relay for _ in range(45))
    assert counts == {order[0]: 10, order[1]: 10, order[2]: 10, order[3]: 10, order[4]: 5}


def test_every_admission_process_packs_the_same_edges() -> None:
    a, b = placer(target=5), placer(target=5)
    edges_a = {a.place(ROOM, on_stage=False, now=0.0).relay for _ in range(12)}
    edges_b = {b.place(ROOM, on_stage=False, now=0.0).relay for _ in range(12)}
    assert edges_a == edges_b == set(ranked(ROOM, RELAYS)[:3])


def test_edges_pull_from_the_origin_then_through_a_mid_tier_beyond_its_degree() -> None:
    p = placer(target=1, degree=3)
    order = ranked(ROOM, RELAYS)
    placements = [p.place(ROOM, on_stage=False, now=0.0) for _ in range(8)]
    assert [x.relay for x in placements] == order[:8]
    assert [x.upstream for x in placements[1:4]] == [(order[0],)] * 3
    # Relays 4..6 hang under relay 1, relay 7 under relay 2: the origin feeds only `degree` relays.
    assert [x.upstream for x in placements[4:8]] == [(order[0], order[1])] * 3 + [(order[0], order[2])]


def test_tree_path_depth_grows_logarithmically() -> None:
    order = [f"r{i}" for i in range(100)]
    assert path(order, 0, 4) == ()
    assert path(order, 4, 4) == ("r0",)
    assert path(order, 5, 4) == ("r0", "r1")
    assert path(order, 21, 4) == ("r0", "r1", "r5")


def test_the_stage_always_goes_to_the_origin() -> None:
    p = placer(target=1)
    for _ in range(5):
        p.place(ROOM, on_stage=False, now=0.0)
    stage = p.place(ROOM, on_stage=True, now=0.0)
    assert stage.relay == ranked(ROOM, RELAYS)[0]
    assert stage.upstream == ()


def test_reports_replace_the_local_count_and_fill_holes_left_by_listeners() -> None:
    p = placer(target=10)
    order = ranked(ROOM, RELAYS)
    for _ in range(20):
        p.place(ROOM, on_stage=False, now=0.0)
    # Half the origin's listeners left; its report, made once they all had time to connect, says so, and
    # new listeners fill it first.
    at = CONNECT_S + 1.0
    p.observe(Load(order[0], listeners=5, capacity=1000, at=at, rooms={ROOM: 5}))
    p.observe(Load(order[1], listeners=10, capacity=1000, at=at, rooms={ROOM: 10}))
    assert [p.place(ROOM, on_stage=False, now=at).relay for _ in range(6)] == [order[0]] * 5 + [order[2]]


def placed_on_three(placed: int) -> tuple[Placer, list[str], list[str]]:
    """A placer over 3 relays at 3 listeners per relay, the room's order, and `placed` placements at 0 s."""
    relays = RELAYS[:3]
    p = placer(relays, target=3)
    return p, ranked(ROOM, relays), [p.place(ROOM, on_stage=False, now=0.0).relay for _ in range(placed)]


def test_a_report_made_while_placed_listeners_connect_still_counts_them() -> None:
    p, order, first = placed_on_three(3)
    # The origin reports before any of them subscribed (they connect after their Join): its report does
    # not know them, and they still fill the origin.
    p.observe(Load(order[0], listeners=0, capacity=1000, at=0.5))
    rest = [p.place(ROOM, on_stage=False, now=0.6).relay for _ in range(6)]
    assert Counter(first + rest) == {order[0]: 3, order[1]: 3, order[2]: 3}


def test_placed_listeners_the_report_shows_are_not_counted_twice() -> None:
    p, order, _ = placed_on_three(2)
    p.observe(Load(order[0], listeners=7, capacity=1000, at=0.5, rooms={ROOM: 2, "other": 5}))
    assert p.carried(order[0], ROOM) == 2
    assert p.total(order[0]) == 7
    assert p.place(ROOM, on_stage=False, now=0.6).relay == order[0]  # 2 of 3: one more fits


def test_placed_listeners_that_never_connected_stop_counting_once_they_had_time_to() -> None:
    p, order, _ = placed_on_three(3)
    p.observe(Load(order[0], listeners=0, capacity=1000, at=CONNECT_S - 0.1))
    assert p.carried(order[0], ROOM) == 3
    p.observe(Load(order[0], listeners=0, capacity=1000, at=CONNECT_S + 0.1))
    assert p.carried(order[0], ROOM) == 0
    assert p.place(ROOM, on_stage=False, now=CONNECT_S + 0.2).relay == order[0]


def test_placements_waiting_for_a_report_are_bounded_per_relay() -> None:
    unseen = Unseen()
    for i in range(MAX_UNSEEN + 5):
        unseen.add(float(i), f"room-{i % 7}", 0, 0)
    assert unseen.total(0) == MAX_UNSEEN
    assert sum(unseen.room(f"room-{i}", 0) for i in range(7)) == MAX_UNSEEN


def test_a_full_relay_gets_no_listeners_but_still_forwards() -> None:
    p = placer(target=10, degree=2)
    order = ranked(ROOM, RELAYS)
    p.observe(Load(order[1], listeners=1000, capacity=1000, at=0.0, rooms={"other": 1000}))
    placements = [p.place(ROOM, on_stage=False, now=0.0) for _ in range(30)]
    assert order[1] not in {x.relay for x in placements}
    # order[3] is below order[1] in the tree: the full relay is still its mid-tier.
    assert next(x for x in placements if x.relay == order[3]).upstream == (order[0], order[1])


def test_a_relay_that_stopped_reporting_is_left_out() -> None:
    p = placer(target=10)
    origin = ranked(ROOM, RELAYS)[0]
    p.observe(Load(origin, listeners=0, capacity=1000, at=0.0))
    assert p.place(ROOM, on_stage=True, now=5.0).relay == origin
    assert p.place(ROOM, on_stage=True, now=60.0).relay == ranked(ROOM, [r for r in RELAYS if r != origin])[0]


def test_when_every_edge_holds_its_target_the_excess_is_spread_evenly() -> None:
    relays = RELAYS[:3]
    p = placer(relays, target=2, capacity=1000)
    counts = Counter(p.place(ROOM, on_stage=False, now=0.0).relay for _ in range(12))
    assert sorted(counts.values()) == [4, 4, 4]


def test_when_every_relay_is_full_the_least_loaded_is_chosen() -> None:
    relays = RELAYS[:2]
    p = placer(relays, target=5)
    p.observe(Load(relays[0], listeners=900, capacity=900, at=0.0))
    p.observe(Load(relays[1], listeners=1000, capacity=800, at=0.0))
    assert p.place(ROOM, on_stage=False, now=0.0).relay == relays[0]


def test_bad_shape_is_refused() -> None:
    with pytest.raises(ValueError):
        Placer(RELAYS, edge_target=10, degree=1, default_capacity=100)


def test_a_relay_probed_down_gets_no_listeners_and_the_next_one_is_the_origin() -> None:
    p = placer(target=2)
    order = ranked(ROOM, RELAYS)
    p.set_up(set(RELAYS) - {order[0]})
    assert p.origin(ROOM, 0.0) == order[1]
    placed = [p.place(ROOM, on_stage=False, now=0.0) for _ in range(3)]
    assert [x.relay for x in placed] == [order[1], order[1], order[2]]
    assert placed[2].upstream == (order[1],)
    p.set_up(RELAYS)
    assert p.origin(ROOM, 0.0) == order[0]


def test_a_rooms_origin_stays_where_its_speakers_moved_when_the_old_origin_returns() -> None:
    p = placer(target=2)
    order = ranked(ROOM, RELAYS)
    p.set_up(set(RELAYS) - {order[0]})
    # The speakers moved to order[1], which now reports itself as the room's origin.
    p.observe(Load(order[1], 1, 1000, at=1.0, rooms={ROOM: 1}, origins=frozenset({ROOM})))
    p.set_up(RELAYS)  # the old origin is back (restarted)
    assert p.origin(ROOM, 2.0) == order[1]
    assert p.place(ROOM, on_stage=False, now=2.0).relay == order[1]
    # Its next report no longer names the room (the room ended there): rendezvous order again.
    p.observe(Load(order[1], 0, 1000, at=3.0))
    assert p.origin(ROOM, 3.0) == order[0]


def test_a_claimed_origin_that_is_down_is_skipped() -> None:
    p = placer()
    order = ranked(ROOM, RELAYS)
    p.observe(Load(order[3], 1, 1000, at=1.0, origins=frozenset({ROOM})))
    assert p.origin(ROOM, 1.0) == order[3]
    p.set_up(set(RELAYS) - {order[3]})
    assert p.origin(ROOM, 1.0) == order[0]


def test_a_relay_not_probed_yet_gets_no_listeners_until_a_probe_finds_it_serving() -> None:
    p = placer(RELAYS[:2], target=1)
    p.set_up(RELAYS[:2])
    p.set_relays(RELAYS[:3])  # a relay was discovered: not probed yet
    assert {p.place(ROOM, on_stage=False, now=0.0).relay for _ in range(6)} <= set(RELAYS[:2])
    p.set_up(RELAYS[:3])
    assert RELAYS[2] in {p.place(ROOM, on_stage=False, now=1.0).relay for _ in range(12)}


def test_a_relay_that_lost_a_rooms_upstream_is_passed_over_for_the_room_until_its_report_clears() -> None:
    p = placer(target=1, degree=2)
    order = ranked(ROOM, RELAYS)
    other = next(room for room in (f"room-{i}" for i in range(100)) if ranked(room, RELAYS)[1] == order[1])
    cut = order[1]  # the room's first edge, which can no longer reach the origin
    p.observe(Load(cut, 0, 1000, at=1.0, lost=frozenset({ROOM})))
    placed = [p.place(ROOM, on_stage=False, now=1.0) for _ in range(4)]
    assert cut not in {x.relay for x in placed}
    assert [x.relay for x in placed] == [order[0], order[2], order[3], order[4]]
    # Nor in the tree above them: order[4] would pull through the cut edge, it pulls via order[2] now.
    assert all(cut not in x.upstream for x in placed)
    assert placed[3].upstream == (order[0], order[2])
    assert p.place(ROOM, on_stage=True, now=1.0).relay == order[0]
    # The cut edge still gets listeners of its other rooms.
    assert p.place(other, on_stage=False, now=1.0).relay == ranked(other, RELAYS)[0]
    assert p.place(other, on_stage=False, now=1.0).relay == cut
    # Its next report no longer names the room (its pull works again): it is the room's first edge again.
    p.observe(Load(cut, 0, 1000, at=2.0))
    assert p.place(ROOM, on_stage=False, now=2.0).relay == cut
    # A relay forgotten while its report named a room forgets that too.
    p.observe(Load(cut, 0, 1000, at=3.0, lost=frozenset({ROOM})))
    p.forget(cut)
    assert p.place(ROOM, on_stage=False, now=3.0).relay == cut


def test_relays_that_lost_a_room_get_its_listeners_last_when_every_other_relay_holds_its_share() -> None:
    # Every edge of the room lost it (its origin died): the room's new tree is built from them anyway.
    relays = RELAYS[:3]
    p = placer(relays, target=1, degree=2)
    order = ranked(ROOM, relays)
    for relay in order[1:]:
        p.observe(Load(relay, 0, 1000, at=1.0, lost=frozenset({ROOM})))
    placed = [p.place(ROOM, on_stage=False, now=1.0) for _ in range(3)]
    assert [x.relay for x in placed] == order
    assert [x.upstream for x in placed] == [(), (order[0],), (order[0],)]


def test_a_lost_room_keeps_its_origin_when_the_origin_reports_it_lost() -> None:
    # The origin first in the order names the room lost: it was an edge of an origin that died, and
    # takes the room over when a ticket names no upstream. It stays the room's origin.
    p = placer(target=1, degree=2)
    order = ranked(ROOM, RELAYS)
    p.observe(Load(order[0], 0, 1000, at=1.0, lost=frozenset({ROOM})))
    assert p.place(ROOM, on_stage=False, now=1.0).relay == order[0]
    assert p.place(ROOM, on_stage=True, now=1.0).relay == order[0]
