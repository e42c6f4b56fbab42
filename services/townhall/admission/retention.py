"""Retention: rooms nobody uses any more are released, so what clients create stays bounded."""

from __future__ import annotations

from collections.abc import Callable

from townhall.admission.store import RoomStore
from townhall.core.tasks import Ticker
from townhall.core.tickets import void_after_s

EVERY_S = 60.0


class Retention(Ticker):
    """Every minute (or a quarter of the retention, if shorter): ends the rooms never started within
    `unstarted_s` and deletes those ended a ticket lifetime ago (RoomStore.expire)."""

    def __init__(
        self, store: RoomStore, owns: Callable[[str], bool], ticket_ttl_s: float, unstarted_s: float
    ) -> None:
        self._retention_ms = int(void_after_s(ticket_ttl_s) * 1000)
        super().__init__("room-retention", min(EVERY_S, self._retention_ms / 4000))
        self._store = store
        self._owns = owns
        self._unstarted_ms = int(unstarted_s * 1000)

    async def tick(self) -> int:
        """One round; returns the rooms forgotten here."""
        return await self._store.expire(self._owns, self._retention_ms, self._unstarted_ms)
