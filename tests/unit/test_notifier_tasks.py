"""Fan-out tasks: blocks, shard grouping, the task record, offsets, lanes and idempotent planning."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from townhall.core.config import DEV_AUTH, KafkaConfig
from townhall.core.errors import LimitReached
from townhall.core.kafka import Topics, reader
from townhall.core.provenance import ADMISSION, NOTIFIER, RecordSigner, Writer
from townhall.internal.v1 import events_pb2
from townhall.notifier import blocks as blk
from townhall.notifier.lanes import LaneChooser
from townhall.notifier.offsets import OffsetBook
from townhall.notifier.placement import ShardOwners
from townhall.notifier.planner import Planner
from townhall.notifier.records import decode_batch, decode_task, encode_task, shard_of
from townhall.notifier.store import SqliteFollowerStore
from townhall.notifier.worker import expand
from townhall.v1 import common_pb2, inbox_pb2

TP = TopicPartition("t", 0)


def _ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def test_split_keeps_blocks_at_most_4096_and_nearly_equal() -> None:
    parts = blk.split(np.arange(1, 10_001, dtype=np.uint64))
    assert [len(p) for p in parts] == [3334, 3333, 3333]
    assert np.concatenate(parts).tolist() == list(range(1, 10_001))
    assert blk.split(_ids()) == []


def test_assign_puts_ids_below_the_first_start_into_the_first_block() -> None:
    got = [(start, part.tolist()) for start, part in blk.assign(_ids(10, 20, 30), _ids(1, 11, 19, 35))]
    assert got == [(10, [1]), (10, [11, 19]), (30, [35])] or got == [(10, [1, 11, 19]), (30, [35])]


def test_merge_sorted_is_the_union() -> None:
    assert blk.merge_sorted(_ids(1, 5, 9), _ids(2, 5, 10)).tolist() == [1, 2, 5, 9, 10]


def test_group_pairs_sorts_and_removes_repeats() -> None:
    pairs = np.array([[2, 9], [1, 5], [2, 3], [1, 5], [2, 9]], dtype=np.uint64)
    followees, groups = blk.group_pairs(pairs)
    assert followees.tolist() == [1, 2]
    assert [g.tolist() for g in groups] == [[5], [3, 9]]


def test_valid_pairs_rejects_zero_too_big_and_self() -> None:
    pairs = np.array([[1, 2], [0, 2], [3, 3], [2**63, 1], [5, 2**63 - 1]], dtype=np.uint64)
    assert blk.valid_pairs(pairs).tolist() == [True, False, False, False, True]


def test_shard_sorted_groups_by_shard_and_drops_repeats() -> None:
    ids = _ids(130, 1, 65, 64, 2**63 - 1, 1, 128)
    out, starts = blk.shard_sorted(ids, 64)
    assert sorted(out.tolist()) == sorted(set(ids.tolist()))
    for shard in range(64):
        end = starts[shard + 1] if shard < 63 else len(out)
        run = out[starts[shard] : end].tolist()
        assert run == sorted(run) and all(u % 64 == shard for u in run)


def test_task_record_round_trips_and_is_a_fanout_task_protobuf() -> None:
    note = inbox_pb2.Notification(
        kind=1, room_id="r1", host_id=7, title="t", started_at_ms=5
    ).SerializeToString()
    value = encode_task("r1/5/f/0", note, 0, 3, _ids(1, 2, 3), 99)
    parsed = events_pb2.FanoutTask.FromString(value)
    assert (parsed.task_id, list(parsed.user_ids), parsed.part_users, parsed.planned_at_ms) == (
        "r1/5/f/0",
        [1, 2, 3],
        3,
        99,
    )
    task = decode_task(value)
    assert task.notification == note and task.user_ids.tolist() == [1, 2, 3]


def test_expand_dedupes_per_room_and_keys_records_by_user_shard() -> None:
    note = inbox_pb2.Notification(
        kind=1, room_id="r", host_id=7, title="t", started_at_ms=5
    ).SerializeToString()
    tasks = [
        decode_task(encode_task(f"r/5/f/{i}", note, i, 0, ids, 1))
        for i, ids in enumerate([_ids(1, 65, 2), _ids(65, 129, 3)])
    ]
    records = expand(tasks, batch_users=2)
    seen: list[int] = []
    for key, value in records:
        n, ids = decode_batch(value)
        assert n.room_id == "r"
        assert len(ids) <= 2
        assert {shard_of(int(u)) for u in ids} == {int(key)}
        seen += ids.tolist()
    assert sorted(seen) == [1, 2, 3, 65, 129]


def test_offset_book_commits_below_the_oldest_unfinished() -> None:
    book = OffsetBook()
    for offset in (5, 6, 7):
        book.begin(TP, offset)
    book.finish(TP, 6)
    assert book.committable() == {TP: 5}
    book.committed({TP: 5})
    assert book.committable() == {}
    book.finish(TP, 5)
    assert book.committable() == {TP: 7}
    book.finish(TP, 7)
    assert book.committable() == {TP: 8}
    assert book.oldest_unfinished(TP) is None


def test_lane_chooser_keeps_bulk_to_its_share_while_fast_waits() -> None:
    lanes = LaneChooser(0.2)
    assert lanes.bulk_allowance() == 0
    lanes.served(fast=40)
    allowed = lanes.bulk_allowance()
    assert allowed == 10  # 10 of 50 is 20%
    lanes.served(bulk=allowed)
    assert lanes.bulk_allowance() == 0
    lanes.idle()
    assert LaneChooser(0.0).bulk_allowance() == 0


def test_placement_alone_owns_everything_and_members_split() -> None:
    assert ShardOwners("a:1", []).owns_followee(5)
    members = ["a:1", "b:1", "c:1"]
    owners = {ShardOwners(m, members).followee_owner(42) for m in members}
    assert len(owners) == 1, "every member agrees on the owner"
    pairs = np.array([[f, 1] for f in range(2, 200)], dtype=np.uint64)
    parts = ShardOwners("a:1", members).split_pairs(pairs)
    assert sum(len(p) for p in parts.values()) == len(pairs)
    for owner, part in parts.items():
        assert all(ShardOwners("a:1", members).followee_owner(int(f)) == owner for f in part[:, 0])


class FakeFuture:
    def __await__(self):  # type: ignore[no-untyped-def]
        if False:
            yield
        return None


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes, headers: object = None) -> object:
        import asyncio

        self.sent.append((topic, key, value))
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def _planner(consumer: object, producer: FakeProducer, store: SqliteFollowerStore, topics: Topics) -> Planner:
    """A planner owning every key (bulk lane above 100 followers), signing as a notifier."""
    return Planner(
        consumer,
        {"fast": producer, "bulk": producer},
        store,
        topics,
        ShardOwners("me:1", []),
        bulk_threshold=100,
        task_users=4096,
        signer=RecordSigner(DEV_AUTH, Writer(NOTIFIER, "me:1")),
        records=reader(KafkaConfig(topic_prefix="x"), DEV_AUTH, topics.room_started),
    )


def _event(host: int, room: str = "room-1") -> bytes:
    return events_pb2.RoomStarted(
        room=common_pb2.Room(
            room_id=room, host_id=host, title="t", state=common_pb2.ROOM_STATE_LIVE, started_at_ms=123
        )
    ).SerializeToString()


async def test_planning_the_same_start_twice_gives_the_same_tasks_on_the_right_lane(
    store: SqliteFollowerStore,
) -> None:
    await store.import_edges(np.array([[7, u] for u in range(1, 10_001) if u != 7], dtype=np.uint64))
    await store.import_edges(np.array([[8, 1], [8, 2]], dtype=np.uint64))
    await store.remind("room-2", 555)
    topics = Topics("x")
    producer = FakeProducer()
    planner = _planner(None, producer, store, topics)

    first = await planner.plan(_event(7))
    ids_first = [(t, k) for t, k, _ in producer.sent]
    producer.sent.clear()
    await planner.plan(_event(7))
    assert [(t, k) for t, k, _ in producer.sent] == ids_first
    assert first.users == 9_999 and {t for t, _ in ids_first} == {topics.fanout_bulk}
    assert [k for _, k in ids_first] == [b"room-1/123/f/0", b"room-1/123/f/1", b"room-1/123/f/2"]

    producer.sent.clear()
    small = await planner.plan(_event(8, "room-2"))
    assert small.users == 3  # two followers and one reminder
    assert {t for t, _, _ in producer.sent} == {topics.fanout_fast}
    assert sorted(k for _, k, _ in producer.sent) == [b"room-2/123/f/0", b"room-2/123/r/0"]


class HeldProducer(FakeProducer):
    """Acknowledges every record at once, but those of `held` rooms only when `release` is set."""

    def __init__(self, held: str) -> None:
        super().__init__()
        self.held = held
        self.release = asyncio.Event()
        self.others_sent = asyncio.Event()  # a record of a room not held was sent

    async def send(self, topic: str, value: bytes, key: bytes, headers: object = None) -> object:
        self.sent.append((topic, key, value))
        if not key.startswith(self.held.encode()):
            self.others_sent.set()
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if key.startswith(self.held.encode()):
            self.release_later(future)
        else:
            future.set_result(None)
        return future

    def release_later(self, future: asyncio.Future[object]) -> None:
        async def wait() -> None:
            await self.release.wait()
            future.set_result(None)

        asyncio.get_running_loop().create_task(wait())


class ListConsumer:
    """Hands out its records once, one partition; records what is committed."""

    def __init__(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        self.records = records
        self.committed: dict[TopicPartition, int] = {}
        self.all_committed = asyncio.Event()  # the commit point passed every record

    async def getmany(self, timeout_ms: int = 0, max_records: int = 0) -> dict[TopicPartition, list[object]]:
        records, self.records = self.records, []
        if not records:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        return {TopicPartition(records[0].topic, 0): list(records)}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.update(offsets)
        if offsets and max(offsets.values()) >= 2:
            self.all_committed.set()

    def assignment(self) -> set[TopicPartition]:
        return set(self.committed)


async def test_a_small_host_start_is_not_held_up_by_the_acks_of_the_one_before(
    store: SqliteFollowerStore,
) -> None:
    """Two small hosts' rooms start back to back; the first one's task records are not acknowledged
    (brokers slow): the second's are written and acknowledged all the same, and the commit stays below
    the first until its acks come."""
    await store.import_edges(np.array([[7, 1], [7, 2], [8, 3]], dtype=np.uint64))
    topics = Topics("x")
    signer = RecordSigner(DEV_AUTH, Writer(ADMISSION, "a:1"))
    records = []
    for offset, (host, room) in enumerate(((7, "room-a"), (8, "room-b"))):
        value, key = _event(host, room), str(host).encode()
        headers = signer.headers(topics.room_started, key, value)
        records.append(
            ConsumerRecord(
                topics.room_started, 0, offset, 0, 0, key, value, None, len(key), len(value), headers
            )
        )
    consumer = ListConsumer(records)
    producer = HeldProducer("room-a/")
    planner = _planner(consumer, producer, store, topics)
    run = asyncio.create_task(planner.run())
    try:
        async with asyncio.timeout(5):
            await producer.others_sent.wait()
            await asyncio.sleep(0.5)  # several commit turns while room-a's acks are held
            assert consumer.committed.get(TopicPartition(topics.room_started, 0), 0) == 0
            producer.release.set()
            await consumer.all_committed.wait()
        assert b"room-b/123/f/0" in [k for _, k, _ in producer.sent]
        assert consumer.committed[TopicPartition(topics.room_started, 0)] == 2
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run


async def test_store_pages_imports_and_stays_under_16_bytes_per_edge(store: SqliteFollowerStore) -> None:
    rng = np.random.default_rng(3)
    ids = np.unique(rng.integers(1, 2**62, 50_000).astype(np.uint64))
    created = await store.import_edges(np.column_stack((np.full(len(ids), 9, dtype=np.uint64), ids)))
    assert created == len(ids) == await store.count(9)
    assert await store.import_edges(np.column_stack((np.full(10, 9, dtype=np.uint64), ids[:10]))) == 0
    page = await store.page(9, 0, 1000)
    assert page.tolist() == ids[:1000].tolist()
    page = await store.page(9, int(ids[4999]), 3)
    assert page.tolist() == ids[5000:5003].tolist()
    blocks = [b async for b in store.stored_blocks(9)]
    assert all(len(b) <= blk.BLOCK_IDS for b in blocks)
    assert np.concatenate(blocks).tolist() == ids.tolist()
    # A follow into the middle of a full block splits it; order and count hold.
    assert await store.follow(9, int(ids[100]) + 1) is (int(ids[100]) + 1 not in set(ids.tolist()))
    assert await store.unfollow(9, int(ids[0])) is True
    joined = np.concatenate([b async for b in store.stored_blocks(9)])
    assert joined.tolist() == sorted(joined.tolist()) and len(joined) == await store.count(9)
    assert await store.disk_bytes() / len(joined) <= 16


async def test_reminders_are_kept_once_per_user(store: SqliteFollowerStore) -> None:
    assert await store.remind("r", 5) is True
    assert await store.remind("r", 5) is False
    await store.remind("r", 3)
    assert [b.tolist() async for b in store.reminded("r")] == [[3, 5]]
    assert [b async for b in store.reminded("other")] == []


def test_the_generator_writes_one_celebrity_and_power_law_hosts_sorted(tmp_path: Path) -> None:
    from townhall.notifier.graphfile import GraphSpec, host_degrees, read_pairs, write

    spec = GraphSpec(users=50_000, celebrity_followers=20_000, hosts=500, max_followers=1000)
    edges = write(spec, tmp_path / "g.bin")
    pairs = np.asarray(read_pairs(tmp_path / "g.bin"))
    assert len(pairs) == edges
    assert int((pairs[:, 0] == spec.celebrity).sum()) == 20_000
    assert blk.valid_pairs(pairs.astype(np.uint64)).all()
    _, groups = blk.group_pairs(pairs.astype(np.uint64))
    assert sum(len(g) for g in groups) == edges, "no repeated edge"
    degrees = host_degrees(spec)
    assert degrees.max() <= 1000 and np.median(degrees) < degrees.mean(), "a heavy tail"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"TOWNHALL_NOTIFIER_MEMBERS": "127.0.0.1:1,127.0.0.1:2"}, "must include this notifier"),
        ({"TOWNHALL_NOTIFIER_BULK_SHARE": "0.95"}, "bulk_share"),
        ({"TOWNHALL_NOTIFIER_TASK_USERS": "5000"}, "task_users"),
        ({"TOWNHALL_NOTIFIER_WORKER_RATE": "-1"}, "worker_rate"),
    ],
)
def test_bad_notifier_fanout_settings_stop_the_process_with_a_clear_message(
    env: dict[str, str], words: str
) -> None:
    from townhall.core.config import ConfigError, load

    with pytest.raises(ConfigError, match=words):
        load(env=env)
    assert load(env={"TOWNHALL_NOTIFIER_MEMBERS": "127.0.0.1:50073,127.0.0.1:50173"}).notifier.members


async def test_reminders_are_bounded_per_user_and_released_by_room(store: SqliteFollowerStore) -> None:
    assert [await store.remind(f"r{i}", 5, limit=2) for i in range(2)] == [True, True]
    assert await store.remind("r0", 5, limit=2) is False, "asking again is not a new reminder"
    with pytest.raises(LimitReached, match="at most 2"):
        await store.remind("r2", 5, limit=2)
    await store.remind("r2", 6, limit=2)
    assert await store.reminder_rooms() == ["r0", "r1", "r2"]
    assert await store.forget_reminders(["r0", "r2"]) == 2
    assert await store.reminder_rooms() == ["r1"]
    assert await store.remind("r3", 5, limit=2) is True
