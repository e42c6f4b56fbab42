"""Moving graph keys between notifiers: the store's side (markers, export, release), who may hold a key,
and the StatefulSet membership (no network: a fake Kubernetes API)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from townhall.core import sharding
from townhall.core.config import ConfigError
from townhall.core.config import load as load_config
from townhall.notifier.handover import Handover, View
from townhall.notifier.membership import StatefulSetMembership
from townhall.notifier.placement import ShardOwners
from townhall.notifier.store import Moved, SqliteFollowerStore, followee_key, room_key


async def ids_of(store: SqliteFollowerStore, key: str) -> list[int]:
    return [int(i) for ids in [x async for x in store.export(key)] for i in ids]


async def test_a_key_handed_over_refuses_every_read_and_write_until_taken_back(
    store: SqliteFollowerStore,
) -> None:
    await store.import_edges(np.array([[7, u] for u in range(1, 5001)], dtype=np.uint64))
    await store.remind("room-1", 42)
    assert not store.has_markers
    await store.mark_moved(followee_key(7), "b:1", 3)
    await store.mark_moved(room_key("room-1"), "b:1", 3)
    assert store.has_markers
    for call in (
        store.follow(7, 9),
        store.unfollow(7, 1),
        store.count(7),
        store.page(7, 0, 10),
        store.import_edges(np.array([[7, 6000]], dtype=np.uint64)),
        store.remind("room-1", 43),
    ):
        with pytest.raises(Moved) as moved:
            await call
        assert (moved.value.owner, moved.value.epoch) == ("b:1", 3)
    with pytest.raises(Moved):
        [x async for x in store.stored_blocks(7)]
    with pytest.raises(Moved):
        [x async for x in store.reminded("room-1")]
    assert await store.follow(8, 1), "other keys are untouched"
    # The new owner reads it all (unchecked), then has it dropped here.
    assert await ids_of(store, followee_key(7)) == list(range(1, 5001))
    assert await ids_of(store, room_key("room-1")) == [42]
    assert await store.release(followee_key(7), "c:1") == 0, "only the key's new owner releases it"
    assert await store.release(followee_key(7), "b:1") == 5000
    assert await store.release(room_key("room-1"), "b:1") == 1
    assert not await store.holds(followee_key(7)) and not await store.holds(room_key("room-1"))
    await store.unmark(followee_key(7))
    assert await store.count(7) == 0 and await store.follow(7, 1)


async def test_a_key_taken_in_merges_with_what_is_here(store: SqliteFollowerStore) -> None:
    await store.follow(7, 3)
    assert await store.take_in(followee_key(7), np.array([1, 2, 3], dtype=np.uint64)) == 2
    assert await store.count(7) == 3
    assert await store.take_in(room_key("r"), np.array([5, 6], dtype=np.uint64)) == 2
    assert [int(i) for a in [x async for x in store.reminded("r")] for i in a] == [5, 6]
    with pytest.raises(ValueError, match="not a graph key"):
        await store.take_in("user:x", np.array([1], dtype=np.uint64))


async def test_keys_are_scanned_followees_first_then_rooms(store: SqliteFollowerStore) -> None:
    for followee in (5, 3, 9):
        await store.follow(followee, 1)
    await store.remind("b", 1)
    await store.remind("a", 2)
    keys = ["user:3", "user:5", "user:9", "room:a", "room:b"]
    assert await store.keys_after("") == keys
    assert await store.keys_after("", limit=2) == keys[:2]
    assert await store.keys_after("user:5", limit=2) == keys[2:4]
    assert await store.keys_after("room:a") == keys[4:]


async def test_markers_survive_a_restart(tmp_path: Path) -> None:
    first = SqliteFollowerStore(tmp_path)
    await first.open()
    await first.follow(7, 1)
    await first.mark_moved(followee_key(7), "b:1", 2)
    await first.set_meta("view", "kept")
    await first.close()
    again = SqliteFollowerStore(tmp_path)
    await again.open()
    try:
        assert again.has_markers and await again.moved_to(followee_key(7)) == ("b:1", 2)
        assert await again.meta("view") == "kept"
        with pytest.raises(Moved):
            await again.count(7)
    finally:
        await again.close()


def test_placement_follows_a_new_view() -> None:
    placement = ShardOwners("a:1", ["a:1", "b:1"], epoch=1)
    assert not placement.alone
    assert placement.set_view(["b:1", "a:1", "c:1"], 2)
    assert not placement.set_view(["a:1", "b:1", "c:1"], 2)
    assert placement.members == ("a:1", "b:1", "c:1") and placement.epoch == 2
    key = followee_key(12345)
    assert placement.owner(key) == sharding.owner(key, ["a:1", "b:1", "c:1"])
    placement.set_view(["b:1", "c:1"], 3)  # scaled away: a owns nothing
    assert not any(placement.owns(followee_key(f)) for f in range(1, 200))
    assert ShardOwners("a:1", []).owns(key), "with no members a notifier holds everything"


async def test_who_may_still_hold_a_key(store: SqliteFollowerStore) -> None:
    placement = ShardOwners("a:1", ["a:1", "b:1", "c:1"], epoch=3)
    handover = Handover(store, placement, peers=None, static=False)  # type: ignore[arg-type]
    handover._view = View(3, ("a:1", "b:1", "c:1"), ("a:1", "b:1", "d:1"), frozenset({"c:1"}), True)
    keys = [followee_key(f) for f in range(1, 400) if placement.owns(followee_key(f))]
    from_d = [k for k in keys if sharding.owner(k, ["a:1", "b:1", "d:1"]) == "d:1"]
    assert from_d and len(from_d) < len(keys)
    for key in keys:
        # b is not known to be drained; c is; d (scaled away) only for the keys it owned before.
        expected = ["b:1", "d:1"] if key in from_d else ["b:1"]
        assert handover.holders(key) == expected
    assert not handover.steady
    handover._view = View(
        3, ("a:1", "b:1", "c:1"), ("a:1", "b:1", "d:1"), frozenset({"b:1", "c:1", "d:1"}), True
    )
    assert handover.steady and all(handover.holders(k) == [] for k in keys)
    assert View.loads(handover._view.dumps()) == handover._view


class FakeApps:
    """What StatefulSetMembership reads of the Kubernetes API: one StatefulSet."""

    def __init__(self, replicas: int, generation: int) -> None:
        self.sts = SimpleNamespace(
            spec=SimpleNamespace(replicas=replicas), metadata=SimpleNamespace(generation=generation)
        )
        self.calls: list[tuple[Any, ...]] = []

    def read_namespaced_stateful_set(self, name: str, namespace: str, **kwargs: Any) -> Any:
        self.calls.append((name, namespace, kwargs))
        return self.sts


async def test_the_members_are_the_statefulsets_pods_by_their_stable_names() -> None:
    api = FakeApps(replicas=2, generation=4)
    membership = StatefulSetMembership(
        "th-notifier", "ns", "{pod}.th-notifier-headless.ns.svc:50053", api=api
    )
    members, epoch = await membership.read()
    assert members == [
        "th-notifier-0.th-notifier-headless.ns.svc:50053",
        "th-notifier-1.th-notifier-headless.ns.svc:50053",
    ]
    assert epoch == 4
    assert api.calls[0][:2] == ("th-notifier", "ns") and api.calls[0][2]["_request_timeout"] > 0
    api.sts.spec.replicas, api.sts.metadata.generation = 3, 5
    assert (await membership.read()) == (membership.members_of(3), 5)


def test_kubernetes_membership_needs_the_statefulset_and_a_pod_address() -> None:
    base = {"TOWNHALL_NOTIFIER_MEMBERSHIP": "kubernetes"}
    with pytest.raises(ConfigError, match="kube_statefulset"):
        load_config(env=base)
    with pytest.raises(ConfigError, match="kube_member"):
        load_config(
            env={**base, "TOWNHALL_NOTIFIER_KUBE_STATEFULSET": "n", "TOWNHALL_NOTIFIER_KUBE_MEMBER": "x:1"}
        )
    config = load_config(
        env={
            **base,
            "TOWNHALL_NOTIFIER_KUBE_STATEFULSET": "n",
            "TOWNHALL_NOTIFIER_KUBE_MEMBER": "{pod}.n-headless.ns.svc:50053",
            "TOWNHALL_NOTIFIER_ADVERTISE": "n-0.n-headless.ns.svc:50053",
        }
    )
    assert config.notifier.membership == "kubernetes"


def test_a_call_forwarded_again_while_views_differ_counts_its_hops() -> None:
    import contextvars

    from townhall.core.auth import Authenticator
    from townhall.core.config import DEV_AUTH
    from townhall.core.forwarding import HOPS_KEY, MAX_HOPS, Forwarding
    from townhall.core.identity import FORWARDED

    forwarding = Forwarding(Authenticator(DEV_AUTH, "notifier", "127.0.0.1:50073"))
    path = "/townhall.v1.Graph/Follow"
    assert HOPS_KEY not in dict(forwarding.forward_metadata((), "b:1", path))  # the usual single hop
    again = forwarding.forward_metadata((), "c:1", path, hops=2)
    assert dict(again)[HOPS_KEY] == "2"

    def hops(metadata: tuple[tuple[str, str], ...], forwarded: bool) -> int:
        context = SimpleNamespace(invocation_metadata=lambda: metadata)

        def run() -> int:
            FORWARDED.set(forwarded)
            return forwarding.hops(context)  # type: ignore[arg-type]

        return contextvars.copy_context().run(run)

    assert hops(again, forwarded=True) == 2
    assert hops(((HOPS_KEY, "2"),), forwarded=False) == 0, "a client's count means nothing"
    assert hops((), forwarded=True) == 1
    assert hops(((HOPS_KEY, "lots"),), forwarded=True) == MAX_HOPS, "a count that is not one ends it"


async def test_hearing_another_is_drained_during_a_sweep_does_not_undo_this_ones(
    store: SqliteFollowerStore,
) -> None:
    placement = ShardOwners("a:1", ["a:1", "b:1"], epoch=2)
    handover = Handover(store, placement, peers=None, static=False)  # type: ignore[arg-type]
    await handover.set_view(["a:1", "b:1"], 3)
    markers = store.markers

    async def heard_meanwhile() -> list[tuple[str, str, int]]:
        await handover.mark_drained("b:1", 3)  # b's announcement arrives while a sweeps
        return await markers()

    async def told_everyone(view: View) -> bool:
        return True

    store.markers = heard_meanwhile  # type: ignore[method-assign]
    handover._announce = told_everyone  # type: ignore[method-assign]
    assert await handover.sweep() == 0
    assert handover.drained and handover.known_drained(3) == ["a:1", "b:1"]
    assert await handover.wait_drained(0.1)
