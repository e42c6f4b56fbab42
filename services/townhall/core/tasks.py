"""Background task helpers shared by every service."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from townhall.core import logging

log = logging.get(__name__)


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancels the tasks (None is skipped) and waits until each has finished."""
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    for task in live:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Ticker:
    """A background loop that calls `tick` every `every_s`; a failed tick is logged and the loop goes on."""

    def __init__(self, name: str, every_s: float) -> None:
        self._name = name
        self._every_s = every_s
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> object:
        """One round of the loop's work."""
        raise NotImplementedError

    def start(self) -> None:
        """Starts ticking in the background."""
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def close(self) -> None:
        """Stops ticking."""
        await cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # a tick must never end the loop
                log.warning("background tick failed", task=self._name, error=str(exc))
            await asyncio.sleep(self._every_s)
