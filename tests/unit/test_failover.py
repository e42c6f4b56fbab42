"""Host failover decisions (admission/failover.py): presence from relay reports, grace periods, verdicts."""

from __future__ import annotations

from tests.unit import stage_helpers
from townhall.admission import stage
from townhall.admission.failover import END, HAND_OVER, HostWatch, StagePresence, Verdict
from townhall.internal.v1.events_pb2 import Leads, RelayLoad
from townhall.v1.common_pb2 import Room

HOST, COHOST, COHOST2 = 1, 2, 4
GRACE = 10.0


def live_room(cohosts: tuple[int, ...] = (COHOST, COHOST2)) -> Room:
    return stage_helpers.live_room(HOST, cohosts)


def test_presence_is_the_union_of_fresh_reports_and_unknown_without_any() -> None:
    presence = StagePresence(fresh_s=3.0)
    assert presence.present("r", now_s=100.0) is None
    presence.observe("relay-a", 100.0, {"r": [HOST]})
    presence.observe("relay-b", 101.0, {"r": [COHOST], "other": [9]})
    assert presence.present("r", 102.0) == {HOST, COHOST}
    assert presence.present("quiet", 102.0) == set(), "relays report: the room's leads are gone"
    assert presence.present("r", 103.5) == {COHOST}, "relay-a's report is stale: its streams are gone"
    assert presence.present("r", 200.0) is None, "no relay has reported lately: nobody can tell"
    presence.observe("relay-b", 90.0, {})  # an older report than held is ignored
    assert presence.present("r", 102.0) == {HOST, COHOST}


def test_presence_reads_the_relay_load_record() -> None:
    presence = StagePresence(fresh_s=3.0)
    presence.observe_report(RelayLoad(relay="a", at_ms=5_000, leads={"r": Leads(user_ids=[HOST, COHOST])}))
    assert presence.present("r", 6.0) == {HOST, COHOST}


def test_a_host_gone_for_the_grace_period_hands_the_room_to_the_first_connected_co_host() -> None:
    room, watch = live_room(), HostWatch(GRACE)
    assert watch.verdict(room, {HOST}, now=0.0) is None
    assert watch.verdict(room, {HOST, COHOST2}, now=5.0) is None
    assert watch.verdict(room, {COHOST2}, now=6.0) is None, "first seen gone"
    assert watch.verdict(room, {COHOST2}, now=15.9) is None, "gone for 9.9 s of 10"
    assert watch.verdict(room, {COHOST2}, now=16.0) == Verdict(HAND_OVER, COHOST2)
    handed = stage.hand_over(room, COHOST2)
    assert watch.verdict(handed, {COHOST2}, now=16.5) is None, "the new host is here"


def test_a_host_who_comes_back_within_the_grace_period_keeps_the_room() -> None:
    room, watch = live_room(), HostWatch(GRACE)
    watch.verdict(room, {HOST}, now=0.0)
    watch.verdict(room, {COHOST}, now=1.0)
    assert watch.verdict(room, {HOST, COHOST}, now=9.0) is None
    assert watch.verdict(room, {COHOST}, now=10.0) is None
    assert watch.verdict(room, {COHOST}, now=19.0) is None, "the clock restarted when the host came back"
    assert watch.verdict(room, {COHOST}, now=20.0) == Verdict(HAND_OVER, COHOST)


def test_a_room_with_neither_host_nor_co_host_connected_ends_after_the_grace_period() -> None:
    room, watch = live_room(), HostWatch(GRACE)
    watch.verdict(room, {HOST, COHOST}, now=0.0)
    assert watch.verdict(room, set(), now=1.0) is None
    assert watch.verdict(room, set(), now=10.0) is None
    assert watch.verdict(room, set(), now=11.0) == Verdict(END)
    alone, solo = live_room(cohosts=()), HostWatch(GRACE)
    solo.verdict(alone, {HOST}, now=0.0)
    solo.verdict(alone, set(), now=1.0)
    assert solo.verdict(alone, set(), now=11.0) == Verdict(END), "no co-host to take over"


def test_a_co_host_who_is_gone_too_cannot_take_over_and_the_room_ends_once_everyone_is() -> None:
    room, watch = live_room(), HostWatch(GRACE)
    watch.verdict(room, {COHOST}, now=0.0)  # the host is gone from the first look
    watch.verdict(room, set(), now=5.0)  # and the co-host from here
    assert watch.verdict(room, set(), now=12.0) is None, "the host is long gone, but no co-host is here"
    assert watch.verdict(room, set(), now=15.0) == Verdict(END)


def test_a_room_whose_host_never_connects_ends_a_grace_period_after_it_is_first_watched() -> None:
    room, watch = live_room(cohosts=()), HostWatch(GRACE)
    assert watch.verdict(room, set(), now=100.0) is None
    assert watch.verdict(room, set(), now=109.0) is None
    assert watch.verdict(room, set(), now=110.0) == Verdict(END)


def test_without_relay_reports_the_clocks_wait_instead_of_ending_rooms() -> None:
    room, watch = live_room(), HostWatch(GRACE)
    watch.verdict(room, set(), now=0.0)
    assert watch.verdict(room, None, now=50.0) is None
    assert watch.verdict(room, set(), now=51.0) is None, "absence counts again from when reports came back"
    assert watch.verdict(room, set(), now=60.0) is None
    assert watch.verdict(room, set(), now=61.0) == Verdict(END)


def test_rooms_no_longer_watched_are_forgotten_and_start_afresh() -> None:
    room, watch = live_room(), HostWatch(GRACE)
    watch.verdict(room, set(), now=0.0)
    watch.keep([])
    assert watch.verdict(room, set(), now=20.0) is None, "a new owner gives a full grace period"
    assert watch.verdict(room, set(), now=30.0) == Verdict(END)
