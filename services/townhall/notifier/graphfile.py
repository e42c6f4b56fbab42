"""Follow-graph files: 16-byte (followee, follower) little-endian records; a synthetic generator and
the Import client that streams a file to a notifier."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from townhall.core.channels import channel
from townhall.core.config import TlsConfig
from townhall.v1 import graph_pb2, graph_pb2_grpc

PAIR_BYTES = 16
# Pairs per Import chunk: 48 KiB, under the servers' 64 KiB message limit.
CHUNK_PAIRS = 3000
# Celebrity followers drawn per step, bounding the generator's memory whatever the count.
DRAW_STEP = 1 << 22


@dataclass(frozen=True)
class GraphSpec:
    """A synthetic graph: one celebrity, `hosts` ordinary hosts with power-law follower counts."""

    users: int = 20_000_000
    celebrity: int = 1
    celebrity_followers: int = 10_000_000
    hosts: int = 10_000
    first_host: int = 2
    max_followers: int = 1000
    # Pareto shape of the ordinary hosts' follower counts (smaller: heavier tail).
    alpha: float = 1.2
    seed: int = 7


def host_degrees(spec: GraphSpec) -> np.ndarray:
    """Follower counts of the ordinary hosts: power law (Pareto), 1..max_followers."""
    rng = np.random.default_rng(spec.seed)
    raw = np.floor(rng.pareto(spec.alpha, spec.hosts) * 20) + 1
    return np.minimum(raw, spec.max_followers).astype(np.int64)


def generate(spec: GraphSpec) -> Iterator[np.ndarray]:
    """The graph as (n, 2) uint64 arrays, sorted by followee then follower, in bounded pieces."""
    rng = np.random.default_rng(spec.seed + 1)
    # The celebrity: each user follows with probability p, drawn a range at a time, until the count.
    want = spec.celebrity_followers
    lo = 1
    while want > 0 and lo <= spec.users:
        hi = min(spec.users + 1, lo + DRAW_STEP)
        # The probability follows what is still wanted from the ids still left, 2% over, so the
        # count is reached (then trimmed) without holding the whole id range in memory.
        p = min(1.0, want / (spec.users + 1 - lo) * 1.02)
        ids = np.flatnonzero(rng.random(hi - lo) < p).astype(np.uint64) + np.uint64(lo)
        ids = ids[ids != spec.celebrity][:want]
        want -= len(ids)
        yield np.column_stack((np.full(len(ids), spec.celebrity, dtype=np.uint64), ids))
        lo = hi
    degrees = host_degrees(spec)
    out: list[np.ndarray] = []
    size = 0
    for i, degree in enumerate(degrees.tolist()):
        host = spec.first_host + i
        ids = np.sort(rng.choice(spec.users, size=degree, replace=False).astype(np.uint64) + np.uint64(1))
        ids = ids[ids != host]
        out.append(np.column_stack((np.full(len(ids), host, dtype=np.uint64), ids)))
        size += len(ids)
        if size >= DRAW_STEP:
            yield np.concatenate(out)
            out, size = [], 0
    if out:
        yield np.concatenate(out)


def write(spec: GraphSpec, path: Path) -> int:
    """Writes the generated graph to `path`; returns the number of edges."""
    edges = 0
    with path.open("wb") as fh:
        for pairs in generate(spec):
            fh.write(np.ascontiguousarray(pairs, dtype="<u8").tobytes())
            edges += len(pairs)
    return edges


def read_pairs(path: Path) -> np.ndarray:
    """A graph file as an (n, 2) memory-mapped little-endian uint64 array."""
    size = path.stat().st_size
    if size % PAIR_BYTES:
        raise ValueError(f"{path} is {size} bytes: not whole 16-byte (followee, follower) pairs")
    if size == 0:
        return np.empty((0, 2), dtype="<u8")
    return np.memmap(path, dtype="<u8", mode="r").reshape(-1, 2)


@dataclass(frozen=True)
class ImportResult:
    """What an import did, and how fast."""

    received: int
    created: int
    invalid: int
    seconds: float

    @property
    def edges_per_s(self) -> float:
        """Pairs sent per second, end to end (file read to the server's summary)."""
        return self.received / self.seconds if self.seconds > 0 else 0.0


async def import_file(
    address: str,
    path: Path,
    credential: Sequence[tuple[str, str]],
    tls: TlsConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Streams the file at `path` to the notifier at `address` with Graph.Import (an internal call:
    `credential` is the service credential's metadata)."""
    pairs = read_pairs(path)

    async def chunks() -> AsyncIterator[graph_pb2.ImportChunk]:
        for start in range(0, len(pairs), CHUNK_PAIRS):
            yield graph_pb2.ImportChunk(pairs=pairs[start : start + CHUNK_PAIRS].tobytes())
            if progress is not None:
                progress(min(len(pairs), start + CHUNK_PAIRS))

    started = time.perf_counter()
    async with channel(address, tls or TlsConfig()) as ch:
        stub = graph_pb2_grpc.GraphStub(ch)
        summary = await stub.Import(chunks(), metadata=tuple(credential), timeout=3600)
    return ImportResult(summary.received, summary.created, summary.invalid, time.perf_counter() - started)
