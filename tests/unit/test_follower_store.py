"""The embedded follower store: edges, counts, sorted block reads, and surviving a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from townhall.notifier.store import FollowerStore, SqliteFollowerStore

MAX_ID = 2**63 - 1


async def _all(store: FollowerStore, followee: int, block: int) -> list[np.ndarray]:
    return [b async for b in store.followers(followee, block)]


async def test_follow_unfollow_count_and_idempotency(store: SqliteFollowerStore) -> None:
    assert await store.follow(1, 2) is True
    assert await store.follow(1, 2) is False
    assert await store.follow(1, 3) is True
    assert await store.follow(9, 2) is True
    assert await store.count(1) == 2
    assert await store.count(9) == 1
    assert await store.count(42) == 0
    assert await store.total() == 3

    assert await store.unfollow(1, 2) is True
    assert await store.unfollow(1, 2) is False
    assert await store.unfollow(1, 777) is False
    assert await store.count(1) == 1
    assert await store.unfollow(1, 3) is True
    assert await store.count(1) == 0
    assert await store.total() == 1


async def test_followers_come_sorted_in_blocks_as_uint64(store: SqliteFollowerStore) -> None:
    rng = np.random.default_rng(7)
    ids = {int(x) for x in rng.integers(1, MAX_ID, size=250, dtype=np.int64)} | {1, MAX_ID}
    for follower in ids:
        await store.follow(5, follower)
    await store.follow(6, 3)  # another followee's edge must not leak in

    blocks = await _all(store, 5, block=64)

    assert [len(b) for b in blocks[:-1]] == [64] * (len(blocks) - 1)
    assert 0 < len(blocks[-1]) <= 64
    assert all(b.dtype == np.uint64 for b in blocks)
    joined = np.concatenate(blocks)
    assert joined.tolist() == sorted(ids)
    assert await store.count(5) == len(ids)


async def test_block_boundary_and_empty(store: SqliteFollowerStore) -> None:
    for follower in range(1, 11):
        await store.follow(8, follower)
    assert [b.tolist() for b in await _all(store, 8, block=5)] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert await _all(store, 99, block=5) == []


async def test_graph_survives_reopen_from_the_same_folder(tmp_path: Path) -> None:
    first = SqliteFollowerStore(tmp_path)
    await first.open()
    for follower in (30, 10, 20):
        await first.follow(4, follower)
    await first.unfollow(4, 20)
    await first.close()

    second = SqliteFollowerStore(tmp_path)
    await second.open()
    try:
        assert await second.count(4) == 2
        assert [b.tolist() for b in await _all(second, 4, block=10)] == [[10, 30]]
        assert await second.follow(4, 10) is False
    finally:
        await second.close()


async def test_use_before_open_is_a_clear_error(tmp_path: Path) -> None:
    s = SqliteFollowerStore(tmp_path)
    with pytest.raises(RuntimeError, match="not open"):
        await s.count(1)
    await s.close()
    await s.close()
