"""The Kafka record policy (core/records.py), record signatures (core/provenance.py) and the checks of
room-state and relay-load records, without a broker."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY

from townhall.admission.relay_load import ReportCheck
from townhall.core.config import DEV_AUTH, AuthConfig, KafkaConfig
from townhall.core.errors import InvalidArgument
from townhall.core.kafka import Topics, reader
from townhall.core.provenance import (
    ADMISSION,
    CROWD,
    RELAY,
    Forged,
    RecordSigner,
    RecordVerifier,
    Unsigned,
    Writer,
)
from townhall.core.records import (
    FAILED,
    FORGED,
    INVALID,
    MALFORMED,
    REASONS,
    STALE,
    UNSIGNED,
    BadRecord,
    Reader,
    guarded,
)
from townhall.core.room_records import AnyOwner, ListedOwners, RoomRecords
from townhall.core.validation import MAX_LOST_ROOMS
from townhall.internal.v1.events_pb2 import Leads, PresenceEvent, RelayLoad
from townhall.relay.leaves import is_leave, leave_record
from townhall.v1.common_pb2 import ROOM_STATE_LIVE, Removal, Room

KAFKA = KafkaConfig(topic_prefix="unit")
TOPICS = Topics("unit")
OTHER_KEYS = AuthConfig(service_keys=("other=" + "o" * 40,))


@dataclass
class Rec:
    """A record as a consumer sees it."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    partition: int = 0
    offset: int = 0
    timestamp: int = 0


def signed(topic: str, key: bytes, value: bytes, writer: Writer, auth: AuthConfig | None = None) -> Rec:
    return Rec(topic, key, value, RecordSigner(auth or DEV_AUTH, writer).headers(topic, key, value))


def count(topic: str, reason: str) -> float:
    labels = {"topic": topic, "reason": reason}
    return REGISTRY.get_sample_value("townhall_kafka_records_skipped_total", labels) or 0.0


def room(**fields: object) -> Room:
    made = Room(room_id="r1", host_id=5, title="t", state=ROOM_STATE_LIVE, version=3)
    for name, value in fields.items():
        setattr(made, name, value)
    return made


def test_a_signature_verifies_with_any_service_key_and_names_the_writer() -> None:
    writer = Writer(ADMISSION, "10.0.0.1:50051")
    rotating = AuthConfig(service_keys=("new=" + "n" * 40, *DEV_AUTH.service_keys))
    record = signed("t", b"k", b"v", writer)  # signed with the old key, now second in the list
    assert RecordVerifier(rotating).writer(record.topic, record.key, b"v", record.headers) == writer


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"value": b"v2"}, Forged),
        ({"key": b"other"}, Forged),
        ({"topic": "other-topic"}, Forged),
        ({"headers": []}, Unsigned),
    ],
    ids=["value", "key", "topic", "no headers"],
)
def test_a_signed_record_cannot_be_changed_or_moved(
    change: dict[str, object], error: type[Exception]
) -> None:
    record = signed("t", b"k", b"v", Writer(RELAY, "r:1"))
    for name, value in change.items():
        setattr(record, name, value)
    with pytest.raises(error):
        RecordVerifier(DEV_AUTH).writer(record.topic, record.key, record.value or b"", record.headers)


def test_a_writer_header_changed_after_signing_or_a_key_nobody_holds_is_forged() -> None:
    record = signed("t", b"k", b"v", Writer(CROWD, "c:1"))
    record.headers[0] = ("townhall-writer", b"admission@c:1")
    with pytest.raises(Forged, match="does not verify"):
        RecordVerifier(DEV_AUTH).writer("t", b"k", b"v", record.headers)
    stolen = signed("t", b"k", b"v", Writer(ADMISSION, "a:1"), OTHER_KEYS)
    with pytest.raises(Forged, match="unknown key id"):
        RecordVerifier(DEV_AUTH).writer("t", b"k", b"v", stolen.headers)


def test_the_reader_skips_and_counts_by_reason_and_never_raises() -> None:
    topic = TOPICS.room_state
    policy = reader(KAFKA, DEV_AUTH, topic)
    value = room().SerializeToString()

    def parse(record: object, writer: object) -> str:
        raise BadRecord(STALE, "old")

    cases = [
        (Rec(topic, b"r1", value), UNSIGNED),
        (signed(topic, b"r1", value, Writer(ADMISSION, "a:1"), OTHER_KEYS), FORGED),
        (signed(topic, b"r1", value, Writer(RELAY, "r:1")), FORGED),  # a relay may not write room-state
        (signed(topic, b"r1", b"\xff\xff", Writer(ADMISSION, "a:1")), MALFORMED),
    ]
    for record, reason in cases:
        before = count(topic, reason)
        assert policy.read(record, lambda r, w: Room.FromString(r.value or b"")) is None
        assert count(topic, reason) == before + 1, reason
    before = count(topic, STALE)
    assert policy.read(signed(topic, b"r1", value, Writer(ADMISSION, "a:1")), parse) is None
    assert count(topic, STALE) == before + 1
    assert policy.read(Rec(topic, b"r1", None), parse) is None, "a tombstone is ignored"


def test_unsigned_records_are_read_during_a_migration_but_bad_signatures_never() -> None:
    topic = TOPICS.room_state
    lenient = Reader(Topics("unit").writers()[topic], RecordVerifier(DEV_AUTH), refuse_unsigned=False)
    value = room().SerializeToString()
    assert lenient.writer(Rec(topic, b"r1", value)) is None
    with pytest.raises(BadRecord) as info:
        lenient.writer(signed(topic, b"r1", value, Writer(ADMISSION, "a:1"), OTHER_KEYS))
    assert info.value.reason == FORGED


def test_an_error_applying_a_record_is_counted_and_does_not_escape() -> None:
    def boom(record: object) -> None:
        raise RuntimeError("bug")

    before = count("x", FAILED)
    guarded(boom)(Rec("x", b"k", b"v"))
    assert count("x", FAILED) == before + 1


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (room(room_id="has space"), "room_id"),
        (room(host_id=0), "host_id"),
        (room(state=9), "state"),
        (room(version=0), "version"),
        (room(title="x" * 201), "title"),
        (room(listener_limit=10_000_001), "listener_limit"),
        (room(started_at_ms=-1), "started_at_ms"),
        (Room(room_id="r1", host_id=5, state=ROOM_STATE_LIVE, version=1, banned_ids=[7] * 2), "duplicate"),
        (
            Room(room_id="r1", host_id=5, state=ROOM_STATE_LIVE, version=1, speaker_ids=range(1, 14)),
            "speaker_ids",
        ),
        (
            Room(
                room_id="r1",
                host_id=5,
                state=ROOM_STATE_LIVE,
                version=2,
                removals=[Removal(user_id=4, version=3)],
            ),
            "removals",
        ),
    ],
)
def test_room_records_out_of_range_are_invalid(bad: Room, words: str) -> None:
    records = RoomRecords(KAFKA, DEV_AUTH, AnyOwner())
    topic = records.topic
    before = count(topic, INVALID)
    record = signed(topic, bad.room_id.encode(), bad.SerializeToString(), Writer(ADMISSION, "a:1"))
    assert records.read(record) is None
    assert count(topic, INVALID) == before + 1


def test_a_room_record_must_be_keyed_by_its_room_and_written_by_a_listed_member() -> None:
    records = RoomRecords(KAFKA, DEV_AUTH, ListedOwners(["a:1", "a:2"]))
    topic, value = records.topic, room().SerializeToString()
    assert records.read(signed(topic, b"r1", value, Writer(ADMISSION, "a:2"))) == room()
    before = (count(topic, INVALID), count(topic, FORGED))
    assert records.read(signed(topic, b"r2", value, Writer(ADMISSION, "a:1"))) is None
    assert records.read(signed(topic, b"r1", value, Writer(ADMISSION, "stranger:1"))) is None
    assert (
        records.read(signed(topic, b"r1", value, Writer(CROWD, "a:1"))) is None
    )  # the crowd lane owns nothing
    assert (count(topic, INVALID), count(topic, FORGED)) == (before[0] + 1, before[1] + 2)


def report(**fields: object) -> RelayLoad:
    made = RelayLoad(relay="r:1", listeners=3, capacity=10, at_ms=1_000_000, rooms={"a": 3}, origins=["a"])
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(made, name).extend(value)
        else:
            setattr(made, name, value)
    return made


def test_relay_reports_take_effect_only_within_the_readers_clock() -> None:
    check = ReportCheck(max_age_s=15, skew_s=5, clock=lambda: 1_000.0)
    topic = TOPICS.relay_load
    writer = Writer(RELAY, "r:1")

    def verdict(made: RelayLoad, key: bytes = b"r:1", who: Writer = writer) -> str:
        try:
            check(Rec(topic, key, made.SerializeToString()), who)
        except BadRecord as exc:
            return exc.reason
        except InvalidArgument:  # core/validation.py's checks: the Reader counts them as invalid
            return INVALID
        return "ok"

    assert verdict(report(at_ms=1_000_000)) == "ok"
    assert verdict(report(at_ms=1_004_000)) == "ok", "within the allowed skew"
    assert verdict(report(at_ms=1_006_000)) == STALE, "ahead of the clock"
    assert verdict(report(at_ms=4_600_000_000)) == STALE, "an hour ahead"
    assert verdict(report(at_ms=984_000)) == STALE, "older than the placer's staleness"
    assert verdict(report(), key=b"r:2") == INVALID
    assert verdict(report(), who=Writer(RELAY, "r:2")) == FORGED, "a relay reporting for another"
    assert verdict(report(relay="not an address"), key=b"not an address") == INVALID
    leads = report()
    leads.leads["a"].CopyFrom(Leads(user_ids=[1, 2, 3, 4]))
    assert verdict(leads) == INVALID, "more leads than a host and its co-hosts"
    assert verdict(report(lost=["a", "b"])) == "ok"
    assert verdict(report(lost=[f"room-{i}" for i in range(MAX_LOST_ROOMS + 1)])) == INVALID
    assert verdict(report(lost=["bad room id\n"])) == INVALID


def test_a_deletion_takes_effect_only_signed_by_an_owner_and_keyed_by_a_room() -> None:
    records = RoomRecords(KAFKA, DEV_AUTH, ListedOwners(["a:1"]))
    topic = records.topic
    signer = RecordSigner(DEV_AUTH, Writer(ADMISSION, "a:1"))
    assert records.deleted(Rec(topic, b"r1", None, signer.headers(topic, b"r1", b""))) == "r1"
    before = {r: count(topic, r) for r in (UNSIGNED, FORGED, INVALID)}
    assert records.deleted(Rec(topic, b"r1", None)) is None
    moved = Rec(topic, b"r2", None, signer.headers(topic, b"r1", b""))  # a signed deletion moved to r2
    assert records.deleted(moved) is None
    stranger = RecordSigner(DEV_AUTH, Writer(ADMISSION, "stranger:1"))
    assert records.deleted(Rec(topic, b"r1", None, stranger.headers(topic, b"r1", b""))) is None
    assert records.deleted(Rec(topic, b"no room!", None, signer.headers(topic, b"no room!", b""))) is None
    after = {r: count(topic, r) for r in (UNSIGNED, FORGED, INVALID)}
    assert (after[UNSIGNED], after[FORGED], after[INVALID]) == (
        before[UNSIGNED] + 1,
        before[FORGED] + 2,
        before[INVALID] + 1,
    )


def test_a_leave_must_name_a_room_valid_users_and_a_time_each() -> None:
    ok = PresenceEvent(kind=PresenceEvent.KIND_LEAVE, room_id="r1", user_ids=[5, 6], left_at_ms=[1, 2])
    assert leave_record(Rec("p", b"r1", ok.SerializeToString()), None) == ok
    for bad in (
        PresenceEvent(kind=PresenceEvent.KIND_LEAVE, room_id="r 1", user_ids=[5], left_at_ms=[1]),
        PresenceEvent(kind=PresenceEvent.KIND_LEAVE, room_id="r1", user_ids=[0], left_at_ms=[1]),
        PresenceEvent(kind=PresenceEvent.KIND_LEAVE, room_id="r1", user_ids=[5, 6], left_at_ms=[1]),
        PresenceEvent(kind=PresenceEvent.KIND_LEAVE, room_id="r1", user_ids=[5], left_at_ms=[1], relay="x"),
    ):
        with pytest.raises((BadRecord, InvalidArgument)):
            leave_record(Rec("p", b"r1", bad.SerializeToString()), None)


def test_only_a_leave_with_times_is_a_leave() -> None:
    join = PresenceEvent(kind=PresenceEvent.KIND_JOIN, room_id="r1", user_ids=[5, 6], left_at_ms=[1])
    assert not is_leave(leave_record(Rec("p", b"r1", join.SerializeToString()), None))
    assert not is_leave(PresenceEvent(kind=PresenceEvent.KIND_LEAVE, room_id="r1", user_ids=[5]))


def test_a_readers_skip_counts_start_at_zero_for_every_reason() -> None:
    """A dashboard or alert reading the counter has data (zeros) before the first skip (core/metrics.from_zero)."""
    kafka = KafkaConfig(topic_prefix="zero")
    topics = Topics("zero")

    def series(topic: str) -> dict[str, float | None]:
        return {
            reason: REGISTRY.get_sample_value(
                "townhall_kafka_records_skipped_total", {"topic": topic, "reason": reason}
            )
            for reason in REASONS
        }

    assert set(series(topics.fanout_bulk).values()) == {None}
    reader(kafka, DEV_AUTH, topics.fanout_fast, topics.fanout_bulk)
    assert series(topics.fanout_fast) == series(topics.fanout_bulk) == dict.fromkeys(REASONS, 0.0)
    with pytest.raises(ValueError, match="not written by the writers"):
        reader(kafka, DEV_AUTH, topics.fanout_fast, topics.room_state)
