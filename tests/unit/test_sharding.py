"""Rendezvous hashing: stable owners, and a membership change moves only the affected keys."""

from townhall.core.sharding import owner, ranked

KEYS = [f"room-{i}" for i in range(3000)]


def test_owner_is_stable_and_spread() -> None:
    members = ["a", "b", "c"]
    owners = [owner(k, members) for k in KEYS]
    assert owners == [owner(k, list(reversed(members))) for k in KEYS], "order of members must not matter"
    for m in members:
        assert 800 < owners.count(m) < 1200, "keys spread roughly evenly"


def test_member_joining_takes_keys_only_from_others_for_itself() -> None:
    before = {k: owner(k, ["a", "b", "c"]) for k in KEYS}
    after = {k: owner(k, ["a", "b", "c", "d"]) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "d" for k in moved), "a key moves only to the new member"
    assert 550 < len(moved) < 950, "about a quarter of the keys move"


def test_member_leaving_moves_only_its_keys() -> None:
    before = {k: owner(k, ["a", "b", "c"]) for k in KEYS}
    after = {k: owner(k, ["a", "c"]) for k in KEYS}
    assert all(before[k] == "b" for k in KEYS if before[k] != after[k])


def test_ranked_starts_with_the_owner() -> None:
    assert all(ranked(k, ["x", "y", "z"])[0] == owner(k, ["x", "y", "z"]) for k in KEYS[:100])
