"""Partitions and host loss on the multi-host topology, measured as users notice them.

Every run drives the same workload through the published client ports, from outside the containers:

- hosts create, start and end rooms one change at a time (faults.admission.change_rooms), some of them in
  rooms the victim admission process owns; every answered change goes into a Ledger;
- each of those hosts has followers, whose notifications are counted by an Inbox of our own reading the
  notifications topic (devtools.fanout.counting_inbox): every room a host was told is live must reach
  every follower;
- a speaker talks in one live room whose listeners spread over an origin relay and its edges (relay tree of
  degree 2, two listeners per relay); each listener's Tape records the frames it heard.

Then one fault, bounded in time, and always healed: an admission owner cut off from the brokers; an owner
cut off from its peers (not from the brokers); an edge relay cut off from the room's origin; a broker
stopped; a broker partitioned away from every other host; a whole admission container killed (and started
again, as an orchestrator would). Afterwards: acknowledged changes missing from the room-state topic (read
from its beginning), room versions written twice with different contents (forks), followers never
notified, the audio each listener missed, and how long users waited (the longest room change across the
fault, the longest silence of a listener).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from townhall.client import Client, Endpoints
from townhall.core import sharding
from townhall.core.auth import GRANTS, Tokens
from townhall.core.tasks import cancel
from townhall.live import Listener, Speaker
from townhall.v1.common_pb2 import Room, RoomState
from townhall_tools.devtools.fanout import counting_inbox, import_followers
from townhall_tools.faults.admission import PAUSE_S, Ledger, change_rooms, check_topic, request_for
from townhall_tools.faults.measure import FRAME_MS, Outcome, Tape, audio_gap_ms, spread, until
from townhall_tools.faults.runner import Report, write
from townhall_tools.hosts.cluster import Cluster, Host
from townhall_tools.hosts.netcut import heal_all, hold_cut

console = Console(stderr=True)

BEFORE_S = 3.0  # the workload runs this long before the fault
FAULT_S = 8.0  # how long a cut (or a stopped broker, or a killed host) lasts
AFTER_S = 6.0  # the workload runs on this long after the heal
SLOTS_ON_VICTIM = 3  # hosts changing rooms the victim owns
SLOTS_ELSEWHERE = 1  # hosts changing rooms each other owner owns
RACERS = 1  # of the hosts changing the victim's rooms, those that race a start and an end (see _race)
FOLLOWERS = 5  # followers of each host
# Each listener joins through an admission process of its client's choosing (random), and each process
# places its first edge_target (2) of a room on the origin before the origin's report shows them: with 6
# listeners, a 2-2-2 split over the three owners put all six on the origin (12% of runs; 3 of 15 runs
# failed so). With 9, the origin takes at most 6 and at least 3 listeners are on edges in every run.
LISTENERS = 9
TALK_S = BEFORE_S + FAULT_S + AFTER_S + 30.0  # the speaker outlasts the run; it is stopped at its end
WAIT_S = 60.0  # the longest any wait of a run may take
RUNS_MAX = 20


@dataclass
class HostLedger(Ledger):
    """The Ledger of faults.admission, plus each room's host (whose followers it notifies)."""

    hosts: dict[str, int] = field(default_factory=dict)

    def record(self, room: Room) -> None:
        super().record(room)
        self.hosts[room.room_id] = room.host_id


@dataclass
class Workload:
    """What one run drives, and what it saw."""

    cluster: Cluster
    tokens: Tokens
    victim: Host  # the admission owner whose rooms some hosts change
    ledger: HostLedger = field(default_factory=HostLedger)
    # The room changers (user ids, drawn up front) and their followers.
    followers: dict[int, list[int]] = field(default_factory=dict)
    clients: list[Client] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    speaker: Speaker | None = None
    listeners: list[Listener] = field(default_factory=list)
    tapes: list[Tape] = field(default_factory=list)
    audio_errors: list[str] = field(default_factory=list)
    races: int = 0  # start/end races run (_race), and those whose start and end were both acknowledged
    races_both_acked: int = 0

    def __post_init__(self) -> None:
        slots = SLOTS_ON_VICTIM + SLOTS_ELSEWHERE * (len(self.members) - 1)
        for _ in range(slots):
            host = _fresh_user()
            self.followers[host] = [host + 1 + i for i in range(FOLLOWERS)]

    @property
    def all_followers(self) -> list[int]:
        """Every follower of every room changer."""
        return [f for followers in self.followers.values() for f in followers]

    @property
    def members(self) -> list[str]:
        """The admission owners' internal addresses (rooms are owned by rendezvous over them)."""
        return [h.internal for h in self.cluster.of("admission")]

    def endpoints(self) -> Endpoints:
        """Every admission owner's published port, the crowd lane's and the first notifier's."""
        owners = ",".join(h.grpc for h in self.cluster.of("admission"))
        crowd = self.cluster.of("crowd")
        return Endpoints(owners, self.cluster.of("notifier")[0].grpc, crowd=crowd[0].grpc if crowd else "")

    def user(self, user_id: int, via: Host | None = None) -> Client:
        """A client of `user_id` with every grant, using every admission process (or only `via`)."""
        ends = self.endpoints()
        if via is not None:
            ends = Endpoints(via.grpc, ends.notifier)
        client = Client(ends, user_id, self.tokens.mint(user_id, GRANTS))
        self.clients.append(client)
        return client

    async def start(self) -> None:
        """Followers first, then the room changers and the speaker with its listeners (open the counting
        Inbox for all_followers before, so nothing is missed)."""
        notifiers = [h.internal for h in self.cluster.of("notifier")]
        targets = [self.victim.internal] * SLOTS_ON_VICTIM
        targets += [m for m in self.members if m != self.victim.internal for _ in range(SLOTS_ELSEWHERE)]
        for slot, (target, (host_id, followers)) in enumerate(
            zip(targets, self.followers.items(), strict=True)
        ):
            owner = sharding.owner(f"user:{host_id}", notifiers)
            await import_followers(owner, host_id, followers, self.cluster.secrets.auth)
            if slot < RACERS:
                via = [self.user(host_id, h) for h in self.cluster.of("admission")]
                self.tasks.append(asyncio.create_task(self._race(via, target)))
            else:
                host = self.user(host_id)
                self.tasks.append(
                    asyncio.create_task(change_rooms(host, target, self.members, self.ledger, self.stop))
                )
        speaker_host = self.user(_fresh_user())
        room = (await speaker_host.create_room("hosts: audio")).room_id
        started = await speaker_host.start_room(room)
        self.speaker = Speaker(speaker_host, room)
        payloads = [index.to_bytes(4, "big") * 10 for index in range(int(TALK_S * 1000 / FRAME_MS))]
        self.tasks.append(asyncio.create_task(self._speak(payloads)))
        for i in range(LISTENERS):
            # Each listener knows the started room (as from its notification or a room list), so an
            # admission process that has not read the start yet sends it to another one.
            client = self.user(speaker_host.user + 100 + i)
            client.learn(started)
            listener = Listener(client, room)
            tape = Tape(speaker_host.user)
            self.listeners.append(listener)
            self.tapes.append(tape)
            self.tasks.append(asyncio.create_task(self._listen(listener, tape)))
        try:
            await until(lambda: all(t.heard >= 25 for t in self.tapes), WAIT_S, "every listener hearing")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {self.hearing()}") from None

    def hearing(self) -> str:
        """Each listener's frames heard, relay and interruptions, and any audio error: why one is silent."""
        each = [
            f"{t.heard} via {listener.relay or 'no relay'}"
            + "".join(f" ({m.reason} from {m.relay_before})" for m in listener.moves)
            for listener, t in zip(self.listeners, self.tapes, strict=True)
        ]
        return "; ".join(each + self.audio_errors)

    async def _race(self, via: list[Client], target: str) -> None:
        """One host on two devices: creates a room, then starts it through the victim and ends it through
        another process at the same moment. One owner orders the two (the second is refused or comes
        after); two processes that both take themselves for the owner both write the same next version,
        with different contents: a fork, if both are acknowledged."""
        victim, others = via[-1], via[:-1]
        rounds = 0
        while not self.stop.is_set():
            other = others[rounds % len(others)]
            rounds += 1
            key = request_for(victim.user, target, self.members)
            try:
                room = await other.create_room("hosts: race", request_id=key)
            except grpc.aio.AioRpcError as exc:
                self.ledger.errors.append(f"create: {exc.code().name}: {exc.details()}")
                continue
            self.ledger.record(room)
            answers = await asyncio.gather(
                victim.start_room(room.room_id), other.end_room(room.room_id), return_exceptions=True
            )
            self.races += 1
            self.races_both_acked += all(isinstance(a, Room) for a in answers)
            for answer in answers:
                if isinstance(answer, Room):
                    self.ledger.record(answer)
                elif isinstance(answer, grpc.aio.AioRpcError):
                    if answer.code() != grpc.StatusCode.FAILED_PRECONDITION:  # ended first: refused, fine
                        self.ledger.errors.append(f"race: {answer.code().name}: {answer.details()}")
                elif isinstance(answer, BaseException):
                    raise answer
            await asyncio.sleep(PAUSE_S)

    async def _speak(self, payloads: list[bytes]) -> None:
        assert self.speaker is not None
        try:
            await self.speaker.speak(payloads)
        except Exception as exc:
            self.audio_errors.append(f"speaker: {exc!r}")

    async def _listen(self, listener: Listener, tape: Tape) -> None:
        try:
            async for chunk in listener.chunks():
                tape.record(chunk)
        except Exception as exc:
            self.audio_errors.append(f"listener: {exc!r}")

    def relay_of(self, address: str) -> Host:
        """The relay container behind an advertised (published) address."""
        return next(h for h in self.cluster.of("relay") if h.grpc == address)

    async def close(self) -> None:
        """Stops every task and closes every client."""
        self.stop.set()
        await cancel(*self.tasks)
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()


# The faults. Each one is bounded in time and leaves every container running and healed.


def _ips(hosts: list[Host]) -> list[str]:
    return [h.ip for h in hosts]


async def owner_kafka_cut(cluster: Cluster, work: Workload) -> str:
    """The victim admission owner loses the three brokers (clients and peers still reach it)."""
    await hold_cut(cluster, {work.victim: _ips(cluster.of("kafka"))}, FAULT_S)
    return f"{work.victim.name} cut off from the brokers for {FAULT_S:.0f} s"


async def owner_peers_cut(cluster: Cluster, work: Workload) -> str:
    """The victim admission owner loses its peers (the other owners and the crowd lane), not the brokers."""
    peers = [h for h in cluster.hosts if h.service == "admission" and h != work.victim]
    await hold_cut(cluster, {work.victim: _ips(peers)}, FAULT_S)
    return f"{work.victim.name} cut off from the other admission processes for {FAULT_S:.0f} s"


async def edge_origin_cut(cluster: Cluster, work: Workload) -> str:
    """An edge relay carrying listeners loses the room's origin relay (both still reach everything else)."""
    assert work.speaker is not None
    origin = work.relay_of(work.speaker.relay)
    edges = sorted({lr.relay for lr in work.listeners if lr.relay and lr.relay != work.speaker.relay})
    if not edges:
        raise RuntimeError(f"no listener on an edge: every one is on the origin {origin.name}")
    edge = work.relay_of(edges[0])
    await hold_cut(cluster, {edge: [origin.ip]}, FAULT_S)
    return f"{edge.name} (edge) cut off from {origin.name} (origin) for {FAULT_S:.0f} s"


async def broker_stop(cluster: Cluster, work: Workload) -> str:
    """One broker stopped (SIGTERM: it hands its leaderships over), then started again."""
    del work
    broker = random.choice(cluster.of("kafka"))
    started = time.monotonic()
    await asyncio.to_thread(cluster.stop, broker, 20)
    await asyncio.sleep(max(0.0, started + FAULT_S - time.monotonic()))
    await asyncio.to_thread(cluster.start, broker)
    return f"{broker.name} stopped for {FAULT_S:.0f} s"


async def broker_partition(cluster: Cluster, work: Workload) -> str:
    """One broker cut off from every other container and from the host, then healed."""
    del work
    broker = random.choice(cluster.of("kafka"))
    others = [h.ip for h in cluster.hosts if h != broker]
    from townhall_tools.hosts.cluster import GATEWAY

    await hold_cut(cluster, {broker: [*others, GATEWAY]}, FAULT_S)
    return f"{broker.name} partitioned from every host for {FAULT_S:.0f} s"


async def host_kill(cluster: Cluster, work: Workload) -> str:
    """The victim admission owner's whole container killed (docker kill), started again FAULT_S later."""
    started = time.monotonic()
    await asyncio.to_thread(cluster.kill, work.victim)
    await asyncio.sleep(max(0.0, started + FAULT_S - time.monotonic()))
    await asyncio.to_thread(cluster.start, work.victim)
    await asyncio.to_thread(cluster.wait_serving, work.victim, WAIT_S)
    return f"{work.victim.name}'s container killed, started again after {FAULT_S:.0f} s"


Fault = Callable[[Cluster, Workload], Awaitable[str]]
SCENARIOS: dict[str, Fault] = {
    "owner-kafka-cut": owner_kafka_cut,
    "owner-peers-cut": owner_peers_cut,
    "edge-origin-cut": edge_origin_cut,
    "broker-stop": broker_stop,
    "broker-partition": broker_partition,
    "host-kill": host_kill,
}


def _fresh_user() -> int:
    return random.randrange(1, 2**40) * 1000


async def restore(cluster: Cluster) -> None:
    """Heals every cut and starts every stopped container again; waits until every service serves."""
    await asyncio.to_thread(heal_all, cluster)
    for host in cluster.hosts:
        if not cluster.running(host):
            await asyncio.to_thread(cluster.start, host)
        if host.role != "kafka":
            await asyncio.to_thread(cluster.wait_serving, host, WAIT_S)


async def one_run(cluster: Cluster, name: str) -> Outcome:
    """One run of one scenario: workload, fault, heal, checks."""
    outcome = Outcome(name, "")
    await restore(cluster)
    tokens = Tokens(cluster.secrets.auth)
    victim = cluster.of("admission")[-1]
    work = Workload(cluster, tokens, victim)
    try:
        async with counting_inbox(cluster.kafka(), work.all_followers, cluster.secrets.auth) as inbox:
            await work.start()
            await asyncio.sleep(BEFORE_S)
            faulted = work.ledger.faulted = time.monotonic()
            at_fault = work.speaker.captured if work.speaker else 0
            outcome.fault = await asyncio.wait_for(SCENARIOS[name](cluster, work), FAULT_S + WAIT_S)
            healed = time.monotonic()
            await asyncio.sleep(AFTER_S)
            work.stop.set()
            changers = work.tasks[: len(work.followers)]
            await asyncio.wait_for(asyncio.gather(*changers, return_exceptions=True), WAIT_S)
            ended = time.monotonic()
            # Rooms the hosts were told are live: every follower of theirs must be notified.
            live = [
                (room_id, work.ledger.hosts[room_id])
                for room_id, changes in work.ledger.acked.items()
                if work.ledger.hosts.get(room_id) in work.followers
                and any(state == RoomState.ROOM_STATE_LIVE for _, state in changes)
            ]

            def missing() -> int:
                return sum(
                    1 for room_id, host in live for f in work.followers[host] if not inbox.got(room_id).get(f)
                )

            with contextlib.suppress(TimeoutError):
                await until(lambda: missing() == 0, WAIT_S, "every follower notified", step_s=0.5)
            notifications_lost = missing()
        lost, forks = await check_topic(cluster.kafka(), work.ledger)
        gaps = [audio_gap_ms(t.missing(max(t.first_heard(), at_fault - 25), t.newest)) for t in work.tapes]
        silences = [t.longest_silence(faulted - 1.0, ended) for t in work.tapes]
        across = [e - s for s, e, _ in work.ledger.timed if s <= faulted <= e or s >= faulted]
        answered_after = [t for t in work.ledger.answered if t >= healed]
        outcome.figures.update(
            changes_acked=sum(len(v) for v in work.ledger.acked.values()),
            lost=lost,
            forks=forks,
            notifications_expected=sum(len(work.followers[h]) for _, h in live),
            notifications_lost=notifications_lost,
            followers=len(work.all_followers),
            gap_ms_max=max(gaps, default=0.0),
            gap_ms_p50=spread(gaps)[0],
            silence_s_max=round(max(silences, default=0.0), 3),
            longest_change_s=round(max(across, default=0.0), 3),
            first_change_after_heal_s=round(min(answered_after, default=ended) - healed, 3),
            recovery_s=round(max(max(across, default=0.0), max(silences, default=0.0)), 3),
            fault_s=round(healed - faulted, 3),
            races=work.races,
            races_both_acked=work.races_both_acked,
            errors=len(work.ledger.errors) + len(work.audio_errors),
        )
        outcome.expect(lost == 0, f"{lost} acknowledged room changes are not in the room-state topic")
        outcome.expect(forks == 0, f"{forks} room versions were written twice with different contents")
        outcome.expect(
            notifications_lost == 0, f"{notifications_lost} notifications never reached a follower"
        )
        if work.ledger.errors:
            outcome.figures["error_sample"] = work.ledger.errors[0][:200]  # type: ignore[assignment]
    except Exception as exc:
        # A run that could not finish is a failed run, with why; the next one starts clean.
        outcome.problems.append(f"run failed: {exc!r}"[:1500])
    finally:
        await work.close()
        await restore(cluster)
    return outcome


class HostsReport(Report):
    """Every outcome, one row per scenario: the faults runner's Report (JSON, loading) with this harness's
    columns."""

    def summary(self) -> list[dict[str, Any]]:
        """Runs, passes, what was lost, audio gap and recovery (p50 / max over the runs)."""
        rows = []
        for name, outcomes in self.outcomes.items():
            figures = [o.figures for o in outcomes]

            def total(key: str, figures: list[dict[str, Any]] = figures) -> float:
                return float(sum(f.get(key, 0) for f in figures))

            rows.append(
                {
                    "scenario": name,
                    "fault": next((o.fault for o in outcomes if o.fault), name),
                    "runs": len(outcomes),
                    "passed": sum(o.ok for o in outcomes),
                    "acked_changes": total("changes_acked"),
                    "lost": total("lost"),
                    "forks": total("forks"),
                    "notifications_lost": total("notifications_lost"),
                    "notifications_expected": total("notifications_expected"),
                    "gap_ms": spread(f.get("gap_ms_max", 0.0) for f in figures),
                    "silence_s": spread(f.get("silence_s_max", 0.0) for f in figures),
                    "recovery_s": spread(f.get("recovery_s", 0.0) for f in figures),
                    "errors": total("errors"),
                    "problems": sorted({p for o in outcomes for p in o.problems}),
                }
            )
        return rows

    def markdown(self) -> str:
        """The summary as a Markdown table (docs/hosts.md)."""
        lines = [
            "| scenario | runs | passed | acked changes | lost | forks | notifications lost / expected "
            "| audio missed p50 / max (ms) | longest silence p50 / max (s) | recovery p50 / max (s) "
            "| client errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.summary():
            lines.append(
                f"| `{r['scenario']}` | {r['runs']} | {r['passed']} | {r['acked_changes']:g} | "
                f"{r['lost']:g} | "
                f"{r['forks']:g} | {r['notifications_lost']:g} / {r['notifications_expected']:g} | "
                f"{r['gap_ms'][0]:.0f} / {r['gap_ms'][1]:.0f} | "
                f"{r['silence_s'][0]:.2f} / {r['silence_s'][1]:.2f} | {r['recovery_s'][0]:.2f} / "
                f"{r['recovery_s'][1]:.2f} | {r['errors']:g} |"
            )
        return "\n".join(lines)


def run_faults(
    cluster: Cluster, runs: int, only: list[str] | None = None, show: Callable[[Outcome], None] | None = None
) -> HostsReport:
    """Runs the chosen scenarios `runs` times each on the running topology."""
    report = HostsReport()
    for name in only or list(SCENARIOS):
        for _ in range(runs):
            outcome = asyncio.run(one_run(cluster, name))
            report.outcomes.setdefault(name, []).append(outcome)
            if show is not None:
                show(outcome)
    return report


def run_cli(cluster: Cluster, args: argparse.Namespace) -> int:
    """`townhall cluster faults`: the scenarios on the running topology; JSON and a Markdown table."""
    if not 1 <= args.runs <= RUNS_MAX:
        console.print(f"[red]--runs must be within 1..{RUNS_MAX}[/red]")
        return 2
    unknown = set(args.only or ()) - set(SCENARIOS)
    if unknown:
        console.print(f"[red]unknown scenarios {sorted(unknown)}; known: {list(SCENARIOS)}[/red]")
        return 2
    if not cluster.manifest.exists():
        console.print("[red]the topology is not up: make cluster-up[/red]")
        return 2

    def show(outcome: Outcome) -> None:
        mark = "[green]ok[/green]" if outcome.ok else f"[red]FAILED[/red] {'; '.join(outcome.problems)}"
        console.print(f"{outcome.scenario}: {mark} {outcome.fault}: {json.dumps(outcome.figures)}")

    report = run_faults(cluster, args.runs, args.only, show)
    table = Table(title="Partitions and host loss")
    for column in (
        "scenario",
        "runs",
        "passed",
        "lost",
        "forks",
        "notif. lost",
        "gap ms max",
        "recovery s max",
    ):
        table.add_column(column)
    for r in report.summary():
        table.add_row(
            r["scenario"], str(r["runs"]), str(r["passed"]), f"{r['lost']:g}", f"{r['forks']:g}",
            f"{r['notifications_lost']:g}", f"{r['gap_ms'][1]:.0f}", f"{r['recovery_s'][1]:.2f}",
        )  # fmt: skip
    console.print(table)
    print(report.markdown())
    path: Path = args.json or cluster.root / "faults.json"
    write(report, path)
    console.print(f"figures written to {path}")
    return 0 if all(r["passed"] == r["runs"] for r in report.summary()) else 1
