"""A live room on the cluster while something happens to it: a speaker talking without pause, listeners
hearing it through the relays (the client library's Listener, which moves and resumes), and hosts making
room changes whose every acknowledged answer is written down. Measured as a user notices: the audio each
listener missed (townhall_tools.faults.measure.Tape) and whether an acknowledged change can still be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from townhall.client import Client, Endpoints
from townhall.core.auth import GRANTS, Tokens
from townhall.core.config import DEV_AUTH
from townhall.core.tasks import cancel
from townhall.live import Listener, Speaker
from townhall.v1.common_pb2 import Room
from townhall_tools.faults.measure import FRAME_MS, Tape, audio_gap_ms, until

# The kind values give the cluster the development keys (helm/townhall/ci/kind-default-values.yaml).
TOKENS = Tokens(DEV_AUTH)
# Long enough for every fault and scaling step of a session; the speaker stops when the audience does.
MAX_FRAMES = 60 * 60 * 1000 // FRAME_MS
WAIT_S = 120.0
# A host may start rooms_per_host_per_hour rooms (30 by default): the churn moves to a new host after 10.
ROOMS_PER_HOST = 10
CHANGE_PAUSE_S = 0.2
# Hosts one churn worker goes through at most (a bound; a step's churn uses a few).
MAX_HOSTS = 1000


def fresh_user() -> int:
    """A user id no earlier run used."""
    return random.randrange(1, 2**40) * 1000


def client(endpoints: Endpoints, user: int) -> Client:
    """A user with every grant (a development token), retrying UNAVAILABLE as long as a fault lasts."""
    return Client(endpoints, user, TOKENS.mint(user, GRANTS), retry_s=60.0)


@dataclass
class Window:
    """What a fault cost: from the frame being captured when it began to the frame listeners heard after."""

    first: int
    faulted: float
    gaps_ms: list[float] = field(default_factory=list)
    silences_s: list[float] = field(default_factory=list)
    recovered_s: float = 0.0
    moves: int = 0


class Audience:
    """A speaker and `size` listeners in one live room."""

    def __init__(self, endpoints: Endpoints, size: int) -> None:
        self.endpoints = endpoints
        self.host = client(endpoints, fresh_user())
        self.people = [client(endpoints, self.host.user + 1 + i) for i in range(size)]
        self.room_id = ""
        self.started = Room()  # the room as its start answered
        self.speaker: Speaker | None = None
        self.listeners: list[Listener] = []
        self.tapes: list[Tape] = []
        self.errors: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        room = await self.host.create_room("kind e2e: a live room")
        self.room_id = room.room_id
        self.started = await self.host.start_room(self.room_id)
        self.speaker = Speaker(self.host, self.room_id)
        payloads = (index.to_bytes(4, "big") * 10 for index in range(MAX_FRAMES))
        self._tasks.append(asyncio.create_task(self._speak(payloads), name="speaker"))
        for person in self.people:
            await self.add_listener(person)
        await until(lambda: all(t.heard >= 50 for t in self.tapes), WAIT_S, "every listener hearing audio")

    async def add_listener(self, person: Client) -> Listener:
        person.learn(self.started)  # as from a notification: a process behind on the room says so
        listener = Listener(person, self.room_id, give_up_after_s=WAIT_S)
        tape = Tape(self.host.user)
        self.listeners.append(listener)
        self.tapes.append(tape)
        self._tasks.append(asyncio.create_task(self._listen(listener, tape), name="listener"))
        return listener

    async def _speak(self, payloads: Iterator[bytes]) -> None:
        assert self.speaker is not None
        try:
            await self.speaker.speak(payloads)
        except Exception as exc:  # a speaker that gave up is what the test reports
            self.errors.append(f"speaker: {exc!r}")

    async def _listen(self, listener: Listener, tape: Tape) -> None:
        try:
            async for chunk in listener.chunks():
                tape.record(chunk)
        except Exception as exc:  # a listener that gave up is what the test reports
            self.errors.append(f"listener: {exc!r}")

    def relays(self) -> Counter[str]:
        """Listeners per relay address."""
        return Counter(listener.relay for listener in self.listeners)

    def begin(self) -> Window:
        """Marks the start of a fault: the frame being captured now."""
        assert self.speaker is not None
        return Window(first=self.speaker.captured, faulted=time.monotonic())

    async def settle(self, window: Window, after_s: float = 3.0) -> Window:
        """Waits until every listener hears audio captured `after_s` after the fault began and no listener is
        mid-move; measures the audio each missed from the fault's first frame to there."""
        assert self.speaker is not None
        target = window.first + int(after_s * 1000 / FRAME_MS)
        await until(
            lambda: self.speaker is not None and self.speaker.captured > target, WAIT_S, "the speaker"
        )
        heard = await until(
            lambda: all(t.heard_after(target) for t in self.tapes), WAIT_S, "every listener hearing again"
        )
        window.recovered_s = round(heard - window.faulted, 2)
        # Audio from just before the fault on: what was on its way when it struck counts too.
        first = max(0, window.first - 50)
        window.gaps_ms = [audio_gap_ms(t.missing(max(first, t.first_heard()), target)) for t in self.tapes]
        window.silences_s = [round(t.longest_silence(window.faulted, heard), 2) for t in self.tapes]
        window.moves = sum(1 for lr in self.listeners for m in lr.moves if m.broke_at >= window.faulted - 0.1)
        return window

    async def close(self) -> None:
        await cancel(*self._tasks)
        for person in (self.host, *self.people):
            await person.close()


@dataclass
class Ledger:
    """Every room change a host was answered for (room -> (version, state) answers), and every error."""

    acked: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    changes: int = 0


class Churn:
    """Hosts creating, starting and ending rooms one change at a time, writing down every answer."""

    def __init__(self, endpoints: Endpoints, workers: int = 2) -> None:
        self.endpoints = endpoints
        self.ledger = Ledger()
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._work(), name="churn") for _ in range(workers)]

    async def _work(self) -> None:
        for _ in range(MAX_HOSTS):
            if self._stop.is_set():
                return
            host = client(self.endpoints, fresh_user())
            try:
                for _ in range(ROOMS_PER_HOST):
                    if self._stop.is_set():
                        return
                    await self._one_room(host)
            finally:
                await host.close()

    async def _one_room(self, host: Client) -> None:
        room_id = ""
        for change in ("create", "start", "end"):
            try:
                if change == "create":
                    room = await host.create_room("kind e2e: churn")
                    room_id = room.room_id
                elif change == "start":
                    room = await host.start_room(room_id)
                else:
                    room = await host.end_room(room_id)
            except grpc.aio.AioRpcError as exc:
                self.ledger.errors.append(f"{change}: {exc.code().name}: {exc.details()}")
                return
            self.ledger.acked.setdefault(room.room_id, []).append((room.version, room.state))
            self.ledger.changes += 1
            await asyncio.sleep(CHANGE_PAUSE_S)

    async def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 30)
        await cancel(*self._tasks)

    async def lost(self) -> list[str]:
        """Acknowledged changes the cluster no longer shows: a room missing, older than an answer, or in
        another state at the same version."""
        reader = client(self.endpoints, fresh_user())
        problems: list[str] = []
        try:
            for room_id, answers in self.ledger.acked.items():
                version, state = max(answers)
                try:
                    room = await reader.get_room(room_id)
                except grpc.aio.AioRpcError as exc:
                    problems.append(f"{room_id}: {exc.code().name} {exc.details()} (acked v{version})")
                    continue
                if room.version < version or (room.version == version and room.state != state):
                    problems.append(
                        f"{room_id}: v{room.version} state {room.state}, acked v{version} {state}"
                    )
        finally:
            await reader.close()
        return problems
