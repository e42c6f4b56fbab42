"""The supervisor of background loops: a loop that dies is logged once, counted, and surfaced."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from townhall.core.tasks import Supervisor, cancel, spawn, supervise


def failures(task: str) -> float:
    return REGISTRY.get_sample_value("townhall_task_failures_total", {"task": task}) or 0.0


async def _dies() -> None:
    await asyncio.sleep(0)
    raise RuntimeError("a fault nobody planned for")


async def _settle(*tasks: asyncio.Task[None]) -> None:
    await asyncio.wait(tasks)
    await asyncio.sleep(0)  # done callbacks run on the next turn of the loop


async def test_a_loop_that_dies_is_logged_once_counted_and_reported_to_its_supervisor() -> None:
    supervisor = Supervisor()
    seen: list[tuple[str, str]] = []
    supervisor.on_failure(lambda name, exc: seen.append((name, str(exc))))
    before = failures("test-dies")
    with capture_logs() as logs, supervisor.active():
        task = supervise(_dies(), "test-dies")
        await _settle(task)
    assert failures("test-dies") == before + 1
    died = [entry for entry in logs if entry["event"] == "background task died"]
    assert len(died) == 1
    assert died[0]["task"] == "test-dies" and died[0]["log_level"] == "error"
    assert isinstance(died[0]["exc_info"], RuntimeError)  # rendered as a traceback by format_exc_info
    assert seen == [("test-dies", "a fault nobody planned for")]
    assert supervisor.failed == "test-dies"


async def test_the_counter_starts_at_zero_and_only_the_first_death_is_reported() -> None:
    supervisor = Supervisor()
    seen: list[str] = []
    supervisor.on_failure(lambda name, _exc: seen.append(name))
    with supervisor.active():
        idle = supervise(asyncio.sleep(3600), "test-idle")
        assert failures("test-idle") == 0.0
        assert REGISTRY.get_sample_value("townhall_task_failures_total", {"task": "test-idle"}) == 0.0
        first, second = supervise(_dies(), "test-first"), supervise(_dies(), "test-second")
        await _settle(first, second)
    assert seen == ["test-first"]
    assert failures("test-second") >= 1
    await cancel(idle)


async def test_cancelled_and_finished_loops_are_not_failures() -> None:
    supervisor = Supervisor()
    supervisor.on_failure(lambda name, _exc: pytest.fail(f"{name} reported"))

    async def returns() -> None:
        await asyncio.sleep(0)

    with supervisor.active():
        done = supervise(returns(), "test-returns")
        forever = supervise(asyncio.sleep(3600), "test-cancelled")
    await _settle(done)
    await cancel(forever)
    await asyncio.sleep(0)
    assert failures("test-returns") == failures("test-cancelled") == 0.0
    assert supervisor.failed is None


async def test_loops_started_by_a_supervised_loop_belong_to_the_same_supervisor() -> None:
    supervisor = Supervisor()
    children: list[asyncio.Task[None]] = []
    started = asyncio.Event()

    async def parent() -> None:
        children.append(supervise(_dies(), "test-child"))
        started.set()
        await asyncio.sleep(3600)

    with supervisor.active():
        running = supervise(parent(), "test-parent")
    await started.wait()
    await _settle(*children)
    assert supervisor.failed == "test-child"
    await cancel(running)


async def test_a_loop_outside_any_supervisor_is_still_logged_and_counted() -> None:
    before = failures("test-alone")
    with capture_logs() as logs:
        await _settle(supervise(_dies(), "test-alone"))
    assert failures("test-alone") == before + 1
    assert [entry["task"] for entry in logs if entry["event"] == "background task died"] == ["test-alone"]


async def test_closing_after_a_death_does_not_raise_it_again() -> None:
    task = supervise(_dies(), "test-closed")
    await _settle(task)
    await cancel(task)  # the app's close() goes on to close the rest


async def test_spawned_work_that_dies_is_logged_and_counted_but_stops_nothing() -> None:
    """A room's timer or a refill that meets a bug: visible (log, counter), and the process goes on."""
    supervisor = Supervisor()
    before = failures("test-spawned")
    with capture_logs() as logs, supervisor.active():
        task = spawn(_dies(), "test-spawned")
        await _settle(task)
    assert failures("test-spawned") == before + 1
    assert [e["task"] for e in logs if e["event"] == "background task died"] == ["test-spawned"]
    assert supervisor.failed is None, "one room's fault does not stop the process"
    await cancel(task)  # already reported: not raised again
