"""Fenced ownership on the real broker: two admission processes that both believe they own a room."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import grpc
import pytest

from tests.integration.helpers import admission_members, client, metadata
from townhall.client import Client
from townhall.core.config import KafkaConfig
from townhall.core.kafka import Topics, read_to_end
from townhall.core.membership import StaticMembership
from townhall.core.records import Record
from townhall.v1.common_pb2 import Room, RoomState
from townhall.v1.moderation_pb2 import RemoveRequest

pytestmark = pytest.mark.kafka


async def versions_written(kafka: KafkaConfig, room_id: str) -> dict[int, list[Room]]:
    """Every version of the room a reader of the room-state topic sees, from its beginning."""
    seen: dict[int, list[Room]] = defaultdict(list)

    def apply(record: Record) -> None:
        if record.value and record.key == room_id.encode():
            room = Room.FromString(record.value)
            seen[room.version].append(room)

    await read_to_end(kafka, Topics(kafka.topic_prefix).room_state, apply)
    return seen


async def banned_everywhere(users: list[Client], room_id: str) -> bool:
    """Whether every one of `users` (the same user at each process) is refused as banned."""
    for user in users:
        try:
            await user.join(room_id, give_up_after_s=1)
            return False
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                return False
    return True


async def test_two_processes_that_both_own_a_room_never_both_get_a_change_acknowledged(
    kafka: KafkaConfig,
) -> None:
    # Two members; then each one's view of the members is cut to itself, so each believes it owns
    # every room (what a partition between them, or a slow probe, makes of a real cluster's views).
    async with admission_members(kafka, 2) as started:
        addresses = [address for address, _ in started]
        for _, app in started:
            app.peers.membership = StaticMembership(app.peers.me, [app.peers.me])
        assert all(app.peers.is_owner("any-room") for _, app in started)
        await split_brain(kafka, addresses)


async def split_brain(kafka: KafkaConfig, addresses: list[str]) -> None:
    """Both processes at `addresses` believe they own every room: what they get acknowledged."""
    users: list[Client] = []
    try:
        base = random.randrange(1, 2**40) * 1000
        host_a, host_b = client(addresses[0], base), client(addresses[1], base)
        users += [host_a, host_b]
        room = await host_a.create_room("Fenced")
        await host_a.start_room(room.room_id)  # A writes the room: it is the room's writer
        # B takes the room (its first write fences A) and bans a user: acknowledged.
        first = await host_b.remove(room.room_id, base + 1, ban=True)
        # Both try a change now (one call each: the client library would try a refused one again): A's
        # writer is fenced, so only B's is acknowledged.
        outcomes = await asyncio.gather(
            *(
                host.moderation.Remove(
                    RemoveRequest(room_id=room.room_id, user_id=banned, ban=True),
                    metadata=metadata(base),
                    timeout=15,
                )
                for host, banned in ((host_a, base + 2), (host_b, base + 3))
            ),
            return_exceptions=True,
        )
        acked = [o for o in outcomes if isinstance(o, Room)]
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(acked) == 1 and len(refused) == 1, outcomes
        assert acked[0].version == first.version + 1 and sorted(acked[0].banned_ids) == [base + 1, base + 3]
        assert refused[0].code() == grpc.StatusCode.ABORTED
        assert "changed by another admission process" in (refused[0].details() or "")
        # Asked again, A's change is made on top of B's (A fences B in turn): nothing acknowledged is lost.
        again = await host_a.remove(room.room_id, base + 2, ban=True)
        assert sorted(again.banned_ids) == [base + 1, base + 2, base + 3]
        assert again.version == first.version + 2

        written = await versions_written(kafka, room.room_id)
        forks = {version: len(rooms) for version, rooms in written.items() if len(rooms) > 1}
        assert forks == {}, f"room versions written more than once: {forks}"
        assert sorted(written) == list(range(1, again.version + 1)), "every version once, none skipped"
        assert written[again.version][0].state == RoomState.ROOM_STATE_LIVE

        # Every acknowledged ban is enforced by every process, from its replica.
        for banned in (base + 1, base + 2, base + 3):
            at_each = [client(address, banned) for address in addresses]
            users += at_each
            for _ in range(50):
                if await banned_everywhere(at_each, room.room_id):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"user {banned}'s acknowledged ban is not enforced by every process")
    finally:
        for user in users:
            await user.close()
