"""Fixtures the unit tests share: an open follower store in a fresh folder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from townhall.notifier.store import SqliteFollowerStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteFollowerStore]:
    """A follower store on disk, closed after the test."""
    s = SqliteFollowerStore(tmp_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
