"""Fan-out planning: sorted follower blocks become per-shard batches of at most N users."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from townhall.notifier.records import SHARDS, shard_key


@dataclass(frozen=True)
class Batch:
    """Users of one shard to notify in one record."""

    shard: int
    user_ids: np.ndarray

    @property
    def key(self) -> bytes:
        """The record key: the shard as decimal text."""
        return shard_key(self.shard)


def split_by_shard(ids: np.ndarray, shards: int = SHARDS) -> dict[int, np.ndarray]:
    """`ids` grouped by user shard, each group in the order the ids came in."""
    if not len(ids):
        return {}
    shard = ids % np.uint64(shards)
    # A stable sort by shard keeps each group ascending when the block is ascending.
    order = np.argsort(shard, kind="stable")
    grouped, shard = ids[order], shard[order]
    cuts = np.flatnonzero(np.diff(shard)) + 1
    starts = np.concatenate(([0], cuts))
    return {int(shard[s]): part for s, part in zip(starts, np.split(grouped, cuts), strict=True)}


class ShardBatcher:
    """Collects follower blocks into full per-shard batches; `flush` returns the partial rest.

    Holding back partial batches across blocks keeps records full (one record per
    `batch_users` followers, not one per shard per block); at most shards x batch_users ids wait.
    """

    def __init__(self, batch_users: int, shards: int = SHARDS) -> None:
        if batch_users <= 0:
            raise ValueError(f"batch_users must be positive, not {batch_users}")
        self._batch_users = batch_users
        self._shards = shards
        self._pending: dict[int, list[np.ndarray]] = {}
        self._sizes: dict[int, int] = {}

    def add(self, block: np.ndarray) -> list[Batch]:
        """Takes a block of follower ids; returns the batches that are now full."""
        full: list[Batch] = []
        size = self._batch_users
        for shard, ids in split_by_shard(block, self._shards).items():
            parts = self._pending.setdefault(shard, [])
            parts.append(ids)
            waiting = self._sizes.get(shard, 0) + len(ids)
            if waiting >= size:
                joined = np.concatenate(parts)
                ready = waiting - waiting % size
                full += [Batch(shard, joined[i : i + size]) for i in range(0, ready, size)]
                rest = joined[ready:]
                self._pending[shard] = [rest] if len(rest) else []
                waiting = len(rest)
            self._sizes[shard] = waiting
        return full

    def flush(self) -> list[Batch]:
        """The partial batches still waiting, in shard order; the batcher is empty afterwards."""
        rest = [
            Batch(shard, np.concatenate(parts)) for shard, parts in sorted(self._pending.items()) if parts
        ]
        self._pending.clear()
        self._sizes.clear()
        return rest


def plan(blocks: list[np.ndarray], batch_users: int, shards: int = SHARDS) -> list[Batch]:
    """Every batch for a whole follower list given as blocks (for tests and small lists)."""
    batcher = ShardBatcher(batch_users, shards)
    batches = [batch for block in blocks for batch in batcher.add(block)]
    return batches + batcher.flush()
