"""Pages (AIP-158) and views on real servers: more than a page of live rooms and of followers, each listed
once while rooms start and users follow between pages; tokens that are not the page's are refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.integration.fanout_helpers import fresh_users, own_topics, serving_notifier
from tests.integration.helpers import client, config_for, metadata, refused_with, serving
from townhall.admission.app import AdmissionApp
from townhall.admission.servicer import LIVE_ROOMS
from townhall.client import Client
from townhall.core import pages
from townhall.core.config import Config, KafkaConfig
from townhall.v1 import graph_pb2, rooms_pb2, rooms_pb2_grpc
from townhall_tools.devtools.fanout import import_followers

pytestmark = pytest.mark.kafka
RELAY = "127.0.0.1:50999"
# More than one page at the largest page size (500, the old cap on ListLiveRooms).
ROOMS = 520


@pytest.fixture(scope="module")
async def admission(kafka: KafkaConfig) -> AsyncIterator[str]:
    topics = await own_topics(kafka)
    config: Config = config_for(
        topics, admission={"relays": (RELAY,), "rooms_per_host_per_hour": 0}, limits={"enabled": False}
    )
    async with serving(AdmissionApp(config), config) as address:
        yield address


async def _start_rooms(hosts: list[Client], per_host: int) -> list[str]:
    async def one(host: Client, i: int) -> str:
        room = await host.create_room(f"room {i} of {host.user}")
        await host.start_room(room.room_id)
        return room.room_id

    started: list[str] = []
    for i in range(per_host):
        started += await asyncio.gather(*(one(host, i) for host in hosts))
    return started


async def _list(rooms: rooms_pb2_grpc.RoomsStub, md: object, size: int, between: object = None) -> list[str]:
    listed: list[str] = []
    token = ""
    while True:
        page = await rooms.ListLiveRooms(
            rooms_pb2.ListLiveRoomsRequest(page_size=size, page_token=token), metadata=md, timeout=10
        )
        listed += [r.room_id for r in page.rooms]
        if not (token := page.next_page_token):
            return listed
        if between is not None:
            await between()  # type: ignore[operator]


async def test_live_rooms_are_paged_past_500_each_once_while_rooms_start(admission: str) -> None:
    hosts = [client(admission, user) for user in fresh_users(26)]
    reader = hosts[0]
    md = reader.metadata
    try:
        first = await _start_rooms(hosts, ROOMS // len(hosts))
        assert len(first) == ROOMS

        # The largest page is 500: a bigger page_size is taken as 500, and a token says more follow.
        page = await reader.rooms.ListLiveRooms(
            rooms_pb2.ListLiveRoomsRequest(page_size=100_000), metadata=md, timeout=10
        )
        assert (len(page.rooms), bool(page.next_page_token)) == (500, True)
        # page_size 0 is 50.
        page = await reader.rooms.ListLiveRooms(rooms_pb2.ListLiveRoomsRequest(), metadata=md, timeout=10)
        assert len(page.rooms) == 50
        # A client built on 0.1.0 sends the deprecated limit: it is the page size, as it was.
        page = await reader.rooms.ListLiveRooms(
            rooms_pb2.ListLiveRoomsRequest(limit=7), metadata=md, timeout=10
        )
        assert len(page.rooms) == 7

        # Rooms start between pages: they sort before the pages already read and shift none of the rest.
        late: list[str] = []

        async def start_more() -> None:
            late.extend(await _start_rooms(hosts[:3], 1))

        listed = await _list(reader.rooms, md, 37, start_more)
        assert late, "rooms started while paging"
        assert len(listed) == len(set(listed)), "no room twice"
        assert set(first) <= set(listed), "no room skipped"
        assert not set(late) & set(listed), "a room started since sorts before the page being read"
        assert listed == [r.room_id for r in await reader.live_rooms()][len(late) :]

        # The client follows every page, or stops at a limit.
        assert len(await reader.live_rooms(limit=510)) == 510
    finally:
        for host in hosts:
            await host.close()


async def test_a_token_that_is_not_the_pages_is_refused_naming_page_token(admission: str) -> None:
    [user] = fresh_users(1)
    reader = client(admission, user)
    rooms, md = reader.rooms, reader.metadata
    try:
        await _start_rooms([reader], 3)
        page = await rooms.ListLiveRooms(rooms_pb2.ListLiveRoomsRequest(page_size=1), metadata=md, timeout=10)
        token = page.next_page_token
        assert token
        changed = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
        cases = [
            (changed, "page_token is not a token this service made"),
            (token[:10], "page_token is not a token this service made"),
            ("not even base64!", "page_token is not a token this service made"),
            ("x" * 1000, "page_token is 1000 characters; a token is at most 256"),
        ]
        for bad, message in cases:
            call = rooms.ListLiveRooms(
                rooms_pb2.ListLiveRoomsRequest(page_token=bad), metadata=md, timeout=10
            )
            await refused_with(call, grpc.StatusCode.INVALID_ARGUMENT, message)
        # FULL is for GetRoom only; a view the server does not know is refused, not guessed at.
        for view, message in (
            (rooms_pb2.ROOM_VIEW_FULL, "GetRoom only"),
            (7, "view is 7, which is not a RoomView"),
        ):
            call = rooms.ListLiveRooms(rooms_pb2.ListLiveRoomsRequest(view=view), metadata=md, timeout=10)
            await refused_with(call, grpc.StatusCode.INVALID_ARGUMENT, message)
    finally:
        await reader.close()


async def test_views_lists_carry_no_bans_getroom_full_for_moderators_basic_on_request(admission: str) -> None:
    host_id, banned, stranger_id = fresh_users(3)
    host, stranger = client(admission, host_id), client(admission, stranger_id)
    try:
        room = await host.create_room("views")
        await host.start_room(room.room_id)
        await host.remove(room.room_id, banned, ban=True)
        full = await host.get_room(room.room_id)  # UNSPECIFIED is FULL on GetRoom
        assert list(full.banned_ids) == [banned] and len(full.removals) == 1
        basic = await host.rooms.GetRoom(
            rooms_pb2.GetRoomRequest(room_id=room.room_id, view=rooms_pb2.ROOM_VIEW_BASIC),
            metadata=host.metadata,
            timeout=10,
        )
        assert (list(basic.banned_ids), len(basic.removals), basic.title) == ([], 0, "views")
        # FULL shows a non-moderator only what they may see: no bans.
        shown = await stranger.rooms.GetRoom(
            rooms_pb2.GetRoomRequest(room_id=room.room_id, view=rooms_pb2.ROOM_VIEW_FULL),
            metadata=stranger.metadata,
            timeout=10,
        )
        assert (list(shown.banned_ids), len(shown.removals)) == ([], 0)
        listed = [r for r in await host.live_rooms() if r.room_id == room.room_id]
        assert [(list(r.banned_ids), len(r.removals)) for r in listed] == [([], 0)]
    finally:
        await host.close()
        await stranger.close()


async def test_followers_are_paged_each_once_while_users_follow(
    kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory
) -> None:
    followee, *followers = fresh_users(25_001)
    async with serving_notifier(kafka, tmp_path_factory.mktemp("pages")) as notifier:
        graph = notifier.graph
        await import_followers(notifier.internal, followee, followers)
        md = metadata(followee)
        # Users follow between pages: ids below the page being read (already passed) and above it.
        newcomers = iter([followee - 1 - i for i in range(10)] + fresh_users(10))
        listed: list[int] = []
        followed: list[int] = []
        token = ""
        count = 0
        while True:
            page = await graph.ListFollowers(
                graph_pb2.ListFollowersRequest(user_id=followee, page_size=4_000, page_token=token),
                metadata=md,
                timeout=30,
            )
            count += 1
            listed += page.follower_ids
            if not (token := page.next_page_token):
                break
            for _ in range(2):
                followed.append(next(newcomers))
                await graph.Follow(
                    graph_pb2.FollowRequest(followee_id=followee), metadata=metadata(followed[-1]), timeout=10
                )
        assert count == 7  # 25,000 ids and a few newcomers, 4,000 a page
        assert listed == sorted(set(listed)), "ascending, no id twice"
        assert set(followers) <= set(listed), "no follower skipped"
        # The deprecated after_id still pages; a page size past 10,000 is taken as 10,000.
        old = await graph.ListFollowers(
            graph_pb2.ListFollowersRequest(user_id=followee, after_id=followers[99], page_size=50_000),
            metadata=md,
            timeout=30,
        )
        assert list(old.follower_ids[:2]) == followers[100:102] and len(old.follower_ids) == 10_000
        # So does the deprecated limit (0.1.0's page size).
        old = await graph.ListFollowers(
            graph_pb2.ListFollowersRequest(user_id=followee, limit=3), metadata=md, timeout=30
        )
        assert len(old.follower_ids) == 3 and list(old.follower_ids) == sorted(old.follower_ids)

        # The client follows every page.
        owner = client(notifier.address, followee)
        try:
            everyone = [i async for page in owner.followers(page_size=10_000) for i in page]
            assert everyone == sorted([*followers, *followed])
        finally:
            await owner.close()

        # A genuine token of another list.
        rooms_token = pages.seal(LIVE_ROOMS, b"\x00" * 8 + b"room")
        for request, message in (
            (
                graph_pb2.ListFollowersRequest(user_id=followee, page_token=rooms_token),
                "page_token belongs to another request",
            ),
            (
                graph_pb2.ListFollowersRequest(user_id=followee, page_token=token or "x", after_id=5),
                "after_id is deprecated and cannot go with page_token",
            ),
        ):
            call = graph.ListFollowers(request, metadata=md, timeout=10)
            await refused_with(call, grpc.StatusCode.INVALID_ARGUMENT, message)
