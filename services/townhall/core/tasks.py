"""Background task helpers shared by every service, and the one supervisor of a process's loops.

Every loop a process runs for as long as it serves (Kafka followers, tickers, probers, sweepers) is
started with `supervise`. A loop is written to survive what it expects (each catches its own Kafka and
network errors and retries), so one that ends with an exception has met a fault nobody planned for:
the supervisor logs it once, with the task's name and traceback, counts it in
`townhall_task_failures_total{task}`, and tells the server it belongs to (core/server.py), which
reports NOT_SERVING and stops the process with a non-zero exit status, so Kubernetes restarts it
rather than leaving a half-dead process serving.

Work that nobody awaits and that lasts less than the process (a room's chunk timer, a pull from an
upstream relay, a lease refill) is started with `spawn`: one that ends with an unexpected exception is
logged and counted the same way, but does not stop the process, since the fault was one room's or one
call's.

The server's supervisor reaches the loops through a context variable: tasks copy the context they are
created in, so every loop started while `Supervisor.active` is in force (the app's start) and every
loop those loops start belong to it. A loop started outside any server (a unit test) is still logged
and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from prometheus_client import Counter

from townhall.core import logging
from townhall.core.metrics import from_zero

log = logging.get(__name__)

T = TypeVar("T")

TASK_FAILURES = Counter(
    "townhall_task_failures_total",
    "Background loops that ended with an unexpected exception, by task name; the process then stops.",
    ["task"],
)


class Supervisor:
    """Watches a server's loops: the first to die calls `on_failure` with its name and exception."""

    def __init__(self) -> None:
        self.failed: str | None = None  # the name of the first loop that died
        self._on_failure: list[Callable[[str, BaseException], None]] = []

    def on_failure(self, callback: Callable[[str, BaseException], None]) -> None:
        """Adds a callback run (on the event loop) when a supervised loop dies."""
        self._on_failure.append(callback)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Loops started inside this block (and the loops they start) are supervised by this supervisor."""
        token = _current.set(self)
        try:
            yield
        finally:
            _current.reset(token)

    def _failed(self, name: str, exc: BaseException) -> None:
        if self.failed is not None:
            return
        self.failed = name
        for callback in self._on_failure:
            callback(name, exc)


_current: contextvars.ContextVar[Supervisor | None] = contextvars.ContextVar("supervisor", default=None)


# Supervised tasks whose death was reported: cancel() does not raise their exception again.
_reported: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


def supervise(work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """Starts a process-lifetime loop as a named task under the current supervisor (see the module).

    `name` is a metric label: a fixed name per kind of loop, never a room or a user.
    """
    from_zero(TASK_FAILURES, name)
    task = asyncio.create_task(work, name=name)
    # The task's context is a copy of this one, so the supervisor in force here is the task's.
    task.add_done_callback(functools.partial(_ended, _current.get()))
    return task


def spawn(work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """Starts work that nobody awaits (see the module): a death is logged and counted under `name`, a
    fixed name per kind of work (a metric label), and the process goes on. The caller keeps the task."""
    from_zero(TASK_FAILURES, name)
    task = asyncio.create_task(work, name=name)
    task.add_done_callback(functools.partial(_ended, None))
    return task


def _ended(supervisor: Supervisor | None, task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        return  # a loop that finished its job (started a follower and returned)
    _reported.add(task)
    name = task.get_name()
    TASK_FAILURES.labels(name).inc()
    log.error("background task died", task=name, exc_info=exc)
    if supervisor is not None:
        supervisor._failed(name, exc)


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancels the tasks (None is skipped) and waits until each has finished; a supervised loop that died is
    not raised again here (the supervisor reported it), so closing a process after a death closes the rest."""
    live = [task for task in tasks if task is not None and task not in _reported]
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
        self._task = supervise(self._run(), self._name)

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
