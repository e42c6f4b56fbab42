"""Liveness: probe results become up/down, and the membership that owns rooms follows it (no network)."""

from __future__ import annotations

from townhall.core.liveness import Liveness, Probe
from townhall.core.membership import ProbedMembership, StaticMembership

ROOMS = [f"room-{i}" for i in range(3000)]
MEMBERS = ["a:1", "b:1", "c:1"]


def test_a_member_is_down_after_missed_probes_in_a_row_and_up_at_its_first_answer() -> None:
    live = Liveness(failures=2)
    assert live.record("a:1", Probe.SERVING)
    assert not live.record("a:1", Probe.NO_ANSWER), "one miss is not enough (a slow answer)"
    assert live.is_up("a:1")
    assert not live.record("a:1", Probe.SERVING), "an answer resets the count"
    live.record("a:1", Probe.NO_ANSWER)
    assert live.record("a:1", Probe.NO_ANSWER) and not live.is_up("a:1")
    assert live.record("a:1", Probe.SERVING) and live.is_up("a:1")


def test_a_draining_member_is_down_at_once_and_one_never_seen_up_stays_down() -> None:
    live = Liveness(failures=3)
    live.record("a:1", Probe.SERVING)
    assert live.record("a:1", Probe.NOT_SERVING) and not live.is_up("a:1")
    assert not live.record("b:1", Probe.NO_ANSWER), "never up: its first miss changes nothing"
    assert live.down() == {"a:1", "b:1"}
    live.record("c:1", Probe.SERVING)
    assert live.up(MEMBERS) == ["c:1"]


def test_a_member_not_probed_yet_is_not_up_until_it_answers_serving() -> None:
    live = Liveness(failures=2)
    assert not live.is_up("a:1") and live.up(MEMBERS) == []
    version = live.version
    assert not live.record("a:1", Probe.NOT_SERVING), "a starting pod answering NOT_SERVING stays out"
    assert live.version == version and not live.is_up("a:1")
    assert live.record("a:1", Probe.SERVING) and live.is_up("a:1") and live.version == version + 1


def test_a_member_that_appears_between_probe_rounds_owns_no_room_until_probed_serving() -> None:
    """A pod just listed by its Service (or by static config) takes no room before it answers."""
    live = Liveness(failures=1)
    for m in ["a:1", "b:1"]:
        live.record(m, Probe.SERVING)
    listed = StaticMembership("a:1", ["a:1", "b:1"])
    members = ProbedMembership(listed, live)
    before = {room: members.owner(room) for room in ROOMS}
    listed._members = sorted([*listed._members, "c:1"])  # the watch swaps in a new list
    assert members.members() == ["a:1", "b:1"]
    assert {room: members.owner(room) for room in ROOMS} == before
    live.record("c:1", Probe.NO_ANSWER)
    assert not any(members.owner(room) == "c:1" for room in ROOMS)
    live.record("c:1", Probe.SERVING)
    assert members.members() == ["a:1", "b:1", "c:1"]
    assert any(members.owner(room) == "c:1" for room in ROOMS)


def test_a_starting_process_owns_rooms_before_it_has_probed_anyone() -> None:
    """It never probes itself: counted from the start, it is never left without an owner for a room."""
    members = ProbedMembership(StaticMembership("a:1", MEMBERS), Liveness(failures=2))
    assert members.members() == ["a:1"]
    assert all(members.is_owner(room) for room in ROOMS[:100])


def test_the_version_moves_only_when_someone_goes_up_or_down() -> None:
    live = Liveness(failures=1)
    live.record("a:1", Probe.SERVING)
    version = live.version
    live.record("a:1", Probe.SERVING)
    assert live.version == version
    live.record("a:1", Probe.NO_ANSWER)
    assert live.version == version + 1


def serving(members: list[str], failures: int = 1) -> Liveness:
    """A Liveness that has seen every member answer SERVING."""
    live = Liveness(failures)
    for member in members:
        live.record(member, Probe.SERVING)
    return live


def test_a_dead_members_rooms_go_to_the_next_member_in_rendezvous_order_and_only_those() -> None:
    live = serving(MEMBERS)
    members = ProbedMembership(StaticMembership("a:1", MEMBERS), live)
    before = {room: members.owner(room) for room in ROOMS}
    live.record("c:1", Probe.NO_ANSWER)
    assert members.members() == ["a:1", "b:1"]
    moved = [room for room in ROOMS if members.owner(room) != before[room]]
    assert moved and all(before[room] == "c:1" for room in moved)
    assert all(members.owner(room) != "c:1" for room in ROOMS)
    live.record("c:1", Probe.SERVING)
    assert {room: members.owner(room) for room in ROOMS} == before, "it takes its rooms back"


def test_a_leaving_member_owns_nothing_unless_it_is_alone() -> None:
    live = serving(MEMBERS)
    members = ProbedMembership(StaticMembership("a:1", MEMBERS), live)
    members.leave()
    assert members.members() == ["b:1", "c:1"]
    assert not any(members.is_owner(room) for room in ROOMS)
    live.record("b:1", Probe.NO_ANSWER)
    live.record("c:1", Probe.NO_ANSWER)
    assert members.members() == ["a:1"], "no one to hand over to: it keeps its rooms"


def test_this_process_is_a_member_even_if_its_own_address_probes_down() -> None:
    live = serving(["b:1"])
    live.record("a:1", Probe.NO_ANSWER)
    members = ProbedMembership(StaticMembership("a:1", ["b:1"]), live)
    assert members.members() == ["a:1", "b:1"]


def test_a_busy_member_is_alive_for_a_while_then_down_and_up_again_when_it_serves() -> None:
    live = Liveness(failures=2, busy_failures=4)
    live.record("a:1", Probe.SERVING)
    for _ in range(3):
        assert not live.record("a:1", Probe.BUSY), "busy for a moment: rooms do not move"
    assert live.is_up("a:1")
    assert not live.record("a:1", Probe.SERVING)  # serving again: the count starts over
    for _ in range(3):
        live.record("a:1", Probe.BUSY)
    assert live.record("a:1", Probe.BUSY) and not live.is_up("a:1"), "refusing even its probes: down"
    assert not live.record("a:1", Probe.BUSY), "a busy answer does not bring it back"
    assert live.record("a:1", Probe.SERVING) and live.is_up("a:1")


def test_busy_answers_and_misses_add_up_but_an_answer_resets_the_misses() -> None:
    live = Liveness(failures=2, busy_failures=4)
    live.record("a:1", Probe.SERVING)
    for probe in (Probe.NO_ANSWER, Probe.BUSY, Probe.NO_ANSWER):
        live.record("a:1", probe)
    assert live.is_up("a:1"), "no two misses in a row: it answered in between"
    assert live.record("a:1", Probe.BUSY) and not live.is_up("a:1"), "four probes in a row not serving"
    live.record("b:1", Probe.BUSY)
    assert not live.is_up("b:1"), "never seen serving: busy does not make it up"
