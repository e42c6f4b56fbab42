"""Relay discovery: which relays admission probes and places on, from reports and probes (no network)."""

from __future__ import annotations

import pytest

from townhall.admission.placement import Load, Placer
from townhall.admission.relays import RelayDirectory
from townhall.core.errors import Unavailable
from townhall.core.liveness import Liveness, Probe

SEED = "seed:50052"
NEW = "relay-5.relays:50052"
QUIET_S = 15.0


def directory(seeds: tuple[str, ...] = (SEED,), limit: int = 8) -> RelayDirectory:
    return RelayDirectory(seeds, limit, QUIET_S)


def test_a_reporting_relay_is_probed_but_gets_listeners_only_once_a_probe_finds_it_serving() -> None:
    relays, liveness = directory(), Liveness(failures=2)
    assert relays.report(NEW, at=100.0, now=100.5)
    assert relays.targets() == [SEED, NEW]
    assert relays.placeable(liveness.is_up) == [SEED], "not probed yet: no listeners"
    liveness.record(NEW, Probe.NO_ANSWER)
    assert relays.placeable(liveness.is_up) == [SEED]
    liveness.record(NEW, Probe.SERVING)
    assert relays.placeable(liveness.is_up) == [SEED, NEW]
    liveness.record(NEW, Probe.NOT_SERVING)  # draining
    assert relays.placeable(liveness.is_up) == [SEED]


def test_old_reports_of_relays_long_gone_are_not_probed() -> None:
    relays = directory()
    assert not relays.report(NEW, at=100.0, now=100.0 + QUIET_S)
    assert not relays.report(SEED, at=100.0, now=100.0), "a seed is known already"
    assert relays.targets() == [SEED]


def test_a_relay_is_forgotten_only_when_quiet_and_not_answering() -> None:
    relays, liveness = directory(), Liveness(failures=1)
    relays.report(NEW, at=100.0, now=100.0)
    liveness.record(NEW, Probe.SERVING)
    assert relays.prune(liveness.is_up, now=100.0 + QUIET_S) == [], "quiet, but it answers"
    liveness.record(NEW, Probe.NO_ANSWER)
    assert relays.prune(liveness.is_up, now=101.0) == [], "down, but it reported recently"
    relays.report(NEW, at=110.0, now=110.0)
    assert relays.prune(liveness.is_up, now=110.0 + QUIET_S - 1) == []
    assert relays.prune(liveness.is_up, now=110.0 + QUIET_S) == [NEW]
    assert relays.targets() == [SEED]
    liveness.record(SEED, Probe.NO_ANSWER)
    assert relays.prune(liveness.is_up, now=1e9) == [], "seeds are never forgotten"


def test_a_goodbye_forgets_a_discovered_relay_at_once() -> None:
    relays = directory()
    relays.report(NEW, at=100.0, now=100.0)
    assert relays.gone(NEW)
    assert not relays.gone(SEED) and relays.targets() == [SEED]
    assert relays.report(NEW, at=130.0, now=130.0), "a relay that comes back is found again"


def test_the_set_is_bounded_and_a_full_set_ignores_new_relays() -> None:
    relays = directory(limit=3)
    assert relays.report("a:1", 0.0, 0.0) and relays.report("b:1", 0.0, 0.0)
    assert not relays.report("c:1", 0.0, 0.0)
    assert relays.ignored == 1 and len(relays) == 3
    relays.gone("a:1")
    assert relays.report("c:1", 1.0, 1.0), "room again once one is forgotten"
    with pytest.raises(ValueError):
        RelayDirectory(("a:1", "b:1"), 1, QUIET_S)


def test_without_seeds_and_without_a_serving_relay_a_placement_is_unavailable() -> None:
    placer = Placer([], edge_target=10, degree=4, default_capacity=100)
    assert not placer.available
    with pytest.raises(Unavailable, match="no relay is serving"):
        placer.place("room", on_stage=False, now=0.0)
    placer.set_relays([NEW])
    assert placer.available and placer.place("room", on_stage=False, now=0.0).relay == NEW


def test_forgetting_a_relay_drops_its_load_and_the_rooms_it_was_origin_of() -> None:
    placer = Placer([SEED, NEW], edge_target=10, degree=4, default_capacity=100)
    placer.observe(Load(NEW, 5, 100, at=1.0, rooms={"room": 5}, origins=frozenset({"room"})))
    assert placer.origin("room", now=1.0) == NEW and placer.total(NEW) == 5
    placer.forget(NEW)
    placer.set_relays([SEED])
    assert placer.total(NEW) == 0
    assert placer.origin("room", now=1.0) == SEED


def test_the_directory_maps_each_relay_to_its_internal_address() -> None:
    relays = RelayDirectory((SEED,), 8, QUIET_S, seeds_internal=("seed-internal:50072",))
    assert relays.internal(SEED) == "seed-internal:50072"
    assert relays.internal(NEW) == NEW, "unknown: its identity is all there is"
    relays.report(NEW, at=100.0, now=100.0, internal="10.0.0.5:50072")
    assert relays.internal(NEW) == "10.0.0.5:50072"
    version = relays.version
    relays.report(NEW, at=101.0, now=101.0, internal="10.0.0.9:50072")  # the pod came back on a new IP
    assert relays.internal(NEW) == "10.0.0.9:50072" and relays.version > version
    relays.report(SEED, at=101.0, now=101.0, internal="elsewhere:1")
    assert relays.internal(SEED) == "seed-internal:50072", "a seed's configured address stays"
    relays.gone(NEW)
    assert relays.internal(NEW) == NEW, "a forgotten relay's address goes with it"
    old = "relay-9:50052"
    relays.report(old, at=100.0, now=100.0 + QUIET_S, internal="10.0.0.7:50072")
    assert relays.internal(old) == old, "a report too old to probe teaches nothing"


def test_tickets_name_a_discovered_relays_internal_address_from_its_reports() -> None:
    from townhall.admission.joins import Admitter

    relays = RelayDirectory((SEED,), 8, QUIET_S, seeds_internal=("seed-internal:50072",))
    admitter = Admitter(None, None, relays, None, None, None, 1, None)  # type: ignore[arg-type]
    path = (SEED, NEW)
    assert admitter._internal_path(path) == ("seed-internal:50072", NEW), "not reported yet"
    relays.report(NEW, at=100.0, now=100.0, internal="relay-5.relays:50072")
    assert admitter._internal_path(path) == ("seed-internal:50072", "relay-5.relays:50072")


def test_an_admitter_given_a_directory_with_no_relay_yet_uses_it_as_relays_report() -> None:
    """In a cluster admission starts with no seed and learns every relay from its reports: the directory it
    hands the Admitter is empty (hence falsy) then, and must still be the one tickets are made from."""
    from townhall.admission.joins import Admitter

    relays = RelayDirectory((), 8, QUIET_S)
    admitter = Admitter(None, None, relays, None, None, None, 1, None)  # type: ignore[arg-type]
    relays.report(NEW, at=100.0, now=100.0, internal="relay-5.relays:50072")
    assert admitter._internal_path((NEW,)) == ("relay-5.relays:50072",), "tickets name the internal address"
