"""Moderation that holds: admission and a relay tree (origin and edges) in-process, on the real broker.

Everything a user does goes through Admission.Join and the tickets it hands out; the relays follow the
room-state topic and enforce what the room says (relay/guard.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.helpers import admission_members, client, config_for, rpc_error, serving
from tests.integration.test_relay import TICKET_KEYS, TICKET_PRIVATE_KEY, TIMEOUT, frame_ids, read_until
from tests.integration.test_relay_tree import Tree, tree
from townhall.admission.app import AdmissionApp
from townhall.client import Client, publish_status
from townhall.core.auth import PUBLISH, SUBSCRIBE
from townhall.core.config import KafkaConfig
from townhall.v1.admission_pb2 import Grant
from townhall.v1.common_pb2 import Role, Room, RoomState
from townhall.v1.relay_pb2 import AudioFrame, Chunk

pytestmark = pytest.mark.kafka
REPORT_S = 0.2  # relay load reports: who of each room's hosts is connected (host failover)
CUT_RUNS = 12  # removals measured on edges
FIGURES = Path(__file__).resolve().parents[2] / ".townhall" / "figures"


@dataclasses.dataclass
class Site:
    """A relay tree and an admission process that hands out its relays."""

    relays: Tree
    admission: str
    app: AdmissionApp
    users: list[Client] = dataclasses.field(default_factory=list)
    _next: int = dataclasses.field(default_factory=lambda: random.randrange(1, 2**40) * 1000)

    def user(self, **kw: Any) -> Client:
        """A new user of this site (all grants unless told)."""
        self._next += 1
        made = client(self.admission, self._next, **kw)
        self.users.append(made)
        return made

    def relay_index(self, address: str) -> int:
        return self.relays.addresses.index(address)


@asynccontextmanager
async def site(kafka: KafkaConfig, host_grace_s: float = 0.0, relays: int = 3) -> AsyncIterator[Site]:
    """`relays` relays following the room-state topic and one admission process in front of them."""
    async with tree(
        relays,
        kafka_bootstrap=kafka.bootstrap,
        follow_room_state="true",
        load_report_s=str(REPORT_S),
        chunk_s="0.05",
    ) as t:
        config = config_for(
            kafka,
            admission={
                "relays": tuple(t.addresses),
                "relays_internal": tuple(t.internals),
                "host_grace_s": host_grace_s,
            },
            # One listener of a room per relay before the next relay takes the room: edges at once.
            relay={"edge_target": 1, "tree_degree": 2, "load_report_s": REPORT_S},
            tickets={"private_key": TICKET_PRIVATE_KEY, "public_keys": (TICKET_KEYS,)},
        )
        app = AdmissionApp(config)
        async with serving(app, config) as address:
            handle = Site(t, address, app)
            try:
                yield handle
            finally:
                for c in handle.users:
                    await c.close()


async def live_room(host: Client) -> Room:
    room = await host.create_room("Moderated room")
    return await host.start_room(room.room_id)


def speaking(c: Client, grant: Grant, seconds: float = 60.0) -> asyncio.Task[int]:
    """The user publishing 20 ms frames (numbered from 0) for up to `seconds`, as a task."""
    payloads = [bytes([i % 256]) * 40 for i in range(int(seconds * 50))]
    return asyncio.create_task(c.publish(grant, payloads))


async def ended_with(call: Any, within_s: float = 10.0) -> tuple[grpc.aio.AioRpcError, float]:
    """Reads a stream until it fails; the error and when it came (monotonic). Fails on a hang."""
    deadline = time.monotonic() + within_s
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the stream was not cut"
        try:
            chunk = await asyncio.wait_for(call.read(), remaining)
        except grpc.aio.AioRpcError as exc:
            return exc, time.monotonic()
        assert chunk is not grpc.aio.EOF, "the stream ended without a status"


async def task_error(task: asyncio.Task[Any], within_s: float = 10.0) -> grpc.aio.AioRpcError:
    try:
        await asyncio.wait_for(task, within_s)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded but should have failed")


async def eventually(check: Callable[[], Any], within_s: float = 20.0) -> Any:
    """Polls an async `check` until it returns something truthy; fails after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def figures(name: str, data: dict[str, Any]) -> None:
    """Records measured figures (never asserted on) in .townhall/figures/<name>.json and the test log."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / f"{name}.json").write_text(json.dumps(data, indent=2))
    print(f"\n{name}: {json.dumps(data)}")


async def test_a_raised_hand_approved_by_the_host_puts_the_listener_on_stage_and_their_new_ticket_publishes(
    kafka: KafkaConfig,
) -> None:
    async with site(kafka) as s:
        host, fan, audience = s.user(), s.user(), s.user()
        room = await live_room(host)
        as_listener = await fan.join(room.room_id)
        assert as_listener.role == Role.ROLE_LISTENER
        raised = await fan.raise_hand(room.room_id)
        assert list(raised.hand_ids) == [fan.user]
        # A listener's ticket never publishes, hand raised or not.
        refused = await task_error(speaking(fan, as_listener, 1))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        approved = await host.invite(room.room_id, fan.user)
        assert fan.user in approved.speaker_ids and list(approved.hand_ids) == []

        on_stage = await fan.join(room.room_id)
        assert on_stage.role == Role.ROLE_SPEAKER
        hearing = audience.subscribe(await audience.join(room.room_id), room.room_id)
        await asyncio.sleep(0.3)  # the edge's pull is open before the first word
        published = await asyncio.wait_for(
            fan.publish(on_stage, [bytes([i]) * 40 for i in range(25)]), TIMEOUT
        )
        heard = await read_until(hearing, lambda ch: len(frame_ids(ch)) >= 25)
        hearing.cancel()
    assert published == 25
    assert frame_ids([c for _, c in heard]) == [(fan.user, seq) for seq in range(25)]


async def test_an_invited_user_accepts_and_speaks_and_a_demoted_speaker_is_cut_off_mid_sentence(
    kafka: KafkaConfig,
) -> None:
    async with site(kafka) as s:
        host, guest = s.user(), s.user()
        room = await live_room(host)
        invited = await host.invite(room.room_id, guest.user)
        assert list(invited.invited_ids) == [guest.user]
        assert guest.user in (await guest.accept_invite(room.room_id)).speaker_ids
        grant = await guest.join(room.room_id)
        assert grant.role == Role.ROLE_SPEAKER
        stage_feed = guest.subscribe(grant, room.room_id)
        talking = speaking(guest, grant)
        await read_until(stage_feed, lambda ch: len(ch) >= 5)  # the stage hears the guest's frames

        await host.set_role(room.room_id, guest.user, Role.ROLE_LISTENER)
        error = await task_error(talking)
        feed_error, _ = await ended_with(stage_feed)
        again = await guest.join(room.room_id)
    for e in (error, feed_error):
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no longer on the stage" in (e.details() or "")
    assert again.role == Role.ROLE_LISTENER


async def test_a_silent_speaker_moved_off_the_stage_is_cut_without_sending_another_frame(
    kafka: KafkaConfig,
) -> None:
    async with site(kafka, relays=1) as s:
        host, quiet = s.user(), s.user()
        room = await live_room(host)
        await host.set_role(room.room_id, quiet.user, Role.ROLE_SPEAKER)
        stub, ticket = quiet.relay(await quiet.join(room.room_id))
        never = asyncio.Event()

        async def one_word_then_silence() -> AsyncIterator[AudioFrame]:
            yield AudioFrame(sequence=0, capture_ts_us=time.time_ns() // 1000, payload=b"hi")
            await never.wait()

        publishing = stub.Publish(one_word_then_silence(), metadata=ticket)
        await eventually(lambda: asyncio.sleep(0, s.relays.apps[0].guard.streams(room.room_id) == 1))
        await host.set_role(room.room_id, quiet.user, Role.ROLE_LISTENER)
        error = await rpc_error(publishing)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no longer on the stage" in (error.details() or "")


async def test_a_muted_speakers_frames_are_dropped_at_the_origin_while_the_others_go_on(
    kafka: KafkaConfig,
) -> None:
    async with site(kafka) as s:
        host, loud, calm, listener = s.user(), s.user(), s.user(), s.user()
        room = await live_room(host)
        for speaker in (loud, calm):
            await host.set_role(room.room_id, speaker.user, Role.ROLE_SPEAKER)
        grants = [await c.join(room.room_id) for c in (loud, calm)]
        hearing = listener.subscribe(await listener.join(room.room_id), room.room_id)
        talking = [speaking(c, g) for c, g in zip((loud, calm), grants, strict=True)]
        both = [c for _, c in await read_until(hearing, lambda ch: {loud.user, calm.user} <= speakers_in(ch))]

        muted = await host.mute(room.room_id, loud.user)
        assert list(muted.muted_ids) == [loud.user]
        # Audio goes on: once the loud speaker's last frame has passed, the calm one is heard alone.
        during = [
            c for _, c in await read_until(hearing, lambda ch: calm_alone(ch, calm.user, 40), TIMEOUT * 3)
        ]
        assert not talking[0].done(), "a muted speaker's stream stays open"
        await host.mute(room.room_id, loud.user, muted=False)
        after = [
            c for _, c in await read_until(hearing, lambda ch: loud.user in speakers_in(ch), TIMEOUT * 3)
        ]
        for task in talking:
            task.cancel()
        hearing.cancel()
    calm_heard = [seq for speaker, seq in frame_ids(both + during + after) if speaker == calm.user]
    assert calm_heard == list(range(calm_heard[0], calm_heard[0] + len(calm_heard))), (
        "the calm speaker lost nothing"
    )
    loud_before = [seq for speaker, seq in frame_ids(both + during) if speaker == loud.user]
    loud_after = [seq for speaker, seq in frame_ids(after) if speaker == loud.user]
    assert loud_after[0] > max(loud_before) + 40, "frames sent while muted were dropped, not delayed"


def speakers_in(chunks: list[Chunk]) -> set[int]:
    return {f.speaker_id for c in chunks for f in c.frames}


def calm_alone(chunks: list[Chunk], calm: int, count: int) -> bool:
    """The last `count` chunks all carry frames, and only the calm speaker's."""
    tail = chunks[-count:]
    return len(tail) == count and all(c.frames and speakers_in([c]) == {calm} for c in tail)


async def test_removal_with_a_ban_cuts_a_listener_on_an_edge_at_once_and_holds(kafka: KafkaConfig) -> None:
    """Also measures the cut-off time on an edge: Remove returning to the listener's stream failing."""
    cuts_ms: list[float] = []  # from Remove returning to the cut (negative: the cut came first)
    asked_ms: list[float] = []  # from Remove being sent (it waits for Kafka's acknowledgement)
    async with site(kafka) as s:
        host = s.user()
        room = await live_room(host)
        talking = speaking(host, await host.join(room.room_id), seconds=120)
        while len(cuts_ms) < CUT_RUNS:
            crowd = [s.user() for _ in range(4)]
            grants = [await c.join(room.room_id) for c in crowd]
            calls = [c.subscribe(g, room.room_id) for c, g in zip(crowd, grants, strict=True)]
            for call in calls:
                await read_until(call, lambda ch: len(ch) >= 1)  # audio reaches everyone
            on_edges = [
                (c, g, call)
                for c, g, call in zip(crowd, grants, calls, strict=True)
                if s.relay_index(g.relay_address) != 0
            ]
            assert on_edges, "one listener per relay: most of the crowd is on edges"
            for banned, _, call in on_edges:
                ending = asyncio.create_task(ended_with(call))
                await asyncio.sleep(0.05)  # the reader is waiting on the stream
                asked_at = time.monotonic()
                await host.remove(room.room_id, banned.user, ban=True)
                removed_at = time.monotonic()
                error, cut_at = await ending
                cuts_ms.append((cut_at - removed_at) * 1000)
                asked_ms.append((cut_at - asked_at) * 1000)
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
                assert f"user {banned.user} is banned from room {room.room_id}" in (error.details() or "")
            # Everyone else keeps listening.
            for c, call in zip(crowd, calls, strict=True):
                if all(c is not e[0] for e in on_edges):
                    await read_until(call, lambda ch: len(ch) >= 3)
                    call.cancel()

        # Held: the banned user cannot join again, nor use the old ticket anywhere it is valid.
        banned, grant, _ = on_edges[-1]
        rejoin = await rpc_error(banned.join(room.room_id))
        reuse = banned.subscribe(grant, room.room_id)
        reuse_error, _ = await ended_with(reuse)
        talking.cancel()
    assert rejoin.code() == grpc.StatusCode.PERMISSION_DENIED and "banned" in (rejoin.details() or "")
    assert reuse_error.code() == grpc.StatusCode.PERMISSION_DENIED and "banned" in (
        reuse_error.details() or ""
    )
    figures(
        "moderation-edge-cutoff",
        {
            "runs": len(cuts_ms),
            "after_remove_returned_ms": summary(cuts_ms),
            "after_remove_sent_ms": summary(asked_ms),
        },
    )


def summary(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 1),
        "max": round(ordered[-1], 1),
        "min": round(ordered[0], 1),
        "all": [round(v, 1) for v in values],
    }


async def test_a_removed_speaker_is_cut_at_the_origin_and_may_join_again_as_a_listener_with_a_new_ticket(
    kafka: KafkaConfig,
) -> None:
    async with site(kafka) as s:
        host, rude = s.user(), s.user()
        room = await live_room(host)
        await host.set_role(room.room_id, rude.user, Role.ROLE_SPEAKER)
        old = await rude.join(room.room_id)
        talking = speaking(rude, old)
        feed = rude.subscribe(old, room.room_id)
        await read_until(feed, lambda ch: len(ch) >= 3)
        removed = await host.remove(room.room_id, rude.user)
        assert rude.user not in removed.speaker_ids and list(removed.banned_ids) == []
        cut = await task_error(talking)
        feed_error, _ = await ended_with(feed)
        # Not banned: a new ticket works; the old one stays void.
        fresh = await rude.join(room.room_id)
        listening = rude.subscribe(fresh, room.room_id)
        host_talking = speaking(host, await host.join(room.room_id))
        await read_until(listening, lambda ch: len(ch) >= 2)
        stale, _ = await ended_with(rude.subscribe(old, room.room_id))
        # grpc.aio can report a write racing the end of the stream as INTERNAL (grpc/grpc#36066): the
        # client asks the relay again, and the speaker sees the relay's own reason.
        lost = grpc.aio.AioRpcError(
            grpc.StatusCode.INTERNAL,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "Internal error from Core",
            'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object>,)',
        )
        recovered = await publish_status(*rude.relay(old), lost)
        host_talking.cancel()
        listening.cancel()
    assert fresh.role == Role.ROLE_LISTENER
    for e in (cut, feed_error, stale, recovered):
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "was removed from room" in (e.details() or "")


async def test_moderation_needs_the_grant_and_the_role_and_says_what_is_wrong(kafka: KafkaConfig) -> None:
    async with site(kafka, relays=1) as s:
        host, cohost, speaker, listener = s.user(), s.user(), s.user(), s.user()
        no_grant = s.user(grants=(SUBSCRIBE, PUBLISH))
        room = await live_room(host)
        await host.set_role(room.room_id, cohost.user, Role.ROLE_COHOST)
        await host.set_role(room.room_id, speaker.user, Role.ROLE_SPEAKER)
        cases = [
            (
                listener.remove(room.room_id, speaker.user),
                grpc.StatusCode.PERMISSION_DENIED,
                "only the host and co-hosts",
            ),
            (
                no_grant.mute(room.room_id, speaker.user),
                grpc.StatusCode.PERMISSION_DENIED,
                "'moderate' grant",
            ),
            (
                cohost.remove(room.room_id, host.user, ban=True),
                grpc.StatusCode.PERMISSION_DENIED,
                "host of room",
            ),
            (
                cohost.set_role(room.room_id, speaker.user, Role.ROLE_COHOST),
                grpc.StatusCode.PERMISSION_DENIED,
                "only the host",
            ),
            (
                host.remove(room.room_id, host.user),
                grpc.StatusCode.PERMISSION_DENIED,
                "cannot remove themselves",
            ),
            (
                host.set_role(room.room_id, speaker.user, Role.ROLE_HOST),
                grpc.StatusCode.INVALID_ARGUMENT,
                "role must be one of",
            ),
            (host.mute(room.room_id, 0), grpc.StatusCode.INVALID_ARGUMENT, "user_id is required"),
            (host.invite("no-such-room", speaker.user), grpc.StatusCode.NOT_FOUND, "does not exist"),
            (host.invite("bad room!", speaker.user), grpc.StatusCode.INVALID_ARGUMENT, "room_id may only"),
            (
                listener.accept_invite(room.room_id),
                grpc.StatusCode.FAILED_PRECONDITION,
                "has not been invited",
            ),
            (host.mute(room.room_id, listener.user), grpc.StatusCode.FAILED_PRECONDITION, "not on the stage"),
            (
                host.set_role(room.room_id, 77, Role.ROLE_COHOST),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "2 co-hosts",
            ),
        ]
        # The second co-host fills the co-host places for the last case.
        await host.set_role(room.room_id, 76, Role.ROLE_COHOST)
        for call, code, needle in cases:
            error = await rpc_error(call)
            assert error.code() == code, (needle, error.details())
            assert needle in (error.details() or ""), (needle, error.details())
        # Repeating a change that holds is answered with the same version: retries are safe.
        once = await cohost.mute(room.room_id, speaker.user)
        twice = await cohost.mute(room.room_id, speaker.user)
        assert once.version == twice.version and list(twice.muted_ids) == [speaker.user]


async def test_moderation_on_a_non_owner_is_forwarded_to_the_rooms_owner(kafka: KafkaConfig) -> None:
    tickets = {"private_key": TICKET_PRIVATE_KEY, "public_keys": (TICKET_KEYS,)}
    async with (
        tree(1, kafka_bootstrap=kafka.bootstrap, follow_room_state="true") as t,
        admission_members(
            kafka, 2, tickets, relays=tuple(t.addresses), relays_internal=tuple(t.internals)
        ) as started,
    ):
        addresses = [address for address, _ in started]
        users: list[Client] = []
        try:
            base = random.randrange(1, 2**40) * 1000
            host = client(addresses[0], base)
            users.append(host)
            room = await live_room(host)
            owner = started[0][1].peers.owner(room.room_id)
            other = next(address for address, app in started if app.peers.me != owner)
            # The host's own token, sent to the process that does not own the room.
            host_elsewhere, stranger = client(other, base), client(other, base + 1)
            banned = [client(a, base + 50) for a in addresses]
            users += [host_elsewhere, stranger, *banned]
            removed = await host_elsewhere.remove(room.room_id, base + 50, ban=True)
            denied = await rpc_error(stranger.remove(room.room_id, base + 51))

            async def refused_everywhere() -> bool:
                codes = []
                for c in banned:  # the owner, and the other process from its replica of the room
                    try:
                        await c.join(room.room_id, give_up_after_s=1)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
                return codes == [grpc.StatusCode.PERMISSION_DENIED] * 2

            assert await eventually(refused_everywhere)
        finally:
            for c in users:
                await c.close()
    assert list(removed.banned_ids) == [base + 50]
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only the host and co-hosts" in (denied.details() or "")


async def test_the_hosts_dropped_connection_hands_the_room_to_the_co_host(kafka: KafkaConfig) -> None:
    grace_s = 2.0
    async with site(kafka, host_grace_s=grace_s) as s:
        host, cohost, listener = s.user(), s.user(), s.user()
        room = await live_room(host)
        await host.set_role(room.room_id, cohost.user, Role.ROLE_COHOST)
        host_feed = host.subscribe(await host.join(room.room_id), room.room_id)
        cohost_feed = cohost.subscribe(await cohost.join(room.room_id), room.room_id)
        hearing = listener.subscribe(await listener.join(room.room_id), room.room_id)
        talking = speaking(cohost, await cohost.join(room.room_id))
        await read_until(hearing, lambda ch: len(ch) >= 3)
        await asyncio.sleep(2 * grace_s)  # both connected: nothing happens, however long
        assert (await host.get_room(room.room_id)).host_id == host.user

        host_feed.cancel()  # the host's connection drops
        dropped_at = time.monotonic()

        async def handed_over() -> Room | None:
            got = await listener.get_room(room.room_id)
            return got if got.host_id == cohost.user else None

        handed = await eventually(handed_over)
        failover_s = time.monotonic() - dropped_at
        # The room goes on: the listener still hears the new host, who may now end the room.
        await read_until(hearing, lambda ch: len(ch) >= 10)
        ended = await cohost.end_room(room.room_id)
        talking.cancel()
        for call in (cohost_feed, hearing):
            call.cancel()
    assert list(handed.cohost_ids) == [host.user], "the old host keeps a co-host place"
    assert handed.state == RoomState.ROOM_STATE_LIVE and ended.state == RoomState.ROOM_STATE_ENDED
    figures(
        "host-failover",
        {"host_grace_s": grace_s, "report_s": REPORT_S, "drop_to_handover_s": round(failover_s, 2)},
    )


async def test_a_room_without_host_or_co_host_ends_after_the_grace_period(kafka: KafkaConfig) -> None:
    grace_s = 2.0
    async with site(kafka, host_grace_s=grace_s) as s:
        host, listener, late = s.user(), s.user(), s.user()
        room = await live_room(host)
        host_grant = await host.join(room.room_id)
        talking = speaking(host, host_grant)
        hearing = listener.subscribe(await listener.join(room.room_id), room.room_id)
        await read_until(hearing, lambda ch: len(ch) >= 3)
        talking.cancel()  # the host's only stream: their connection drops
        dropped_at = time.monotonic()
        error, ended_at = await ended_with(hearing, within_s=30)
        refused = await rpc_error(late.join(room.room_id))
        final = await listener.get_room(room.room_id)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "has ended" in (error.details() or "")
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert final.state == RoomState.ROOM_STATE_ENDED
    figures(
        "abandoned-room", {"host_grace_s": grace_s, "drop_to_listener_cut_s": round(ended_at - dropped_at, 2)}
    )
