"""Hostile Kafka records against the real consumers on the real broker (core/records.py's policy).

Every consumer survives a record that does not parse or is out of range (skipped, counted by topic and
reason, and the next start reads past it), and the records that steer other processes (room state, room
starts, fan-out tasks, notifications, relay load reports) take effect only when a process that may write
them signed them, and a relay's report only when it is stamped within the reader's clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from tests.integration.fanout_helpers import own_topics, start_room
from tests.integration.helpers import client, config_for, rpc_error, serving
from tests.integration.test_moderation import live_room, site
from tests.integration.test_notifier import connected, follow, start_notifier
from townhall.admission.app import AdmissionApp
from townhall.core.config import DEV_AUTH, AuthConfig, KafkaConfig
from townhall.core.kafka import Topics
from townhall.core.provenance import ADMISSION, CROWD, NOTIFIER, RELAY, RecordSigner, Writer
from townhall.core.records import FORGED, MALFORMED, REASONS, STALE, UNSIGNED
from townhall.core.sharding import ranked
from townhall.internal.v1 import events_pb2
from townhall.notifier.records import encode_batch, encode_task, shard_key
from townhall.v1 import common_pb2, inbox_pb2
from townhall.v1.common_pb2 import Room
from townhall_tools.devtools.kafka_broker import free_port

pytestmark = pytest.mark.kafka

WAIT_S = 20.0
# A service key no Townhall process holds: what someone with Kafka access but not the key can sign with.
FORGER = AuthConfig(service_keys=("stolen=" + "f" * 40,))


def skipped(topic: str, *reasons: str) -> float:
    """Records of `topic` skipped so far by every consumer in this process, for `reasons` (all: none)."""
    return sum(
        REGISTRY.get_sample_value("townhall_kafka_records_skipped_total", {"topic": topic, "reason": r})
        or 0.0
        for r in reasons or REASONS
    )


async def until(condition: Callable[[], bool], what: str, within_s: float = WAIT_S) -> None:
    assert await settled(condition, within_s), f"{what}: not within {within_s} s"


async def settled(condition: Callable[[], bool], within_s: float = 10.0) -> bool:
    """Whether `condition` holds within `within_s` (the records were read: the tests then check what a
    user sees, and that they were counted, in that order, so a failure names the symptom)."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def signed(
    topic: str, key: bytes, value: bytes, role: str, member: str, auth: AuthConfig | None = None
) -> list[tuple[str, bytes]]:
    """The headers a `role` process at `member` would send with the record, signed with `auth`'s key."""
    return RecordSigner(auth or DEV_AUTH, Writer(role, member)).headers(topic, key, value)


@asynccontextmanager
async def raw_writer(kafka: KafkaConfig) -> AsyncIterator[Callable[..., Awaitable[None]]]:
    """write(topic, key, value, headers=None): what any client with access to the broker can do."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()

    async def write(
        topic: str, key: bytes, value: bytes | None, headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        await producer.send_and_wait(topic, value, key=key, headers=headers)

    try:
        yield write
    finally:
        await producer.stop()


async def test_bad_room_state_records_stop_neither_the_replica_nor_the_next_start(kafka: KafkaConfig) -> None:
    """Today a record that does not parse ends the follower (every later room change waits for a replica
    that never catches up), and the compacted topic keeps it, so every start after that fails."""
    topics = await own_topics(kafka)
    topic = Topics(topics.topic_prefix).room_state
    config = config_for(topics)
    before = skipped(topic)
    async with serving(AdmissionApp(config), config) as address:
        host = client(address, 11)
        first = await host.create_room("before the bad records")
        out_of_range = Room(
            room_id="no spaces allowed", host_id=11, state=common_pb2.ROOM_STATE_LIVE, version=1
        )
        elsewhere = Room()
        elsewhere.CopyFrom(first)
        elsewhere.version += 5
        bad = [
            (b"garbage", b"\xff\x00\x13 not a room"),  # does not parse
            (b"no spaces allowed", out_of_range.SerializeToString()),  # parses, out of range
            (b"another-room", elsewhere.SerializeToString()),  # a room under another room's key
        ]
        async with raw_writer(kafka) as write:
            for key, value in bad:  # signed with the service key: the values themselves are what is bad
                await write(topic, key, value, signed(topic, key, value, ADMISSION, address))
        await settled(lambda: skipped(topic) - before >= len(bad))
        second = await asyncio.wait_for(host.create_room("after the bad records"), WAIT_S)
        assert (await host.get_room(first.room_id)).version == first.version, "another key moved the room"
        assert skipped(topic) - before >= len(bad)
        await host.close()
    async with serving(AdmissionApp(config), config) as address:  # reads every record again at start
        host = client(address, 11)
        assert (await host.get_room(first.room_id)).title == "before the bad records"
        assert (await host.get_room(second.room_id)).title == "after the bad records"
        await host.close()
    assert skipped(topic, MALFORMED) >= 2, "the garbage record, at both starts' reads"


async def test_a_room_change_from_a_writer_that_may_not_write_it_takes_no_effect(kafka: KafkaConfig) -> None:
    """A banned user stays banned at admission and on every relay when someone without the service key,
    or a process that may not own rooms, writes the room again without the ban, or deletes it."""
    topic = Topics(kafka.topic_prefix).room_state
    async with site(kafka, relays=2) as s:
        host, banned = s.user(), s.user()
        room = await live_room(host)
        grant = await banned.join(room.room_id)
        held = await host.remove(room.room_id, banned.user, ban=True)
        forged = Room()
        forged.CopyFrom(held)
        del forged.banned_ids[:]
        del forged.removals[:]
        forged.version = held.version + 1
        key, value = room.room_id.encode(), forged.SerializeToString()
        before = skipped(topic, UNSIGNED, FORGED)
        async with raw_writer(kafka) as write:
            await write(topic, key, value)  # no signature at all
            await write(topic, key, value, signed(topic, key, value, ADMISSION, s.admission, FORGER))
            await write(topic, key, value, signed(topic, key, value, CROWD, "crowd-lane:50061"))
            await write(topic, key, None)  # a tombstone: "the room is deleted"
        # Four records, each skipped by three readers: admission and the two relays.
        await settled(lambda: skipped(topic, UNSIGNED, FORGED) - before >= 12)
        assert (await host.get_room(room.room_id)).version == held.version, "the room was deleted"
        error = await rpc_error(banned.join(room.room_id))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "banned" in (error.details() or "")
        stream = banned.subscribe(grant, room.room_id)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(stream.read(), WAIT_S)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert skipped(topic, UNSIGNED, FORGED) - before >= 12
        # The owner's own change after them takes effect as usual.
        await host.unban(room.room_id, banned.user)
        assert (await banned.join(room.room_id)).relay_address


async def test_a_relay_load_report_stamped_in_the_future_does_not_steer_placement(kafka: KafkaConfig) -> None:
    """Today the newest report of a relay wins; one stamped an hour ahead says the relay is full for an hour,
    and every genuine report after it is ignored as older."""
    topics = await own_topics(kafka)
    topic = Topics(topics.topic_prefix).relay_load
    relays = (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")  # nothing listens: placement only
    config = config_for(topics, admission={"relays": relays}, relay={"listener_capacity": 10})
    room_relay = ""
    before = skipped(topic, STALE)
    async with serving(AdmissionApp(config), config) as address:
        host = client(address, 21)
        room = await live_room(host)
        room_relay = ranked(room.room_id, list(relays))[0]
        full = events_pb2.RelayLoad(
            relay=room_relay, listeners=10, capacity=10, at_ms=int((time.time() + 3600) * 1000)
        )
        key, value = room_relay.encode(), full.SerializeToString()
        async with raw_writer(kafka) as write:  # signed by the relay itself: only its clock is wrong
            await write(topic, key, value, signed(topic, key, value, RELAY, room_relay))
        await settled(lambda: skipped(topic, STALE) - before >= 1)
        listener = client(address, 22)
        grant = await listener.join(room.room_id)
        assert grant.relay_address == room_relay, "placed as if the relay were full for an hour"
        assert skipped(topic, STALE) - before >= 1
        await host.close()
        await listener.close()


async def test_notifier_consumers_survive_bad_records_and_act_only_on_signed_ones(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    """Planner, workers and the Inbox reader: records that do not parse, are out of range or are forged are
    skipped (today a notification record whose first field is a number ends the Inbox reader for good, and
    unsigned room starts, tasks and notifications reach users); a genuine room start after them is
    delivered once."""
    topics = await own_topics(kafka)
    names = Topics(topics.topic_prefix)
    host, fan = 7_000_001, 7_000_002
    n = await start_notifier(topics, tmp_path)
    try:
        await follow(n, fan, host)
        before = {t: skipped(t) for t in (names.room_started, names.fanout_fast, names.notifications)}
        async with connected(n, fan) as (inbox,), raw_writer(kafka) as write:
            note = inbox_pb2.Notification(kind=1, room_id="forged-room", host_id=host, title="spam")
            ids = np.array([fan], dtype=np.uint64)
            start = events_pb2.RoomStarted(
                room=Room(room_id="forged-room", host_id=host, title="spam", state=common_pb2.ROOM_STATE_LIVE)
            ).SerializeToString()
            task = encode_task("forged-room/1/f/0", note.SerializeToString(), 0, 1, ids, 1)
            batch = encode_batch(note.SerializeToString(), ids)
            shard = shard_key(fan % 64)
            records = {
                names.room_started: [
                    (str(host).encode(), start, None),  # unsigned
                    (str(host).encode(), start, NOTIFIER),  # from a role that may not start rooms
                    (str(host).encode(), b"\x0a\x03\x0a\x01!", ADMISSION),  # a room id that is not one
                ],
                names.fanout_fast: [
                    (b"forged-room/1/f/0", task, None),
                    (b"t", b"\x08\x01", NOTIFIER),  # the task id is a number
                    (b"other-id", task, NOTIFIER),  # keyed by another task
                ],
                names.notifications: [
                    (shard, batch, None),
                    (shard, b"\x08\x01", NOTIFIER),  # the notification is a number
                    (shard, encode_batch(b"\x08\x07", ids), NOTIFIER),  # a kind of notification there is not
                ],
            }
            for topic, items in records.items():
                for key, value, role in items:
                    headers = signed(topic, key, value, role, "127.0.0.1:1") if role else None
                    await write(topic, key, value, headers)
            await settled(lambda: all(skipped(t) - b >= 3 for t, b in before.items()))
            await start_room(topics, "genuine-room", host, "genuine")
            await until(lambda: bool(inbox.for_room("genuine-room")), "the genuine room start delivered")
            await asyncio.sleep(0.3)  # room for anything forged to show up
            assert [x.room_id for x in inbox.got] == ["genuine-room"]
            assert all(skipped(t) - b >= 3 for t, b in before.items())
    finally:
        await n.stop()
