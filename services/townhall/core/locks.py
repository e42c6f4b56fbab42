"""Locks by key that exist only while in use: a key asked for once (a room id nobody made) costs nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # holding or waiting


class KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it.

    How many exist at once is bounded by the calls in flight, not by the keys ever asked for.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Holds the key's lock for the block."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._entries[key]

    def locked(self, key: str) -> bool:
        """Whether someone holds the key's lock now."""
        entry = self._entries.get(key)
        return entry is not None and entry.lock.locked()

    def __len__(self) -> int:
        return len(self._entries)

    async def quiet(self) -> None:
        """Returns once every lock held when called has been released."""
        for key in list(self._entries):
            if self.locked(key):
                async with self.hold(key):
                    pass
