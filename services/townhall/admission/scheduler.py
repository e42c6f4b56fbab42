"""The scheduler: starts scheduled rooms when their time comes (on the room's owner)."""

from __future__ import annotations

from collections.abc import Callable

from townhall.admission.store import RoomStore, now_ms
from townhall.core import logging
from townhall.core.errors import TownhallError
from townhall.core.tasks import Ticker

log = logging.get(__name__)

TICK_S = 0.25


class Scheduler(Ticker):
    """Every tick, starts the due scheduled rooms this process owns, as their host would.

    Starting goes through RoomStore.start, so the room-started event (and with it the
    followers' and reminder-askers' notifications) is exactly what a host's StartRoom writes.
    A failed start (Kafka down) is retried on the next tick; the room stays scheduled until then.
    """

    def __init__(self, store: RoomStore, owns: Callable[[str], bool] = lambda _room: True) -> None:
        super().__init__("room-scheduler", TICK_S)
        self._store = store
        self._owns = owns

    async def tick(self) -> int:
        """Starts every due room owned here; returns how many started.

        Also announces the live rooms owned here whose announcement an earlier owner did not
        finish (it failed between writing the room live and its room-started event).
        """
        try:
            await self._store.announce_pending(self._owns)
        except TownhallError as exc:
            log.warning("pending announcements not made, will retry", error=str(exc))
        started = 0
        for room in self._store.book.due(now_ms()):
            if not self._owns(room.room_id):
                continue
            try:
                await self._store.start(room.room_id, room.host_id)
            except TownhallError as exc:
                log.warning("scheduled room not started, will retry", room=room.room_id, error=str(exc))
                continue
            started += 1
            log.info("scheduled room started", room=room.room_id, host=room.host_id)
        return started
