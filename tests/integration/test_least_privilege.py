"""Least privilege in answers, on real servers (admission and notifier on the real broker).

A caller sees what it needs and no more: bans and raised hands only if it moderates the room,
follower lists only its own, titles that show what they say, tokens that do not live for ever.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from tests.integration.helpers import TOKENS, client, config_for, rpc_error, serving
from townhall.admission.app import AdmissionApp
from townhall.client import Client
from townhall.core.auth import GRANTS, HOST, MODERATE, PUBLISH, SUBSCRIBE, bearer, mint, signing_key
from townhall.core.config import DEV_AUTH, DEV_ENV, KafkaConfig
from townhall.notifier.app import NotifierApp
from townhall.v1 import graph_pb2, graph_pb2_grpc, rooms_pb2, rooms_pb2_grpc
from townhall.v1.common_pb2 import Role
from townhall_tools.devtools.kafka_broker import free_port
from townhall_tools.devtools.processes import wait_serving

pytestmark = pytest.mark.kafka
DAY_S = 86_400


@asynccontextmanager
async def admission(kafka: KafkaConfig) -> AsyncIterator[str]:
    config = config_for(kafka)
    async with serving(AdmissionApp(config), config) as address:
        yield address


def users(count: int) -> list[int]:
    first = random.randrange(1, 2**40) * 1000
    return [first + i for i in range(count)]


async def test_bans_raised_hands_and_invitations_are_shown_only_to_the_rooms_moderators(
    kafka: KafkaConfig,
) -> None:
    host_id, cohost_id, raiser_id, invited_id, banned_id, other_id = users(6)
    async with admission(kafka) as address:
        host = client(address, host_id)
        cohost = client(address, cohost_id)
        raiser = client(address, raiser_id)
        other = client(address, other_id)
        # A user whose token has every grant, `moderate` too, but who has no role in the room.
        stranger = client(address, other_id + 1, grants=GRANTS)
        # A co-host whose token lacks `moderate`: the role alone does not make a moderator.
        unmoderating = client(address, cohost_id, grants=(HOST, PUBLISH, SUBSCRIBE))
        everyone: list[Client] = [host, cohost, raiser, other, stranger, unmoderating]
        try:
            room = await host.create_room("Least privilege")
            room_id = room.room_id
            await host.start_room(room_id)
            await host.set_role(room_id, cohost_id, Role.ROLE_COHOST)
            raised = await raiser.raise_hand(room_id)
            await host.invite(room_id, invited_id)
            await host.remove(room_id, banned_id, ban=True)

            # The moderators see every list, in GetRoom and in the answers to their own changes.
            for moderator in (host, cohost):
                seen = await moderator.get_room(room_id)
                assert list(seen.hand_ids) == [raiser_id]
                assert invited_id in seen.invited_ids
                assert list(seen.banned_ids) == [banned_id]
                assert [r.user_id for r in seen.removals] == [banned_id]
            changed = await cohost.invite(room_id, other_id + 2)
            assert list(changed.banned_ids) == [banned_id]

            # Anyone else sees no bans or removals, and of the hands and invitations only their own.
            assert list(raised.hand_ids) == [raiser_id] and not raised.banned_ids
            seen = await raiser.get_room(room_id)
            assert list(seen.hand_ids) == [raiser_id]
            assert not seen.banned_ids and not seen.removals and not seen.invited_ids
            for outsider in (other, stranger, unmoderating):
                seen = await outsider.get_room(room_id)
                assert not seen.hand_ids and not seen.invited_ids, outsider.user
                assert not seen.banned_ids and not seen.removals, outsider.user
                assert seen.host_id == host_id and seen.title == "Least privilege"
            # The public listing shows none of them to anyone.
            listed = [r for r in await host.live_rooms() if r.room_id == room_id]
            assert listed and not listed[0].hand_ids and not listed[0].banned_ids
        finally:
            for each in everyone:
                await each.close()


async def test_a_follower_list_is_shown_only_to_its_owner_and_the_count_to_anyone(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    followee, follower, stranger = users(3)
    config = config_for(
        kafka,
        notifier={"data_dir": str(tmp_path / "graph"), "group_id": f"privacy-{uuid.uuid4().hex[:8]}"},
    )
    async with serving(NotifierApp(config), config) as address, grpc.aio.insecure_channel(address) as ch:
        graph = graph_pb2_grpc.GraphStub(ch)
        await graph.Follow(graph_pb2.FollowRequest(followee_id=followee), metadata=TOKENS.metadata(follower))
        request = graph_pb2.ListFollowersRequest(user_id=followee)
        error = await rpc_error(graph.ListFollowers(request, metadata=TOKENS.metadata(stranger)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "shown only to its owner" in (error.details() or "")
        own = await graph.ListFollowers(request, metadata=TOKENS.metadata(followee))
        assert list(own.follower_ids) == [follower]
        count = await graph.CountFollowers(
            graph_pb2.CountFollowersRequest(user_id=followee), metadata=TOKENS.metadata(stranger)
        )
        assert count.count == 1


async def test_titles_with_bidirectional_or_zero_width_characters_are_refused_naming_the_character(
    kafka: KafkaConfig,
) -> None:
    (host_id,) = users(1)
    async with admission(kafka) as address, grpc.aio.insecure_channel(address) as ch:
        rooms = rooms_pb2_grpc.RoomsStub(ch)
        md = TOKENS.metadata(host_id)
        refused = {
            "Free \u202eezirp\u202c for all": "U+202E RIGHT-TO-LEFT OVERRIDE at position 5",
            "adm\u200bin": "U+200B ZERO WIDTH SPACE at position 3",
            "\u2067isolate\u2069": "U+2067 RIGHT-TO-LEFT ISOLATE at position 0",
            "a\ufeffb": "U+FEFF ZERO WIDTH NO-BREAK SPACE",
            "joined\u200dword": "U+200D ZERO WIDTH JOINER",
            "c1 \x85 control": "control characters",
        }
        for title, needle in refused.items():
            error = await rpc_error(rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title=title), metadata=md))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, title
            assert needle in (error.details() or ""), (title, error.details())
        # Scripts written right to left and emoji sequences are titles like any other.
        for title in ("שלום עולם", "مرحبا", "Family night 👨\u200d👩\u200d👧"):
            room = await rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title=title), metadata=md)
            assert room.title == title


async def test_a_token_valid_for_longer_than_the_maximum_lifetime_is_refused(kafka: KafkaConfig) -> None:
    (user,) = users(1)
    key = signing_key(DEV_AUTH.keys)
    async with admission(kafka) as address, grpc.aio.insecure_channel(address) as ch:
        rooms = rooms_pb2_grpc.RoomsStub(ch)
        request = rooms_pb2.ListLiveRoomsRequest()
        for lifetime_s in (30 * DAY_S, 2 * DAY_S):
            md = bearer(mint(key, user, (SUBSCRIBE, MODERATE), ttl_s=lifetime_s))
            error = await rpc_error(rooms.ListLiveRooms(request, metadata=md))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "auth.max_token_lifetime_s" in (error.details() or ""), error.details()
        await rooms.ListLiveRooms(request, metadata=bearer(mint(key, user, (SUBSCRIBE,), ttl_s=3600)))


def test_the_metrics_listener_binds_only_the_configured_address(tmp_path: Path) -> None:
    """server.metrics_host: a relay told 127.0.0.2 serves /metrics there and nowhere else (its RPC
    metrics and townhall_build_info among them)."""
    grpc_port, metrics_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TOWNHALL_")},
        **DEV_ENV,
        "TOWNHALL_RELAY_LISTEN": f"127.0.0.1:{grpc_port}",
        "TOWNHALL_RELAY_METRICS_PORT": str(metrics_port),
        "TOWNHALL_RELAY_FOLLOW_ROOM_STATE": "false",
        "TOWNHALL_RELAY_LOAD_REPORT_S": "0",
        "TOWNHALL_SERVER_METRICS_HOST": "127.0.0.2",
    }
    with open(tmp_path / "relay.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "townhall.relay"], env=env, stdout=log, stderr=log)
    try:
        try:
            wait_serving(proc, f"127.0.0.1:{grpc_port}", "relay", 60)
        except RuntimeError as exc:  # say why it exited (a clean clone's CI run saw exit 1 once)
            pytest.fail(f"{exc}:\n{(tmp_path / 'relay.log').read_text()[-3000:]}")
        with urllib.request.urlopen(f"http://127.0.0.2:{metrics_port}/metrics", timeout=5) as reply:
            exposed = reply.read().decode()
        assert "grpc_server_started_total{" in exposed
        info = next(line for line in exposed.splitlines() if line.startswith("townhall_build_info{"))
        for label in ('component="relay"', 'version="', "python_version=", "grpcio_version="):
            assert label in info, info
        assert info.endswith(" 1.0"), info
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
    finally:
        proc.terminate()
        proc.wait(15)
