"""What a fault cost, measured the way a user would notice it (no network).

Audio is measured in audio time, not sequence numbers: every frame a speaker captured carries
its own sequence, so the frames a listener never heard are counted exactly, whatever relay or
epoch delivered the others.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from townhall.v1.relay_pb2 import Chunk

FRAME_MS = 20


@dataclass
class Tape:
    """What one listener heard: each frame of one speaker, with when it arrived (monotonic)."""

    speaker: int
    arrivals: dict[int, float] = field(default_factory=dict)
    repeats: int = 0
    out_of_order: int = 0
    _last: int = -1

    def record(self, chunk: Chunk, at: float | None = None) -> None:
        """Takes a chunk as it arrives."""
        at = time.monotonic() if at is None else at
        for frame in chunk.frames:
            if frame.speaker_id != self.speaker:
                continue
            if frame.sequence in self.arrivals:
                self.repeats += 1
                continue
            if frame.sequence < self._last:
                self.out_of_order += 1
            self._last = max(self._last, frame.sequence)
            self.arrivals[frame.sequence] = at

    @property
    def heard(self) -> int:
        """Distinct frames heard."""
        return len(self.arrivals)

    @property
    def newest(self) -> int:
        """The highest frame sequence heard (-1: none yet)."""
        return self._last

    def first_heard(self) -> int:
        """The lowest frame sequence heard (0: none yet)."""
        return min(self.arrivals, default=0)

    def heard_after(self, sequence: int) -> bool:
        """Whether a frame later than `sequence` has arrived."""
        return self._last > sequence

    def missing(self, first: int, last: int) -> int:
        """Frames first..last (inclusive) never heard."""
        return sum(1 for sequence in range(first, last + 1) if sequence not in self.arrivals)

    def longest_silence(self, since: float, until: float) -> float:
        """The longest time between two frame arrivals within [since, until], in seconds."""
        times = sorted(t for t in self.arrivals.values() if since <= t <= until)
        if len(times) < 2:
            return until - since
        return max(b - a for a, b in itertools.pairwise([since, *times, until]))


def audio_gap_ms(missing_frames: int) -> float:
    """Missing frames as milliseconds of audio."""
    return missing_frames * FRAME_MS


@dataclass
class Outcome:
    """One run of one fault: what was measured, and what went wrong (nothing, when it passed)."""

    scenario: str
    fault: str
    figures: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every check held."""
        return not self.problems

    def expect(self, holds: bool, problem: str) -> None:
        """Records a problem unless `holds`."""
        if not holds:
            self.problems.append(problem)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "scenario": self.scenario,
            "fault": self.fault,
            "figures": self.figures,
            "problems": self.problems,
        }


async def until(condition: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.02) -> float:
    """Waits until `condition` holds; returns when (monotonic), or raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s:.0f} s")
        await asyncio.sleep(step_s)
    return time.monotonic()


def spread(values: Iterable[float]) -> tuple[float, float]:
    """(p50, max) of the values, 0 for none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0, 0.0
    return ordered[(len(ordered) - 1) // 2], ordered[-1]


class Progress:
    """Samples a growing count (notifications delivered) to find the longest time it stood still."""

    def __init__(self, count: Callable[[], int], every_s: float = 0.1) -> None:
        self._count = count
        self._every_s = every_s
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> Progress:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), self._count()))
            await asyncio.sleep(self._every_s)

    def longest_stall(self, since: float, until: float) -> float:
        """The longest time within [since, until] during which the count did not grow."""
        longest, start, last = 0.0, since, None
        for at, count in self.samples:
            if at < since or at > until:
                continue
            if last is not None and count > last:
                longest = max(longest, at - start)
                start = at
            last = count
        return round(max(longest, (until - start) if last is not None else 0.0), 3)
