"""`townhall demo`: a scripted room against the local topology, checked end to end.

A host with followers starts a room; connected followers are notified over Inbox; listeners
join and subscribe; the host speaks a real audio file (Opus, 20 ms frames) and every listener
must receive every frame, byte for byte, in order. Prints a summary; exit 0 only if all pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from townhall.cli import audio
from townhall.cli.endpoints import resolve, tokens
from townhall.client import Client, Endpoints, now_us
from townhall.core.auth import HOST, PUBLISH, SUBSCRIBE, Tokens
from townhall.live import Listener, Speaker

console = Console()
NOTIFY_TIMEOUT_S = 20.0
AUDIO_GRACE_S = 10.0


@dataclass
class Heard:
    """What one listener received."""

    payloads: list[bytes] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    gaps: int = 0


async def _listen(client: Client, room_id: str, expected: int, done: asyncio.Event, heard: Heard) -> None:
    # The client library's listener: it would move to another relay and resume if this one failed.
    last = (0, 0)
    async with contextlib.aclosing(Listener(client, room_id).chunks()) as chunks:
        async for chunk in chunks:
            received = now_us()
            heard.gaps += int(last[1] != 0 and chunk.epoch == last[0] and chunk.sequence != last[1] + 1)
            last = (chunk.epoch, chunk.sequence)
            for frame in chunk.frames:
                heard.payloads.append(frame.payload)
                heard.latencies_ms.append((received - frame.capture_ts_us) / 1000)
            if len(heard.payloads) >= expected:
                break
    done.set()


async def _await_notification(client: Client, room_id: str, ready: asyncio.Event) -> float:
    call = client.notifications()
    # The stream is open once the server has sent its initial metadata.
    await call.initial_metadata()
    ready.set()
    try:
        async for note in call:
            if note.room_id == room_id:
                return time.monotonic()
    finally:
        call.cancel()
    raise RuntimeError("inbox stream ended")


@dataclass(frozen=True)
class Check:
    """One demo check: what was measured and whether it passed."""

    name: str
    value: str
    ok: bool


async def demo(
    endpoints: Endpoints, followers: int, listeners: int, audio_file: Path | None, tokens: Tokens
) -> list[Check]:
    """Runs the scripted room against the given services; returns every check."""
    base = random.randrange(1, 2**40) * 1_000_000  # fresh user ids for each run

    def client(user: int, *grants: str) -> Client:
        return Client(endpoints, user, tokens.mint(user, grants))

    # Each user gets the grants its part needs: the host hosts and speaks, followers only follow.
    host = client(base, HOST, PUBLISH)
    fans = [client(base + 1 + i) for i in range(followers)]
    audience = [client(base + 100_000 + i, SUBSCRIBE) for i in range(listeners)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = audio_file or audio.synth_speechlike(Path(tmp) / "voice.wav", seconds=4.0)
            packets = audio.encode_opus(audio.read_wav(source))
        console.print(f"audio: {source.name}, {len(packets)} Opus frames of 20 ms")

        await asyncio.gather(*(f.follow(host.user) for f in fans))
        room = await host.create_room("Celebrity demo room", speakers=[])
        console.print(f"room {room.room_id} created by host {host.user}")

        ready = [asyncio.Event() for _ in fans]
        waits = [
            asyncio.create_task(_await_notification(f, room.room_id, r))
            for f, r in zip(fans, ready, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 10)
        started = time.monotonic()
        live = await host.start_room(room.room_id)
        done, pending = await asyncio.wait(waits, timeout=NOTIFY_TIMEOUT_S)
        for waiting in pending:
            waiting.cancel()
        notify_ms = [(t.result() - started) * 1000 for t in done if t.exception() is None]

        for listener in audience:
            listener.learn(live)  # as from a room list: a process behind on the room says so
        heard = [Heard() for _ in audience]
        finished = [asyncio.Event() for _ in audience]
        listening = [
            asyncio.create_task(_listen(c, room.room_id, len(packets), e, h))
            for c, e, h in zip(audience, finished, heard, strict=True)
        ]
        await asyncio.sleep(0.5)  # listeners subscribe before the first word
        speaker = Speaker(host, room.room_id)
        await speaker.speak(packets)
        accepted = speaker.accepted
        await asyncio.wait(listening, timeout=AUDIO_GRACE_S)
        for task in listening:
            task.cancel()
        joined = sum(1 for t in listening if t.done() and not t.cancelled() and t.exception() is None)
        await host.end_room(room.room_id)
    finally:
        for c in (host, *fans, *audience):
            await c.close()
    return _checks(followers, notify_ms, listeners, joined, len(packets), accepted, packets, heard)


def _checks(
    followers: int,
    notify_ms: list[float],
    listeners: int,
    joined: int,
    sent: int,
    accepted: int,
    packets: list[bytes],
    heard: list[Heard],
) -> list[Check]:
    latencies = np.array([x for h in heard for x in h.latencies_ms] or [np.nan])
    intact = sum(1 for h in heard if h.payloads == packets)
    received = [len(h.payloads) for h in heard]
    return [
        Check("followers notified", f"{len(notify_ms)}/{followers}", len(notify_ms) == followers),
        Check(
            "notification p99",
            f"{np.percentile(notify_ms, 99):.0f} ms" if notify_ms else "-",
            bool(notify_ms),
        ),
        Check("listeners joined and heard all", f"{joined}/{listeners}", joined == listeners),
        Check("frames sent / accepted", f"{sent} / {accepted}", sent == accepted),
        Check(
            "frames received (min per listener)",
            str(min(received, default=0)),
            min(received, default=0) == sent,
        ),
        Check("audio byte-identical, in order", f"{intact}/{listeners}", intact == listeners),
        Check("sequence gaps", str(sum(h.gaps for h in heard)), all(h.gaps == 0 for h in heard)),
        Check("audio latency p50", f"{np.nanpercentile(latencies, 50):.1f} ms", True),
        Check("audio latency p99", f"{np.nanpercentile(latencies, 99):.1f} ms", True),
    ]


def _print(checks: list[Check]) -> None:
    table = Table(title="Townhall demo")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("ok")
    for check in checks:
        table.add_row(check.name, check.value, "[green]yes[/green]" if check.ok else "[red]NO[/red]")
    console.print(table)


def run_demo(
    manifest: Path,
    followers: int,
    listeners: int,
    audio: Path | None,
    admission: str | None = None,
    notifier: str | None = None,
    crowd: str | None = None,
    config: str | None = None,
) -> int:
    """Runs the demo (addresses from flags, else the manifest); 0 if every check passed, 1 otherwise."""
    try:
        endpoints = resolve(manifest, admission, notifier, config, crowd)
        checks = asyncio.run(demo(endpoints, followers, listeners, audio, tokens(config)))
    except FileNotFoundError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    _print(checks)
    ok = all(c.ok for c in checks)
    console.print("[green]demo passed[/green]" if ok else "[red]demo failed[/red]")
    return 0 if ok else 1
