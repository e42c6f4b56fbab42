"""The follower graph: a store boundary and its embedded sqlite implementation."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

T = TypeVar("T")

DEFAULT_BLOCK = 10_000


class FollowerStore(Protocol):
    """Who follows whom, readable as sorted blocks of follower ids per followee."""

    async def follow(self, followee: int, follower: int) -> bool:
        """Adds the edge; False if it was already there."""
        ...

    async def unfollow(self, followee: int, follower: int) -> bool:
        """Removes the edge; False if it was not there."""
        ...

    async def count(self, followee: int) -> int:
        """How many users follow `followee`, in O(1)."""
        ...

    async def total(self) -> int:
        """How many edges the store holds."""
        ...

    def followers(self, followee: int, block: int = DEFAULT_BLOCK) -> AsyncIterator[np.ndarray]:
        """The followers of `followee` in ascending order, as uint64 arrays of at most `block` ids."""
        ...

    async def close(self) -> None:
        """Releases the store; pending writes are durable."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS followers (
    followee INTEGER NOT NULL,
    follower INTEGER NOT NULL,
    PRIMARY KEY (followee, follower)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS follower_counts (
    followee INTEGER PRIMARY KEY,
    n INTEGER NOT NULL
);
"""


class SqliteFollowerStore:
    """A FollowerStore in one sqlite file, used from a single worker thread off the event loop.

    Ids (1..2^63-1) are stored as sqlite's signed 64-bit INTEGER; the count table keeps
    CountFollowers O(1). WAL with synchronous=NORMAL: a committed edge survives a process
    crash (kill -9); only a power loss may lose the last few commits.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / "followers.sqlite3"
        # sqlite objects may only be used on the thread that made them: one thread owns the db.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="follower-store")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    async def open(self) -> None:
        """Opens (creating if needed) the database file; call once before any other method."""

        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._conn = db

        await self._run(connect)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"follower store {self.path} is not open")
        return self._conn

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def follow(self, followee: int, follower: int) -> bool:
        """Adds the edge; False if it was already there."""

        def write() -> bool:
            with self._transaction():
                added = self._db.execute(
                    "INSERT OR IGNORE INTO followers (followee, follower) VALUES (?, ?)", (followee, follower)
                ).rowcount
                if added:
                    self._db.execute(
                        "INSERT INTO follower_counts (followee, n) VALUES (?, 1) "
                        "ON CONFLICT (followee) DO UPDATE SET n = n + 1",
                        (followee,),
                    )
            return bool(added)

        return await self._run(write)

    async def unfollow(self, followee: int, follower: int) -> bool:
        """Removes the edge; False if it was not there."""

        def write() -> bool:
            with self._transaction():
                removed = self._db.execute(
                    "DELETE FROM followers WHERE followee = ? AND follower = ?", (followee, follower)
                ).rowcount
                if removed:
                    self._db.execute("UPDATE follower_counts SET n = n - 1 WHERE followee = ?", (followee,))
                    self._db.execute("DELETE FROM follower_counts WHERE followee = ? AND n <= 0", (followee,))
            return bool(removed)

        return await self._run(write)

    async def count(self, followee: int) -> int:
        """How many users follow `followee`, in O(1)."""

        def read() -> int:
            row = self._db.execute("SELECT n FROM follower_counts WHERE followee = ?", (followee,)).fetchone()
            return int(row[0]) if row else 0

        return await self._run(read)

    async def total(self) -> int:
        """How many edges the store holds (sums the count table, one row per followee)."""

        def read() -> int:
            return int(self._db.execute("SELECT COALESCE(SUM(n), 0) FROM follower_counts").fetchone()[0])

        return await self._run(read)

    async def followers(self, followee: int, block: int = DEFAULT_BLOCK) -> AsyncIterator[np.ndarray]:
        """The followers of `followee` in ascending order, as uint64 arrays of at most `block` ids."""
        if block <= 0:
            raise ValueError(f"block must be positive, not {block}")
        after = 0

        def page() -> np.ndarray:
            # Keyset paging on the primary key: each block is one index range scan, no OFFSET.
            rows = self._db.execute(
                "SELECT follower FROM followers WHERE followee = ? AND follower > ? "
                "ORDER BY follower LIMIT ?",
                (followee, after, block),
            ).fetchall()
            return np.fromiter((r[0] for r in rows), dtype=np.uint64, count=len(rows))

        while True:
            ids = await self._run(page)
            if len(ids):
                yield ids
            if len(ids) < block:
                return
            after = int(ids[-1])

    async def close(self) -> None:
        """Closes the database on its own thread, then the thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True

        def disconnect() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await self._run(disconnect)
        finally:
            self._executor.shutdown(wait=False)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
