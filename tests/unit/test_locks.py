"""Locks by key: one change at a time per key, and nothing kept for a key once nobody uses it."""

from __future__ import annotations

import asyncio

from townhall.core.locks import KeyedLocks


async def test_a_key_is_held_by_one_at_a_time_and_dropped_when_unused() -> None:
    locks = KeyedLocks()
    order: list[str] = []

    async def change(name: str, key: str) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(0.01)
            order.append(f"{name}-")

    await asyncio.gather(change("a", "room"), change("b", "room"), change("c", "other"))
    assert order.index("a-") < order.index("b+"), "the same key is never held twice at once"
    assert order.index("c+") < order.index("a-"), "another key does not wait"
    assert len(locks) == 0
    for i in range(1000):
        async with locks.hold(f"made-up-{i}"):
            assert locks.locked(f"made-up-{i}")
    assert len(locks) == 0 and not locks.locked("made-up-1")


async def test_quiet_waits_for_the_changes_in_flight() -> None:
    locks = KeyedLocks()
    done = asyncio.Event()

    async def change() -> None:
        async with locks.hold("room"):
            await asyncio.sleep(0.05)
            done.set()

    task = asyncio.create_task(change())
    await asyncio.sleep(0)
    await locks.quiet()
    assert done.is_set()
    await task
