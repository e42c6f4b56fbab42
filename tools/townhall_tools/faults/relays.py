"""Relay faults: kill -9 or SIGTERM of a room's edge or origin while a speaker talks to listeners.

The listeners and the speaker use the client library as any application would (townhall.live):
when a stream ends they join again and resume. What is measured is what they notice: frames
never heard (in audio time), the longest silence, and the time until every listener hears live
audio again. Bounds (issue 6): an edge kill costs at most 2 s of audio, an origin kill at most
3 s, a SIGTERM nothing at all; no client sees an error.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from townhall.core.tasks import cancel
from townhall.live import Listener, Speaker
from townhall_tools.devtools.topology import Process, Topology
from townhall_tools.faults.cluster import endpoints, exited, fault, fresh_user, restore, user
from townhall_tools.faults.measure import FRAME_MS, Outcome, Tape, audio_gap_ms, spread, until

# Most missing audio each fault may cost a listener, in ms.
BOUNDS_MS = {("edge", True): 2_000, ("origin", True): 3_000, ("edge", False): 0, ("origin", False): 0}
LISTENERS = 6
WARMUP_S = 1.5
AFTER_S = 2.0
# The speaker talks this long in all: warm-up, the fault and the recovery fit well inside it.
TALK_S = 14.0
WAIT_S = 30.0


def relay_env() -> dict[str, str]:
    """Settings for the relay topology: two listeners per relay, so a room of six spans three."""
    return {"TOWNHALL_RELAY_EDGE_TARGET": "2", "TOWNHALL_RELAY_TREE_DEGREE": "2"}


async def relay_fault(topology: Topology, victim: str, kill: bool) -> Outcome:
    """One run: a room on three relays; `victim` ("edge" or "origin") is killed (or SIGTERMed)."""
    how = "kill -9" if kill else "SIGTERM"
    outcome = Outcome(f"{victim}-{'kill' if kill else 'sigterm'}", f"{how} of a room's {victim} relay")
    ends = endpoints(topology)
    host = user(ends, fresh_user())
    audience = [user(ends, fresh_user() + i + 1) for i in range(LISTENERS)]
    tasks: list[asyncio.Task[None]] = []
    errors: list[str] = []
    proc: Process | None = None
    try:
        room = (await host.create_room("fault: relay")).room_id
        started = await host.start_room(room)
        for client in audience:
            client.learn(started)  # as from a notification: a process behind on the room says so
        speaker = Speaker(host, room)
        frames = int(TALK_S * 1000 / FRAME_MS)
        payloads = [index.to_bytes(4, "big") * 10 for index in range(frames)]
        speaking = asyncio.create_task(speaker.speak(payloads), name="speaker")
        listeners = [Listener(client, room) for client in audience]
        tapes = [Tape(host.user) for _ in listeners]

        async def listen(listener: Listener, tape: Tape) -> None:
            try:
                async for chunk in listener.chunks():
                    tape.record(chunk)
            except Exception as exc:
                errors.append(f"listener: {exc!r}")

        tasks = [asyncio.create_task(listen(lr, tp)) for lr, tp in zip(listeners, tapes, strict=True)]
        warm = int(WARMUP_S * 1000 / FRAME_MS)
        await until(lambda: all(t.heard >= warm for t in tapes), WAIT_S, "every listener hearing audio")

        origin = speaker.relay
        on = Counter(lr.relay for lr in listeners)
        if victim == "origin":
            target = origin
        else:
            edges = [relay for relay, _ in on.most_common() if relay != origin]
            if not edges:
                outcome.problems.append(f"no listener on an edge: {dict(on)}")
                return outcome
            target = edges[0]
        affected = [i for i, lr in enumerate(listeners) if victim == "origin" or lr.relay == target]
        at_fault = speaker.captured
        faulted = time.monotonic()
        proc = next(p for p in topology.of("relay") if p.grpc == target)
        fault(topology, proc, kill)
        recovered = await until(
            lambda: all(t.heard_after(at_fault + 5) for t in tapes), WAIT_S, "every listener hearing again"
        )
        await asyncio.wait_for(speaking, TALK_S + WAIT_S)
        last = frames - 1
        await until(lambda: all(t.newest >= last for t in tapes), WAIT_S, "every listener hearing the end")
        await asyncio.sleep(0.3)  # anything still on its way
        if not kill:
            outcome.expect(
                await exited(proc) == 0,
                f"the stopped relay exited with {proc.popen and proc.popen.returncode}",
            )

        moved = [m.resumed_at for lr in listeners for m in lr.moves if m.broke_at >= faulted - 0.1]
        gaps = [audio_gap_ms(t.missing(t.first_heard(), last)) for t in tapes]
        silences = [t.longest_silence(faulted - 1.0, recovered + 1.0) for t in tapes]
        hit = [gaps[i] for i in affected]
        gap_p50, gap_max = spread(hit)
        outcome.figures.update(
            listeners=len(tapes),
            affected=len(affected),
            recovery_s=round(recovered - faulted, 3),
            # Until the last listener of the stopped relay heard audio through another one.
            moved_s=round(max(moved, default=faulted) - faulted, 3),
            gap_ms_p50=gap_p50,
            gap_ms_max=max(gaps),
            silence_s_p50=round(spread(silences[i] for i in affected)[0], 3),
            silence_s_max=round(max(silences), 3),
            speaker_moves=len(speaker.moves),
            speaker_lost_frames=speaker.lost,
            listener_moves=sum(len(lr.moves) for lr in listeners),
            epochs_seen=max(len(lr.epochs) for lr in listeners),
            duplicates_dropped=sum(lr.duplicates for lr in listeners),
            out_of_order=sum(t.out_of_order for t in tapes),
            errors=len(errors),
        )
        bound = BOUNDS_MS[(victim, kill)]
        outcome.expect(gap_max <= bound, f"a listener missed {gap_max:.0f} ms of audio (bound {bound} ms)")
        unaffected = [gaps[i] for i in range(len(tapes)) if i not in affected]
        outcome.expect(
            all(g == 0 for g in unaffected), f"listeners off the {victim} lost audio: {unaffected}"
        )
        outcome.expect(not errors, f"clients saw errors: {errors[:3]}")
        outcome.expect(outcome.figures["out_of_order"] == 0, "frames arrived out of order")
    finally:
        await cancel(*tasks)
        for client in (host, *audience):
            await client.close()
        if proc is not None:
            # The next run needs all three relays again, whatever happened in this one.
            outcome.figures["restore_s"] = round(await restore(topology, proc), 3)
    return outcome


async def run(topology: Topology, victim: str, kill: bool) -> Outcome:
    """A run whose unexpected failure (a timeout) becomes a problem of the outcome, not a crash."""
    try:
        return await relay_fault(topology, victim, kill)
    except TimeoutError as exc:
        return Outcome(f"{victim}-{'kill' if kill else 'sigterm'}", "", problems=[str(exc)])
