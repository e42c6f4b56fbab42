"""Several relays in-process on loopback: an origin, edges and a mid-tier, with real gRPC clients."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tests.integration.helpers import metadata
from tests.integration.test_relay import (
    SIGNER,
    TICKET_KEYS,
    TIMEOUT,
    frame_ids,
    frames,
    gaps,
    read_until,
    wait_for,
)
from townhall.admission.placement import Placer, RelayPath
from townhall.admission.relay_load import RelayLoadFollower
from townhall.core import config as config_module
from townhall.core import server
from townhall.core.channels import channel as open_channel
from townhall.core.config import DEV_AUTH, DEV_SERVICE_KEY, KafkaConfig
from townhall.core.credentials import ServiceCredential
from townhall.core.errors import REASON_KEY
from townhall.core.sharding import ranked
from townhall.core.tickets import TICKET_KEY
from townhall.core.tokens import SigningKey
from townhall.relay import metrics
from townhall.relay.app import RelayApp
from townhall.relay.hub import UPSTREAM_LOST
from townhall.relay.upstream import Upstreams
from townhall.v1 import relay_pb2_grpc
from townhall.v1.common_pb2 import Role
from townhall.v1.relay_pb2 import Chunk, PullRequest, SubscribeRequest
from townhall_tools.devtools import links
from townhall_tools.devtools.kafka_broker import free_port

ROOM = "hot-room"
PULL = "/townhall.v1.Relay/Pull"


class Tree:
    """Running relays (index 0 is the origin) and clients for them."""

    def __init__(self, apps: list[RelayApp], addresses: list[str], internals: list[str]) -> None:
        self.apps = apps
        self.addresses = addresses
        # Their internal ports: where relays pull from each other, what tickets name upstream relays by.
        self.internals = internals
        self.signer = SIGNER
        self.channels: list[grpc.aio.Channel] = []
        # The links in front of the internal ports of the relays given as tree(..., cables=...).
        self.cables: dict[int, links.Link] = {}

    def stub(self, relay: int, internal: bool = False, **options: Any) -> relay_pb2_grpc.RelayStub:
        """A stub for relay `relay` (its client port, or its internal one) on its own connection."""
        address = (self.internals if internal else self.addresses)[relay]
        channel = grpc.aio.insecure_channel(address, options=list(options.items()))
        self.channels.append(channel)
        return relay_pb2_grpc.RelayStub(channel)

    def ticket(
        self, relay: int, user: int, role: int, via: tuple[int, ...] = ()
    ) -> tuple[tuple[str, str], ...]:
        """A ticket for relay `relay`, whose upstream relays are `via` (origin first)."""
        upstream = tuple(self.internals[i] for i in via)
        ticket = self.signer.issue(ROOM, user, role, self.addresses[relay], upstream=upstream)
        return ((TICKET_KEY, self.signer.sign(ticket)),)

    def listen(
        self, relay: int, user: int, via: tuple[int, ...] = (), resume_after: int = 0, **options: Any
    ) -> Any:
        """A listener's Subscribe call on relay `relay`."""
        request = SubscribeRequest(room_id=ROOM, resume_after=resume_after)
        return self.stub(relay, **options).Subscribe(
            request, metadata=self.ticket(relay, user, Role.ROLE_LISTENER, via)
        )

    def speak(self, user: int, count: int = 1000, stop: asyncio.Event | None = None, **kw: Any) -> Any:
        """A speaker publishing to the origin."""
        return self.stub(0).Publish(
            frames(count, stop=stop, **kw), metadata=self.ticket(0, user, Role.ROLE_SPEAKER)
        )

    def room_sequence(self, relay: int) -> int:
        room = self.apps[relay].hub.room(ROOM)
        return room.sequence if room is not None else 0


@contextlib.asynccontextmanager
async def tree(relays: int, cables: tuple[int, ...] = (), **overrides: str) -> AsyncIterator[Tree]:
    """`relays` relay servers on free loopback ports, each advertising its real address; the relays in
    `cables` advertise (and are pulled from through) a link in front of their internal port."""
    apps: list[RelayApp] = []
    running: list[server.Running] = []
    addresses: list[str] = []
    internals: list[str] = []
    cabled: dict[int, links.Link] = {}
    stack = contextlib.AsyncExitStack()
    try:
        for index in range(relays):
            address, internal = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            advertised = internal
            if index in cables:
                cabled[index] = await stack.enter_async_context(links.link(internal))
                advertised = cabled[index].address
            env = {
                "TOWNHALL_AUTH_SERVICE_KEYS": DEV_SERVICE_KEY,
                "TOWNHALL_RELAY_LISTEN": address,
                "TOWNHALL_RELAY_INTERNAL_LISTEN": internal,
                "TOWNHALL_RELAY_INTERNAL_ADVERTISE": advertised,
                "TOWNHALL_RELAY_METRICS_PORT": "0",
                "TOWNHALL_RELAY_LOAD_REPORT_S": "0",
                # No Kafka unless a test gives one (kafka_bootstrap=..., follow_room_state="true").
                "TOWNHALL_RELAY_FOLLOW_ROOM_STATE": "false",
                "TOWNHALL_TICKETS_PUBLIC_KEYS": TICKET_KEYS,
                **{
                    f"TOWNHALL_{key.upper()}": value
                    for key, value in overrides.items()
                    if key.startswith("kafka_")
                },
                **{
                    f"TOWNHALL_RELAY_{key.upper()}": v
                    for key, v in overrides.items()
                    if not key.startswith("kafka_")
                },
            }
            config = config_module.load(env=env)
            app = RelayApp(config)
            running.append(await server.start(app, config, address, internal))
            apps.append(app)
            addresses.append(address)
            internals.append(advertised)
        handle = Tree(apps, addresses, internals)
        handle.cables = cabled
        try:
            yield handle
        finally:
            for channel in handle.channels:
                await channel.close()
    finally:
        for app, one in zip(apps, running, strict=True):
            await server.stop(app, one, grace_s=0.5)
        await stack.aclose()


def chunks_of(got: list[tuple[float, Chunk]]) -> list[Chunk]:
    return [chunk for _, chunk in got]


async def test_a_hot_rooms_listeners_on_two_edges_hear_every_frame_in_order_with_the_same_sequences() -> None:
    async with tree(3) as t:
        calls = [t.listen(0, 100)] + [
            t.listen(edge, 200 + 10 * edge + i, via=(0,)) for edge in (1, 2) for i in range(3)
        ]
        await wait_for(lambda: all(app.hub.room(ROOM) is not None for app in t.apps))
        await wait_for(lambda: len(t.apps[0].hub.room(ROOM).subscribers) == 3)  # type: ignore[union-attr]
        speakers = [t.speak(user, count=25) for user in (1, 2)]

        received = await asyncio.gather(*(read_until(c, lambda ch: len(frame_ids(ch)) >= 50) for c in calls))
        summaries = await asyncio.wait_for(asyncio.gather(*speakers), TIMEOUT)

    assert [s.frames_accepted for s in summaries] == [25, 25]
    heard = [frame_ids(chunks_of(got)) for got in received]
    assert all(h == heard[0] for h in heard)
    for user in (1, 2):
        assert [seq for speaker, seq in heard[0] if speaker == user] == list(range(25))
    # Edges forward the origin's bytes: the same sequence numbers everywhere, no gaps.
    sequences = [[c.sequence for c in chunks_of(got)] for got in received]
    assert all(s == sequences[0] for s in sequences)
    assert gaps(chunks_of(received[0])) == 0
    # The origin served one pull per edge, not one stream per edge listener.
    assert len(t.apps[0].hub.room(ROOM).subscribers) <= 3  # type: ignore[union-attr]


async def test_a_mid_tier_relays_the_room_to_an_edge_below_it() -> None:
    async with tree(3) as t:
        stop = asyncio.Event()
        speaker = t.speak(1, stop=stop)
        deep = t.listen(2, 300, via=(0, 1))
        got = chunks_of(await read_until(deep, lambda ch: len(ch) >= 8))
        stop.set()
        await asyncio.wait_for(speaker, TIMEOUT)
        assert gaps(got) == 0
        # The edge pulled from the mid-tier, which pulled from the origin: one pull each.
        mid = t.apps[1].hub.room(ROOM)
        assert mid is not None and mid.downstream == 1 and mid.upstream == (t.internals[0],)
        assert t.apps[0].hub.room(ROOM).downstream == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("moves_to", [1, 2, 3], ids=["same-edge", "another-edge", "an-edge-new-to-the-room"])
async def test_a_cut_listener_resumes_without_missing_buffered_frames(moves_to: int) -> None:
    async with tree(4, chunk_s="0.05") as t:
        stop = asyncio.Event()
        speaker = t.speak(1, stop=stop)
        keeper = t.listen(2, 99, via=(0,))  # edge 2 already carries the room when the listener moves
        first = t.listen(1, 100, via=(0,))
        before = chunks_of(await read_until(first, lambda ch: len(ch) >= 6))
        await read_until(keeper, lambda ch: len(ch) >= 1)
        last = before[-1].sequence
        first.cancel()  # the connection is cut; chunks keep coming at the origin meanwhile
        await wait_for(lambda: t.room_sequence(0) >= last + 5)
        resumed = t.listen(moves_to, 100, via=(0,), resume_after=last)
        after = chunks_of(await read_until(resumed, lambda ch: len(ch) >= 8))
        stop.set()
        await asyncio.wait_for(speaker, TIMEOUT)
    assert [c.sequence for c in after] == list(range(last + 1, last + 9))
    heard = [seq for _, seq in frame_ids(before + after)]
    assert heard == list(range(heard[0], heard[0] + len(heard)))


async def test_a_listener_that_stops_reading_on_an_edge_delays_no_one() -> None:
    async with tree(3, chunk_s="0.02", subscriber_queue="5", stuck_cutoff_s="60") as t:
        slow = t.listen(1, 100, via=(0,), **{"grpc.http2.bdp_probe": 0})
        same_edge = t.listen(1, 101, via=(0,))
        other_edge = t.listen(2, 102, via=(0,))
        await wait_for(lambda: (room := t.apps[1].hub.room(ROOM)) is not None and len(room.subscribers) == 2)
        stop = asyncio.Event()
        speaker = t.speak(1, stop=stop, interval_s=0.005, size=1400)

        def slow_overflowed() -> bool:
            room = t.apps[1].hub.room(ROOM)
            return room is not None and any(s.dropped > 0 for s in room.subscribers)

        got_same, got_other = await asyncio.gather(
            read_until(same_edge, lambda ch: slow_overflowed() and len(ch) >= 30),
            read_until(other_edge, lambda ch: slow_overflowed() and len(ch) >= 30),
        )
        stop.set()
        await asyncio.wait_for(speaker, TIMEOUT)
        for got in (got_same, got_other):
            assert gaps(chunks_of(got)) == 0
            worst = max(received - f.capture_ts_us / 1e6 for received, chunk in got for f in chunk.frames)
            assert worst < 1.0, f"healthy listener heard audio {worst:.3f} s late"
        # Only the slow listener lost chunks; the edge's pull from the origin lost none.
        assert t.apps[0].hub.room(ROOM) is not None
        origin_pulls = [s for s in t.apps[0].hub.room(ROOM).subscribers]  # type: ignore[union-attr]
        assert all(s.dropped == 0 for s in origin_pulls)
        slow.cancel()


async def test_the_stage_hears_each_frame_as_it_arrives() -> None:
    async with tree(1, chunk_s="0.2") as t:
        stage = t.stub(0).Subscribe(SubscribeRequest(room_id=ROOM), metadata=t.ticket(0, 2, Role.ROLE_COHOST))
        audience = t.listen(0, 100)
        await wait_for(lambda: (room := t.apps[0].hub.room(ROOM)) is not None and len(room.stage) == 1)
        speaker = t.speak(1, count=25)
        on_stage = await read_until(stage, lambda ch: len(ch) >= 25)
        heard = chunks_of(await read_until(audience, lambda ch: len(frame_ids(ch)) >= 25))
        await asyncio.wait_for(speaker, TIMEOUT)
    assert [len(c.frames) for _, c in on_stage] == [1] * 25
    assert [c.sequence for _, c in on_stage] == list(range(1, 26))
    assert [seq for _, seq in frame_ids(chunks_of(on_stage))] == list(range(25))
    # Per frame, not per 200 ms chunk: the stage hears a frame within a few ms of its capture.
    delays = sorted(received - c.frames[0].capture_ts_us / 1e6 for received, c in on_stage)
    assert delays[len(delays) // 2] < 0.05, delays
    assert len(heard) < 25  # the audience gets the same frames grouped into chunks


async def test_pull_is_served_on_the_internal_port_to_relays_only() -> None:
    async with tree(1) as t:
        me = t.internals[0]
        relay = ServiceCredential(SigningKey(*DEV_SERVICE_KEY.split("=", 1)), "relay", "127.0.0.1:1")
        admission = ServiceCredential(SigningKey(*DEV_SERVICE_KEY.split("=", 1)), "admission", "127.0.0.1:2")
        stranger = ServiceCredential(
            SigningKey("dev", "some-other-service-key-0123456789abcdef"), "relay", "x:1"
        )
        request = PullRequest(room_id=ROOM)
        cases = [
            # (port, metadata, status, what the message says)
            (
                False,
                relay.metadata(me, PULL),
                grpc.StatusCode.PERMISSION_DENIED,
                "served only on the internal port",
            ),
            (True, (), grpc.StatusCode.UNAUTHENTICATED, "townhall-service"),
            (True, metadata(100), grpc.StatusCode.UNAUTHENTICATED, "townhall-service"),
            (True, stranger.metadata(me, PULL), grpc.StatusCode.UNAUTHENTICATED, "does not verify"),
            (
                True,
                relay.metadata("127.0.0.1:9", PULL),
                grpc.StatusCode.PERMISSION_DENIED,
                "not for this call",
            ),
            (True, admission.metadata(me, PULL), grpc.StatusCode.PERMISSION_DENIED, "takes calls from relay"),
            (
                True,
                relay.metadata(me, PULL),
                grpc.StatusCode.INVALID_ARGUMENT,
                "upstream[0]",
                PullRequest(room_id=ROOM, upstream=["not an address"]),
            ),
        ]
        for internal, md, code, needle, *given in cases:
            asked = given[0] if given else request
            assert isinstance(internal, bool) and isinstance(asked, PullRequest)
            pull = t.stub(0, internal=internal).Pull(asked, metadata=md)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await asyncio.wait_for(pull.read(), TIMEOUT)
            assert error.value.code() == code, (internal, needle, error.value.details())
            assert needle in (error.value.details() or ""), (needle, error.value.details())
        # A listener's ticket opens nothing on the internal port: it serves no client calls.
        sub = t.stub(0, internal=True).Subscribe(
            SubscribeRequest(room_id=ROOM), metadata=t.ticket(0, 100, Role.ROLE_LISTENER)
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(sub.read(), TIMEOUT)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "served on the client port" in (error.value.details() or "")
        # A relay's credential for this relay's Pull opens the room's stream.
        pull = t.stub(0, internal=True).Pull(request, metadata=relay.metadata(me, PULL))
        await asyncio.wait_for(pull.initial_metadata(), TIMEOUT)
        await wait_for(lambda: (room := t.apps[0].hub.room(ROOM)) is not None and room.downstream == 1)
        pull.cancel()


async def test_an_edge_stops_pulling_once_its_last_listener_has_gone() -> None:
    async with tree(2) as t:
        stop = asyncio.Event()
        speaker = t.speak(1, stop=stop)
        listener = t.listen(1, 100, via=(0,))
        await read_until(listener, lambda ch: len(ch) >= 2)
        listener.cancel()
        hub = t.apps[1].hub
        await wait_for(lambda: not hub.room(ROOM).active)  # type: ignore[union-attr]
        started = time.monotonic()
        hub.pull_linger_s = 0.0  # seconds in production
        hub.sweep()
        await wait_for(lambda: not t.apps[0].hub.room(ROOM).downstream)  # type: ignore[union-attr]
        assert time.monotonic() - started < TIMEOUT
        stop.set()
        await asyncio.wait_for(speaker, TIMEOUT)


async def test_an_edge_cut_from_its_origin_without_a_reset_sends_its_listeners_elsewhere_at_once() -> None:
    # Packets dropped between edge and origin (iptables DROP): no call ends by itself, only the
    # origin's heartbeats stop. The edge must give the pull up within upstream_lost_s.
    async with tree(2, cables=(0,), chunk_s="0.05", upstream_lost_s="0.5") as t:
        stop = asyncio.Event()
        speaker = t.speak(1, stop=stop)
        listener = t.listen(1, 100, via=(0,))
        heard = chunks_of(await read_until(listener, lambda ch: len(ch) >= 4))
        t.cables[0].cut()
        cut = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await asyncio.wait_for(read_until(listener, lambda ch: False, within_s=TIMEOUT), TIMEOUT)
        silent_s = time.monotonic() - cut
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (REASON_KEY, UPSTREAM_LOST) in tuple(lost.value.trailing_metadata() or ())
        assert silent_s < 1.5, f"listeners were told after {silent_s:.1f} s"
        # Sent to the same edge again (admission does not know about the cut): its pull, dialling
        # through the cut, is given up as soon, however long a connect would take to time out.
        same = t.listen(1, 100, via=(0,), resume_after=heard[-1].sequence)
        cut = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await asyncio.wait_for(read_until(same, lambda ch: False, within_s=TIMEOUT), TIMEOUT)
        assert (REASON_KEY, UPSTREAM_LOST) in tuple(lost.value.trailing_metadata() or ())
        assert time.monotonic() - cut < 2.0
        # Joining again (admission gives it a path that works: here the origin), it resumes where it was.
        again = t.listen(0, 100, resume_after=heard[-1].sequence)
        after = chunks_of(await read_until(again, lambda ch: len(ch) >= 4))
        assert after[0].sequence == heard[-1].sequence + 1
        stop.set()
        await asyncio.wait_for(speaker, TIMEOUT)


def reroute(monkeypatch: pytest.MonkeyPatch, upstreams: Upstreams, address: str, via: str) -> None:
    """This relay's side of the network: its pulls from `address` go through `via` (a link), with the
    credential still for `address` (the relay there checks it is the audience). Other relays dial it directly."""
    pull = upstreams.pull

    def routed(room_id: str, path: tuple[str, ...], *args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        if path[-1] == address and address not in upstreams._channels:
            upstreams._channels[address] = open_channel(via, upstreams._tls, upstreams._options)
        return pull(room_id, path, *args, **kwargs)

    monkeypatch.setattr(upstreams, "pull", routed)


class Audience:
    """Listeners placed as admission places them (a Placer fed by the relays' load reports), joining again
    whenever a relay sends them away."""

    def __init__(self, t: Tree, placer: Placer) -> None:
        self._t = t
        self._placer = placer
        self._internal = dict(zip(t.addresses, t.internals, strict=True))
        self.heard: dict[int, list[tuple[float, int, Chunk]]] = {}  # user -> (receipt, relay index, chunk)
        self.placed: dict[int, list[RelayPath]] = {}

    async def listen(self, user: int) -> None:
        """One listener, until cancelled: join (placement), subscribe, and on upstream-lost join again."""
        heard = self.heard.setdefault(user, [])
        while True:
            placed = self._placer.place(ROOM, on_stage=False, now=time.time())
            self.placed.setdefault(user, []).append(placed)
            relay = self._t.addresses.index(placed.relay)
            upstream = tuple(self._internal[hop] for hop in placed.upstream)
            ticket = self._t.signer.issue(ROOM, user, Role.ROLE_LISTENER, placed.relay, upstream=upstream)
            after = heard[-1][2].sequence if heard else 0
            call = self._t.stub(relay).Subscribe(
                SubscribeRequest(room_id=ROOM, resume_after=after),
                metadata=((TICKET_KEY, self._t.signer.sign(ticket)),),
            )
            try:
                async for chunk in call:
                    heard.append((time.monotonic(), relay, chunk))
            except grpc.aio.AioRpcError as exc:
                assert (REASON_KEY, UPSTREAM_LOST) in tuple(exc.trailing_metadata() or ()), exc
            await asyncio.sleep(0.05)  # as townhall.live's Listener does when sent away


async def test_listeners_of_an_edge_cut_from_the_origin_join_again_on_a_path_without_it(
    kafka: KafkaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A silent cut (every byte held, no reset) between one edge and the origin only: the edge gives its
    # pull up after upstream_lost_s and its listeners join again. Admission knows nothing of the cut from
    # its health probes (the edge answers them); the edge's load report names the room as lost, at once,
    # and placement leaves the edge out of the room's tree: the listeners hear the room again while the
    # cut lasts, instead of being sent back to the cut edge until it heals. The periodic report (2 s)
    # would come too late: the relay reports the loss before it sends its listeners away.
    cut_s, lost_s = 4.0, 0.5
    async with (
        tree(
            3, chunk_s="0.05", upstream_lost_s=str(lost_s), load_report_s="2", kafka_bootstrap=kafka.bootstrap
        ) as t,
    ):
        placer = Placer(t.addresses, edge_target=8, degree=2, default_capacity=100)
        follower = RelayLoadFollower(kafka, DEV_AUTH, placer)
        follower.start()
        tasks: list[asyncio.Task[None]] = []
        stop = asyncio.Event()
        try:
            assert await follower.wait_read(20)
            order = [t.addresses.index(relay) for relay in ranked(ROOM, t.addresses)]
            origin, edge = order[0], order[1]
            speaker = t.stub(origin).Publish(
                frames(100_000, stop=stop), metadata=t.ticket(origin, 1, Role.ROLE_SPEAKER)
            )
            async with links.link(t.internals[origin]) as link:
                reroute(monkeypatch, t.apps[edge].upstreams, t.internals[origin], link.address)
                audience = Audience(t, placer)
                # Eight listeners fill the origin's share of the room (edge_target 8), the ninth is the edge's.
                for user in range(100, 109):
                    tasks.append(asyncio.create_task(audience.listen(user)))
                    await asyncio.sleep(0)
                moved = 108
                await wait_for(lambda: len(audience.heard.get(moved, [])) >= 4, within_s=TIMEOUT)
                assert [p.relay for p in audience.placed[moved]] == [t.addresses[edge]]
                link.cut()
                cut = time.monotonic()
                await asyncio.sleep(cut_s)
                heard_in_cut = [at for at, _, _ in audience.heard[moved] if at > cut]
                link.mend()
                await wait_for(lambda: audience.heard[moved][-1][0] > cut, within_s=TIMEOUT)
                heard_s = next(at for at, _, _ in audience.heard[moved] if at > cut) - cut
                again = audience.placed[moved][1:]
                names = {t.addresses[origin]: "origin", t.addresses[edge]: "cut edge"}
                print(
                    f"cut for {cut_s:g} s: heard again {heard_s:.2f} s after the cut, joined again on "
                    f"{[names.get(p.relay, 'other edge') for p in again]}"
                )
                assert heard_in_cut, (
                    f"the listener heard nothing during the {cut_s:g} s cut: placed on {again}"
                )
                assert again and all(
                    p.relay != t.addresses[edge] and t.addresses[edge] not in p.upstream for p in again
                )
                chunks = [chunk for _, _, chunk in audience.heard[moved]]
                assert gaps(chunks) == 0, "resumed from the origin's ring without a gap"
                # Others heard on: the origin's own listeners were never moved.
                assert all(len(audience.placed[user]) == 1 for user in range(100, 108))
            stop.set()
            await asyncio.wait_for(speaker, TIMEOUT)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await follower.close()


async def test_an_edge_keeps_pulling_a_silent_room_on_the_origins_heartbeats() -> None:
    async with tree(2, upstream_lost_s="0.2") as t:
        listener = t.listen(1, 100, via=(0,))
        await wait_for(lambda: (room := t.apps[1].hub.room(ROOM)) is not None and room.pull_ok)
        lost = metrics.UPSTREAM_LOST._value.get()
        await asyncio.sleep(1.0)  # five times upstream_lost_s without a chunk
        assert t.apps[1].hub.room(ROOM).pull_ok  # type: ignore[union-attr]
        assert metrics.UPSTREAM_LOST._value.get() == lost
        speaker = t.speak(1, count=3)
        got = chunks_of(await read_until(listener, lambda ch: len(frame_ids(ch)) >= 3))
        await asyncio.wait_for(speaker, TIMEOUT)
    assert [seq for _, seq in frame_ids(got)] == [0, 1, 2]


async def test_relays_report_their_load_and_admission_places_on_the_reports(kafka: KafkaConfig) -> None:
    async with tree(2, load_report_s="0.2", kafka_bootstrap=kafka.bootstrap) as t:
        listeners = [t.listen(0, 100 + i) for i in range(3)]
        await wait_for(lambda: (room := t.apps[0].hub.room(ROOM)) is not None and len(room.subscribers) == 3)
        placer = Placer(t.addresses, edge_target=3, degree=2, default_capacity=100)
        follower = RelayLoadFollower(kafka, DEV_AUTH, placer)
        follower.start()
        try:
            await wait_for(lambda: placer.carried(t.addresses[0], ROOM) == 3, within_s=20)
        finally:
            await follower.close()
        # The origin carries its target of the room: the next listener goes to the other relay.
        origin = placer.origin(ROOM, time.time())
        assert origin == t.addresses[0] or placer.carried(origin, ROOM) == 0
        if origin == t.addresses[0]:
            nxt = placer.place(ROOM, on_stage=False, now=time.time())
            assert nxt == RelayPath(t.addresses[1], (t.addresses[0],))
        for call in listeners:
            call.cancel()


async def test_a_room_pulled_by_enough_relays_gets_the_longer_large_room_chunks() -> None:
    async with tree(3, chunk_s="0.05", large_room_chunk_s="0.2", large_room_relays="2") as t:
        stop = asyncio.Event()
        speaker = t.speak(1, stop=stop)
        one = t.listen(1, 100, via=(0,))
        small = chunks_of(await read_until(one, lambda ch: len(ch) >= 6))
        two = t.listen(2, 101, via=(0,))
        await wait_for(lambda: t.apps[0].hub.room(ROOM).downstream == 2)  # type: ignore[union-attr]
        large = chunks_of(await read_until(two, lambda ch: len(ch) >= 14))
        stop.set()
        await asyncio.wait_for(speaker, TIMEOUT)
    # One speaker at 50 frames/s: ~2.5 frames per 50 ms chunk, ~10 per 200 ms chunk.
    assert max(len(c.frames) for c in small[1:]) <= 4
    assert sorted(len(c.frames) for c in large[-4:])[1] >= 8
    assert gaps(large) == 0
