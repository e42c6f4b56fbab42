"""The follower graph: a store boundary and its embedded sqlite implementation in sorted id blocks.

The store also keeps what moving the graph between notifiers needs (notifier/handover.py): each
followee's followers and each room's reminder list is a *key* ("user:<id>", "room:<id>", the keys of
the rendezvous hashing), which can be exported, released and taken in; and a *moved* marker per key
handed to another notifier, after which every read or write of the key here raises Moved, checked in
the same store call as the read or write itself (so none slips in between).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from townhall.core.errors import LimitReached
from townhall.notifier import blocks as blk

T = TypeVar("T")

DEFAULT_BLOCK = 10_000
# Stored blocks read per query while iterating one followee (each at most blk.BLOCK_IDS ids).
READ_BLOCKS = 16


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
CREATE TABLE IF NOT EXISTS blocks (
    followee INTEGER NOT NULL,
    start INTEGER NOT NULL,
    n INTEGER NOT NULL,
    ids BLOB NOT NULL,
    PRIMARY KEY (followee, start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS follower_counts (
    followee INTEGER PRIMARY KEY,
    n INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reminders (
    room_id TEXT NOT NULL,
    user INTEGER NOT NULL,
    PRIMARY KEY (room_id, user)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reminders_by_user ON reminders (user);
CREATE TABLE IF NOT EXISTS moved (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    epoch INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""
USER_PREFIX, ROOM_PREFIX = "user:", "room:"
# Keys scanned per store call while looking for keys another notifier owns.
SCAN_KEYS = 5_000


def followee_key(followee: int) -> str:
    """The key of a followee's followers (also its rendezvous key)."""
    return f"{USER_PREFIX}{followee}"


def room_key(room_id: str) -> str:
    """The key of a room's reminder list (also its rendezvous key)."""
    return f"{ROOM_PREFIX}{room_id}"


# What the follower store raises when its disk fails, fills up or is busy a moment (notifier's exception
# policy: core/kafka.py KAFKA_ERRORS; a loop that meets one of these retries, anything else ends it).
STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, OSError)


class Moved(Exception):
    """The key was handed to another notifier (`owner`, whose view of the members was `epoch`)."""

    def __init__(self, key: str, owner: str, epoch: int) -> None:
        super().__init__(f"{key} was handed to {owner} (membership epoch {epoch})")
        self.key, self.owner, self.epoch = key, owner, epoch


class SqliteFollowerStore:
    """A FollowerStore in one sqlite file: per followee, sorted uint64 follower ids in blobs.

    A row of `blocks` holds at most 4096 ascending ids packed little-endian (8 bytes each), keyed
    by (followee, first id), so an edge costs about 8 bytes on disk and a follow or unfollow
    rewrites one block. Memory is bounded by one block (or one import flush), never by the
    largest follower list. WAL with synchronous=NORMAL: a committed edge survives kill -9.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / "followers.sqlite3"
        # sqlite objects may only be used on the thread that made them: one thread owns the db.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="follower-store")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        # Keys marked moved: while none is, no read or write looks for a marker.
        self._moved = 0

    async def open(self) -> None:
        """Opens (creating if needed) the database file; call once before any other method."""

        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._conn = db
            self._migrate_rows()
            self._moved = int(db.execute("SELECT COUNT(*) FROM moved").fetchone()[0])

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
            self._check(followee_key(followee))
            with self._transaction():
                return self._merge(followee, np.array([follower], dtype=np.uint64)) == 1

        return await self._run(write)

    async def unfollow(self, followee: int, follower: int) -> bool:
        """Removes the edge; False if it was not there."""

        def write() -> bool:
            self._check(followee_key(followee))
            with self._transaction():
                row = self._block_of(followee, follower)
                if row is None:
                    return False
                start, blob = row
                ids = blk.unpack(blob)
                at = int(np.searchsorted(ids, np.uint64(follower)))
                if at >= len(ids) or int(ids[at]) != follower:
                    return False
                self._db.execute("DELETE FROM blocks WHERE followee = ? AND start = ?", (followee, start))
                rest = np.delete(ids, at)
                if len(rest):
                    self._insert_blocks(followee, [rest])
                self._add_count(followee, -1)
                return True

        return await self._run(write)

    async def import_edges(self, pairs: np.ndarray) -> int:
        """Adds (followee, follower) rows of a uint64 array of shape (n, 2); returns edges created."""

        def write() -> int:
            if self._moved:
                for followee in np.unique(pairs[:, 0]).tolist():
                    self._check(followee_key(int(followee)))
            with self._transaction():
                return self._import(pairs)

        return await self._run(write)

    async def count(self, followee: int) -> int:
        """How many users follow `followee`, in O(1)."""

        def read() -> int:
            self._check(followee_key(followee))
            row = self._db.execute("SELECT n FROM follower_counts WHERE followee = ?", (followee,)).fetchone()
            return int(row[0]) if row else 0

        return await self._run(read)

    async def total(self) -> int:
        """How many edges the store holds (sums the count table, one row per followee)."""

        def read() -> int:
            return int(self._db.execute("SELECT COALESCE(SUM(n), 0) FROM follower_counts").fetchone()[0])

        return await self._run(read)

    async def stored_blocks(self, followee: int, checked: bool = True) -> AsyncIterator[np.ndarray]:
        """The followee's stored blocks in ascending order (each at most 4096 ids): the planner's unit.

        Raises Moved (before the first block) if the followee was handed over, unless not `checked`.
        """
        after = -1
        key = followee_key(followee) if checked else None
        while True:
            rows = await self._run(lambda a=after, k=key: self._blocks_after(followee, a, k))  # type: ignore[misc]
            key = None
            for _start, blob in rows:
                yield blk.unpack(blob)
            if len(rows) < READ_BLOCKS:
                return
            after = rows[-1][0]

    async def followers(self, followee: int, block: int = DEFAULT_BLOCK) -> AsyncIterator[np.ndarray]:
        """The followers of `followee` in ascending order, as uint64 arrays of exactly `block` ids
        (the last one fewer)."""
        if block <= 0:
            raise ValueError(f"block must be positive, not {block}")
        pending: list[np.ndarray] = []
        waiting = 0
        async for ids in self.stored_blocks(followee):
            pending.append(ids)
            waiting += len(ids)
            if waiting >= block:
                joined = np.concatenate(pending)
                ready = waiting - waiting % block
                for i in range(0, ready, block):
                    yield joined[i : i + block]
                pending = [joined[ready:]]
                waiting -= ready
        if waiting:
            yield np.concatenate(pending)

    async def page(self, followee: int, after: int, limit: int) -> np.ndarray:
        """At most `limit` followers of `followee` above `after`, ascending."""

        def read() -> np.ndarray:
            self._check(followee_key(followee))
            out: list[np.ndarray] = []
            got = 0
            first = self._block_of(followee, after)
            since = first[0] - 1 if first is not None else -1
            while got < limit:
                rows = self._blocks_after(followee, since)
                for _start, blob in rows:
                    ids = blk.unpack(blob)
                    ids = ids[np.searchsorted(ids, np.uint64(after), side="right") :]
                    out.append(ids[: limit - got])
                    got += len(out[-1])
                    if got >= limit:
                        break
                if len(rows) < READ_BLOCKS:
                    break
                since = rows[-1][0]
            return np.concatenate(out) if out else np.empty(0, dtype=np.uint64)

        return await self._run(read)

    async def remind(self, room_id: str, user: int, limit: int = 0) -> bool:
        """Remembers that `user` wants a reminder when `room_id` starts; False if already asked.

        With `limit`, a user who holds that many reminders here already is refused (RESOURCE_EXHAUSTED).
        """

        def write() -> bool:
            self._check(room_key(room_id))
            with self._transaction():
                if limit:
                    asked = self._db.execute(
                        "SELECT 1 FROM reminders WHERE room_id = ? AND user = ?", (room_id, user)
                    ).fetchone()
                    if asked:
                        return False
                    (held,) = self._db.execute(
                        "SELECT COUNT(*) FROM reminders WHERE user = ?", (user,)
                    ).fetchone()
                    if held >= limit:
                        raise LimitReached(
                            f"user {user} has asked for {held} reminders of rooms not yet ended; at most "
                            f"{limit} (they go once their rooms end)"
                        )
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO reminders (room_id, user) VALUES (?, ?)", (room_id, user)
                )
                return bool(cur.rowcount)

        return await self._run(write)

    async def reminder_rooms(self) -> list[str]:
        """The rooms that have reminders here (one index step per room, not a scan of the reminders)."""

        def read() -> list[str]:
            rooms: list[str] = []
            row = self._db.execute("SELECT MIN(room_id) FROM reminders").fetchone()
            while row is not None and row[0] is not None:
                rooms.append(row[0])
                row = self._db.execute(
                    "SELECT room_id FROM reminders WHERE room_id > ? ORDER BY room_id LIMIT 1", (row[0],)
                ).fetchone()
            return rooms

        return await self._run(read)

    async def forget_reminders(self, room_ids: list[str]) -> int:
        """Deletes every reminder of these rooms; returns how many."""

        def delete() -> int:
            with self._transaction():
                return sum(
                    self._db.execute("DELETE FROM reminders WHERE room_id = ?", (room,)).rowcount
                    for room in room_ids
                )

        return await self._run(delete)

    async def reminded(
        self, room_id: str, block: int = blk.BLOCK_IDS, checked: bool = True
    ) -> AsyncIterator[np.ndarray]:
        """The users who asked for a reminder for `room_id`, ascending, in arrays of at most `block`.

        Raises Moved (before the first array) if the list was handed over, unless not `checked`.
        """
        after = 0
        key = room_key(room_id) if checked else None
        while True:
            rows = await self._run(lambda a=after, k=key: self._reminders_after(room_id, a, block, k))  # type: ignore[misc]
            key = None
            if rows:
                yield np.fromiter((r[0] for r in rows), dtype=np.uint64, count=len(rows))
            if len(rows) < block:
                return
            after = int(rows[-1][0])

    # --- moving keys between notifiers (notifier/handover.py) ------------------------------

    async def mark_moved(self, key: str, owner: str, epoch: int) -> None:
        """Hands `key` to `owner`: from now on every read or write of it here raises Moved."""

        def write() -> None:
            new = self._moved_row(key) is None
            self._db.execute(
                "INSERT INTO moved (key, owner, epoch) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, epoch = excluded.epoch",
                (key, owner, epoch),
            )
            self._moved += new

        await self._run(write)

    @property
    def has_markers(self) -> bool:
        """Whether any key was handed over from here (and is still marked)."""
        return self._moved > 0

    async def holds(self, key: str) -> bool:
        """Whether anything of `key` is stored here."""
        kind, name = split_key(key)

        def read() -> bool:
            if kind == USER_PREFIX:
                sql, arg = "SELECT 1 FROM follower_counts WHERE followee = ?", int(name)
            else:
                sql, arg = "SELECT 1 FROM reminders WHERE room_id = ? LIMIT 1", name  # type: ignore[assignment]
            return self._db.execute(sql, (arg,)).fetchone() is not None

        return await self._run(read)

    async def moved_to(self, key: str) -> tuple[str, int] | None:
        """Who `key` was handed to, and in which membership epoch; None if it is here."""
        return await self._run(lambda: self._moved_row(key))

    async def unmark(self, key: str) -> None:
        """Takes `key` back: its data is (again) here."""

        def write() -> None:
            if self._db.execute("DELETE FROM moved WHERE key = ?", (key,)).rowcount:
                self._moved -= 1

        await self._run(write)

    async def markers(self) -> list[tuple[str, str, int]]:
        """Every (key, owner, epoch) handed over from here."""
        rows = await self._run(lambda: self._db.execute("SELECT key, owner, epoch FROM moved").fetchall())
        return [(str(k), str(o), int(e)) for k, o, e in rows]

    async def export(self, key: str) -> AsyncIterator[np.ndarray]:
        """What is stored here of `key` (follower ids, or the users a room's reminders go to), ascending
        in arrays of at most 4096 ids, whether or not it was handed over."""
        kind, name = split_key(key)
        if kind == USER_PREFIX:
            async for ids in self.stored_blocks(int(name), checked=False):
                yield ids
        else:
            async for ids in self.reminded(name, checked=False):
                yield ids

    async def take_in(self, key: str, ids: np.ndarray) -> int:
        """Adds ascending `ids` to `key` (what its previous holder exported); returns how many were new."""
        kind, name = split_key(key)

        def write() -> int:
            with self._transaction():
                if kind == USER_PREFIX:
                    return self._merge(int(name), ids.astype(np.uint64))
                cur = self._db.executemany(
                    "INSERT OR IGNORE INTO reminders (room_id, user) VALUES (?, ?)",
                    [(name, int(u)) for u in ids.tolist()],
                )
                return int(cur.rowcount)

        return await self._run(write) if len(ids) else 0

    async def release(self, key: str, owner: str) -> int:
        """Drops what is stored of `key` if it was handed to `owner` (it has taken it in); returns how many
        ids were dropped."""
        kind, name = split_key(key)

        def write() -> int:
            row = self._moved_row(key)
            if row is None or row[0] != owner:
                return 0
            with self._transaction():
                if kind == USER_PREFIX:
                    followee = int(name)
                    row = self._db.execute(
                        "SELECT n FROM follower_counts WHERE followee = ?", (followee,)
                    ).fetchone()
                    self._db.execute("DELETE FROM blocks WHERE followee = ?", (followee,))
                    self._db.execute("DELETE FROM follower_counts WHERE followee = ?", (followee,))
                    return int(row[0]) if row else 0
                return int(self._db.execute("DELETE FROM reminders WHERE room_id = ?", (name,)).rowcount)

        return await self._run(write)

    async def keys_after(self, after: str, limit: int = SCAN_KEYS) -> list[str]:
        """Up to `limit` keys with data here, in scan order (followees ascending, then rooms) after
        `after` ("" to start), whether or not handed over."""

        def read() -> list[str]:
            kind, name = split_key(after) if after else (USER_PREFIX, "-1")
            keys: list[str] = []
            if kind == USER_PREFIX:
                rows = self._db.execute(
                    "SELECT followee FROM follower_counts WHERE followee > ? ORDER BY followee LIMIT ?",
                    (int(name), limit),
                ).fetchall()
                keys = [followee_key(int(r[0])) for r in rows]
                name = ""
            if len(keys) < limit:
                rows = self._db.execute(
                    "SELECT DISTINCT room_id FROM reminders WHERE room_id > ? ORDER BY room_id LIMIT ?",
                    (name, limit - len(keys)),
                ).fetchall()
                keys += [room_key(str(r[0])) for r in rows]
            return keys

        return await self._run(read)

    async def meta(self, name: str) -> str | None:
        """A value this notifier keeps about itself (what it knows of the other notifiers)."""
        row = await self._run(
            lambda: self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        )
        return None if row is None else str(row[0])

    async def set_meta(self, name: str, value: str) -> None:
        """Keeps `value` under `name`."""
        await self._run(
            lambda: self._db.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )
        )

    async def disk_bytes(self) -> int:
        """Bytes the database takes on disk (main file and WAL), after a checkpoint."""

        def measure() -> int:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            files = [self.path, self.path.with_name(self.path.name + "-wal")]
            return sum(f.stat().st_size for f in files if f.exists())

        return await self._run(measure)

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

    # --- on the store thread only ---------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _moved_row(self, key: str) -> tuple[str, int] | None:
        row = self._db.execute("SELECT owner, epoch FROM moved WHERE key = ?", (key,)).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def _check(self, key: str | None) -> None:
        """Raises Moved if `key` was handed to another notifier."""
        if self._moved and key is not None:
            row = self._db.execute("SELECT owner, epoch FROM moved WHERE key = ?", (key,)).fetchone()
            if row is not None:
                raise Moved(key, str(row[0]), int(row[1]))

    def _reminders_after(self, room_id: str, after: int, limit: int, key: str | None) -> list[tuple[int]]:
        self._check(key)
        return self._db.execute(
            "SELECT user FROM reminders WHERE room_id = ? AND user > ? ORDER BY user LIMIT ?",
            (room_id, after, limit),
        ).fetchall()

    def _blocks_after(self, followee: int, after: int, key: str | None = None) -> list[tuple[int, bytes]]:
        self._check(key)
        return self._db.execute(
            "SELECT start, ids FROM blocks WHERE followee = ? AND start > ? ORDER BY start LIMIT ?",
            (followee, after, READ_BLOCKS),
        ).fetchall()

    def _block_of(self, followee: int, follower: int) -> tuple[int, bytes] | None:
        """The block that holds (or would hold) `follower`: the last starting at or below it, else the 1st."""
        row = self._db.execute(
            "SELECT start, ids FROM blocks WHERE followee = ? AND start <= ? ORDER BY start DESC LIMIT 1",
            (followee, follower),
        ).fetchone()
        if row is None:
            row = self._db.execute(
                "SELECT start, ids FROM blocks WHERE followee = ? ORDER BY start LIMIT 1", (followee,)
            ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def _insert_blocks(self, followee: int, parts: list[np.ndarray]) -> None:
        self._db.executemany(
            "INSERT INTO blocks (followee, start, n, ids) VALUES (?, ?, ?, ?)",
            [(followee, int(p[0]), len(p), blk.pack(p)) for p in parts if len(p)],
        )

    def _add_count(self, followee: int, delta: int) -> None:
        if delta == 0:
            return
        self._db.execute(
            "INSERT INTO follower_counts (followee, n) VALUES (?, ?) "
            "ON CONFLICT (followee) DO UPDATE SET n = n + excluded.n",
            (followee, delta),
        )
        self._db.execute("DELETE FROM follower_counts WHERE followee = ? AND n <= 0", (followee,))

    def _merge(self, followee: int, new: np.ndarray) -> int:
        """Adds sorted distinct `new` follower ids to `followee`; returns how many were not there."""
        if len(new) == 1:
            row = self._block_of(followee, int(new[0]))
            index = [] if row is None else [row[0]]
        else:
            index = [
                int(r[0])
                for r in self._db.execute(
                    "SELECT start FROM blocks WHERE followee = ? ORDER BY start", (followee,)
                )
            ]
        if not index:
            self._insert_blocks(followee, blk.split(new))
            self._add_count(followee, len(new))
            return len(new)
        created = 0
        for start, part in blk.assign(np.array(index, dtype=np.uint64), new):
            (blob,) = self._db.execute(
                "SELECT ids FROM blocks WHERE followee = ? AND start = ?", (followee, start)
            ).fetchone()
            old = blk.unpack(blob)
            merged = blk.merge_sorted(old, part)
            if len(merged) == len(old):
                continue
            created += len(merged) - len(old)
            self._db.execute("DELETE FROM blocks WHERE followee = ? AND start = ?", (followee, start))
            self._insert_blocks(followee, blk.split(merged))
        self._add_count(followee, created)
        return created

    def _import(self, pairs: np.ndarray) -> int:
        followees, groups = blk.group_pairs(pairs)
        if not len(followees):
            return 0
        known: set[int] = set()
        keys = followees.tolist()
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            known.update(
                int(r[0])
                for r in self._db.execute(
                    f"SELECT followee FROM follower_counts WHERE followee IN ({marks})", chunk
                )
            )
        created = 0
        rows: list[tuple[int, int, int, bytes]] = []
        counts: list[tuple[int, int]] = []
        for followee, ids in zip(keys, groups, strict=True):
            if followee in known:
                created += self._merge(followee, ids)
                continue
            # A followee new to this store: its blocks are written in one go, no reads.
            rows += [(followee, int(p[0]), len(p), blk.pack(p)) for p in blk.split(ids)]
            counts.append((followee, len(ids)))
            created += len(ids)
        self._db.executemany("INSERT INTO blocks (followee, start, n, ids) VALUES (?, ?, ?, ?)", rows)
        self._db.executemany("INSERT INTO follower_counts (followee, n) VALUES (?, ?)", counts)
        return created

    def _migrate_rows(self) -> None:
        """Moves edges from the first layout (one row per edge) into blocks, once."""
        db = self._db
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'followers'").fetchone():
            return
        edges = db.execute("SELECT followee, follower FROM followers").fetchall()
        with self._transaction():
            db.execute("DELETE FROM follower_counts")
            if edges:
                self._import(np.array(edges, dtype=np.uint64))
            db.execute("DROP TABLE followers")


def split_key(key: str) -> tuple[str, str]:
    """("user:", "<id>") or ("room:", "<room id>"); ValueError for anything else."""
    for prefix in (USER_PREFIX, ROOM_PREFIX):
        if key.startswith(prefix) and len(key) > len(prefix):
            name = key[len(prefix) :]
            if prefix == USER_PREFIX and not (name.isascii() and name.isdigit()):
                break
            return prefix, name
    raise ValueError(f"not a graph key (user:<id> or room:<id>): {key!r}")


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
