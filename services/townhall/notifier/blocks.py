"""Sorted uint64 id blocks: packing, splitting, and grouping follow edges (pure numpy, no I/O)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Ids per stored block: 32 KiB of ids, small enough that a follow rewrites little, large enough
# that the per-row overhead is a fraction of a byte per edge.
BLOCK_IDS = 4096
MAX_ID = 2**63 - 1


def pack(ids: np.ndarray) -> bytes:
    """Ids as little-endian uint64 bytes (also the wire form of packed fixed64)."""
    return np.ascontiguousarray(ids, dtype="<u8").tobytes()


def unpack(blob: bytes) -> np.ndarray:
    """The uint64 ids of a packed blob (a copy, native byte order)."""
    return np.frombuffer(blob, dtype="<u8").astype(np.uint64)


def split(ids: np.ndarray, size: int = BLOCK_IDS) -> list[np.ndarray]:
    """Sorted `ids` cut into the fewest blocks of at most `size`, of nearly equal length."""
    if not len(ids):
        return []
    parts = -(-len(ids) // size)
    return list(np.array_split(ids, parts))


def distinct_sorted(ids: np.ndarray) -> np.ndarray:
    """`ids` sorted with repeats removed (np.unique hashes in numpy 2.x, which is slower here)."""
    out = np.sort(ids)
    if len(out) < 2:
        return out
    keep = np.empty(len(out), dtype=bool)
    keep[0] = True
    np.not_equal(out[1:], out[:-1], out=keep[1:])
    return out[keep]


def merge_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The sorted union of two sorted distinct arrays (a stable sort of two runs is a linear merge)."""
    both = np.concatenate((a, b))
    both.sort(kind="stable")
    if len(both) < 2:
        return both
    keep = np.empty(len(both), dtype=bool)
    keep[0] = True
    np.not_equal(both[1:], both[:-1], out=keep[1:])
    return both[keep]


def assign(starts: np.ndarray, new: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """For sorted block `starts` and sorted `new` ids: (block start, the new ids that belong in it).

    A block holds ids from its start up to the next block's start; ids below the first start
    go into the first block.
    """
    where = np.searchsorted(starts, new, side="right") - 1
    where[where < 0] = 0
    cuts = np.flatnonzero(np.diff(where)) + 1
    for part in np.split(np.arange(len(new)), cuts):
        yield int(starts[where[part[0]]]), new[part]


def group_pairs(pairs: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(followee, follower) rows -> distinct followees ascending, and each one's sorted distinct followers."""
    if not len(pairs):
        return np.empty(0, dtype=np.uint64), []
    # One sort on a structured view orders by followee, then follower.
    rows = np.ascontiguousarray(pairs, dtype=np.uint64)
    order = np.lexsort((rows[:, 1], rows[:, 0]))
    rows = rows[order]
    keep = np.ones(len(rows), dtype=bool)
    keep[1:] = (rows[1:, 0] != rows[:-1, 0]) | (rows[1:, 1] != rows[:-1, 1])
    rows = rows[keep]
    cuts = np.flatnonzero(np.diff(rows[:, 0])) + 1
    followees = rows[np.concatenate(([0], cuts)), 0]
    return followees, np.split(rows[:, 1], cuts)


def valid_pairs(pairs: np.ndarray) -> np.ndarray:
    """Which rows are usable edges: both ids within 1..2^63-1 and not a self-follow."""
    a, b = pairs[:, 0], pairs[:, 1]
    top = np.uint64(MAX_ID)
    return (a > 0) & (b > 0) & (a <= top) & (b <= top) & (a != b)


def shard_sorted(ids: np.ndarray, shards: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct `ids` ordered by (id % shards, id), and the index where each shard's run starts.

    `shards` must be a power of two: the shard is packed above the id's high bits so one sort
    of one uint64 array groups and orders everything.
    """
    bits = shards.bit_length() - 1
    if shards != 1 << bits:
        raise ValueError(f"shards must be a power of two, not {shards}")
    mask = np.uint64(shards - 1)
    low = ids & mask
    key = (low << np.uint64(63 - bits)) | (ids >> np.uint64(bits))
    key = distinct_sorted(key)
    shard = key >> np.uint64(63 - bits)
    out = ((key & np.uint64((1 << (63 - bits)) - 1)) << np.uint64(bits)) | shard
    starts = np.searchsorted(shard, np.arange(shards, dtype=np.uint64))
    return out, starts
