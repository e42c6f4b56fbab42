"""Hostile Kafka records against the real consumers: the fuzz class "records that do not parse" (make fuzz).

Admission, a relay and a notifier run in-process on topics of their own on the real broker, with an
Inbox stream open (so the Inbox reader parses what arrives). Hypothesis draws records for every topic a
Townhall process reads (presence included: relays read leaves from it): garbage bytes, a message of another type, any field values of the right type,
truncated messages, and records that are unsigned, signed with a key nobody holds, or signed by a role
that may not write the topic. Afterwards every server answers SERVING, every record that no Townhall
process could have written was skipped by every reader, and every consumer still acts on genuine
records: a room change reaches admission's replica and the relay, a relay's report reaches placement,
a room start reaches a follower's Inbox. Counts go to .townhall/fuzz/records.json and .md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from aiokafka import AIOKafkaProducer
from google.protobuf.descriptor import Descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from tests.integration import hostile
from tests.integration.helpers import TOKENS, config_for
from townhall.admission.app import AdmissionApp
from townhall.client import Client, Endpoints
from townhall.core import server
from townhall.core.auth import GRANTS
from townhall.core.config import AuthConfig, Config, KafkaConfig, TlsConfig
from townhall.core.kafka import Topics, ensure_topics, producer
from townhall.core.provenance import ADMISSION, NOTIFIER, RELAY, RecordSigner, Writer
from townhall.core.records import FAILED, FORGED, REASONS, UNSIGNED
from townhall.internal.v1 import events_pb2
from townhall.notifier.app import NotifierApp
from townhall.relay.app import RelayApp
from townhall.v1.common_pb2 import Room
from townhall_tools.devtools.kafka_broker import free_port

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
REPORT = Path(os.environ.get("FUZZ_REPORT", ".townhall/fuzz/summary.json")).with_name("records.json")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
WAIT_S = 45.0
FORGER = AuthConfig(service_keys=("stolen=" + "f" * 40,))
WATCHER = 77  # the user whose Inbox stream stays open
UNSIGNED_KIND, STOLEN_KEY, WRONG_ROLE = (
    "unsigned",
    "signed with a key nobody holds",
    "signed by a role that may not write the topic",
)
PARSE_KINDS = ("garbage bytes", "a message of another type", "any field values", "truncated")
KINDS = (*PARSE_KINDS, UNSIGNED_KIND, STOLEN_KEY, WRONG_ROLE)
T = TypeVar("T")


class Background:
    """An event loop in a thread of its own (hypothesis tests are not coroutines): run(coro) waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-records", daemon=True)
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@dataclasses.dataclass
class Site:
    """The servers, how to reach them, and what the fuzz wrote."""

    config: Config
    bg: Background
    apps: dict[str, Any]
    addresses: dict[str, str]
    writer: AIOKafkaProducer
    # topic -> (the role that writes it, its value type, how many readers here parse it)
    topics: dict[str, tuple[str, Descriptor, int]]
    written: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    before: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    skipped: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    survived: bool = False

    def write(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]] | None) -> None:
        self.bg.run(self.writer.send_and_wait(topic, value, key=key, headers=headers), 30)


def skips(prefix: str) -> dict[tuple[str, str], float]:
    """Skipped records per (topic, reason) of the topics under `prefix`, summed over every consumer."""
    return {
        (s.labels["topic"], s.labels["reason"]): s.value
        for metric in REGISTRY.collect()
        if metric.name == "townhall_kafka_records_skipped"
        for s in metric.samples
        if s.name.endswith("_total") and s.labels["topic"].startswith(prefix + ".")
    }


@pytest.fixture(scope="module")
def site(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    bg = Background()
    own = KafkaConfig(bootstrap=kafka.bootstrap, topic_prefix=f"fz{uuid.uuid4().hex[:8]}", partitions=4)
    bg.run(ensure_topics(own))
    relay = f"127.0.0.1:{free_port()}"
    config = config_for(
        own,
        admission={"relays": (relay,)},
        relay={"listen": relay, "load_report_s": 0},
        notifier={
            "data_dir": str(tmp_path_factory.mktemp("fuzz-records")),
            "group_id": f"fz-{own.topic_prefix}",
        },
        limits={"exempt": ("127.0.0.0/8",)},
    )

    async def made_in_the_loop() -> dict[str, Any]:  # the apps make queues and channels of their loop
        return {"admission": AdmissionApp(config), "relay": RelayApp(config), "notifier": NotifierApp(config)}

    apps = bg.run(made_in_the_loop())
    running = {}
    addresses = {}
    for name, app in apps.items():
        running[name] = bg.run(server.start(app, config, relay if name == "relay" else "127.0.0.1:0"))
        addresses[name] = f"127.0.0.1:{running[name].port}"
    writer = bg.run(started_producer(own))
    # An Inbox stream stays open, so the Inbox reader parses what reaches the notifications topic.
    watcher, inbox = bg.run(open_inbox_of(WATCHER, addresses))
    t = Topics(own.topic_prefix)
    made = Site(
        config,
        bg,
        apps,
        addresses,
        writer,
        {
            t.room_state: (ADMISSION, Room.DESCRIPTOR, 3),  # admission's replica, the relay, the notifier
            # The relay's leaves, admission's listener tallies.
            t.presence: (ADMISSION, events_pb2.PresenceEvent.DESCRIPTOR, 2),
            t.room_started: (ADMISSION, events_pb2.RoomStarted.DESCRIPTOR, 1),  # the planner
            t.relay_load: (RELAY, events_pb2.RelayLoad.DESCRIPTOR, 1),  # admission's placement
            t.fanout_fast: (NOTIFIER, events_pb2.FanoutTask.DESCRIPTOR, 1),  # the workers
            t.fanout_bulk: (NOTIFIER, events_pb2.FanoutTask.DESCRIPTOR, 1),
            # The Inbox reader checks a record only when it names a user connected here (the fuzz adds
            # the watcher to every batch; a truncated one may lose it): not counted below.
            t.notifications: (NOTIFIER, events_pb2.NotificationBatch.DESCRIPTOR, 0),
        },
    )
    made.before = skips(own.topic_prefix)
    try:
        yield made
    finally:
        inbox.cancel()
        bg.run(watcher.close())
        bg.run(writer.stop())
        for name, app in reversed(apps.items()):
            bg.run(server.stop(app, running[name], grace_s=1.0))
        bg.close()
        _write_report(made)


async def started_producer(kafka: KafkaConfig) -> AIOKafkaProducer:
    made = producer(kafka, "fuzz-records")
    await made.start()
    return made


async def open_inbox_of(user: int, addresses: dict[str, str]) -> tuple[Client, Any]:
    endpoints = Endpoints(addresses["admission"], addresses["notifier"], TlsConfig())
    c = Client(endpoints, user, TOKENS.mint(user, GRANTS))
    return c, await open_inbox(c)


async def open_inbox(c: Client) -> Any:
    stream = c.notifications()
    await asyncio.wait_for(stream.initial_metadata(), WAIT_S)
    return stream


OTHER_TYPES = hostile.all_message_types()
NO_SEEDS = hostile.Seeds()  # no live room or user of the other fuzz tests: these records are their own


@FUZZ
@given(data=st.data())
def test_records_that_do_not_parse_or_are_out_of_range_or_forged(site: Site, data: st.DataObject) -> None:
    topic = data.draw(st.sampled_from(sorted(site.topics)), label="topic")
    role, descriptor, _ = site.topics[topic]
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    message = data.draw(hostile.messages(descriptor, NO_SEEDS), label="value")
    if descriptor is events_pb2.NotificationBatch.DESCRIPTOR:
        # The Inbox reader checks only what it would deliver: name the user connected here.
        message.user_ids.append(WATCHER)
    value = message.SerializeToString()
    if kind == "garbage bytes":
        value = data.draw(st.binary(min_size=1, max_size=3000), label="garbage")
    elif kind == "a message of another type":
        other = data.draw(st.sampled_from(OTHER_TYPES), label="type")
        value = data.draw(hostile.messages(other, NO_SEEDS), label="other").SerializeToString()
    elif kind == "truncated" and value:
        value = value[: data.draw(st.integers(0, len(value) - 1), label="cut at")]
    key = data.draw(st.binary(max_size=64), label="key")
    member = data.draw(st.sampled_from(["127.0.0.1:1", site.addresses["relay"]]), label="member")
    headers: list[tuple[str, bytes]] | None = None
    if kind == STOLEN_KEY:
        headers = RecordSigner(FORGER, Writer(role, member)).headers(topic, key, value)
    elif kind == WRONG_ROLE:
        other_role = RELAY if role != RELAY else NOTIFIER
        headers = RecordSigner(site.config.auth, Writer(other_role, member)).headers(topic, key, value)
    elif kind != UNSIGNED_KIND:
        headers = RecordSigner(site.config.auth, Writer(role, member)).headers(topic, key, value)
    site.write(topic, key, value, headers)
    site.written[(topic, kind)] += 1


def test_every_consumer_went_past_the_records_and_still_acts_on_genuine_ones(site: Site) -> None:
    """Runs after the class above (file order): health, counts, then one genuine record per consumer."""
    for address in site.addresses.values():
        site.bg.run(serving(address))
    prefix = site.config.kafka.topic_prefix
    refused = {
        topic: sum(n for (t, kind), n in site.written.items() if t == topic and kind not in PARSE_KINDS)
        * readers
        for topic, (_, _, readers) in site.topics.items()
    }

    def refused_enough() -> bool:
        now = skips(prefix)
        return all(
            sum(now.get((t, r), 0) - site.before.get((t, r), 0) for r in (UNSIGNED, FORGED)) >= n
            for t, n in refused.items()
        )

    deadline = time.monotonic() + WAIT_S
    while not refused_enough():
        assert time.monotonic() < deadline, f"not every forged record was refused by every reader: {refused}"
        time.sleep(0.1)
    site.bg.run(genuine(site))
    after = skips(prefix)
    site.skipped = {k: after.get(k, 0) - site.before.get(k, 0) for k in after}
    failed = {t: n for (t, reason), n in site.skipped.items() if reason == FAILED and n}
    assert not failed, (
        f"a consumer raised on a record that passed its checks (see 'kafka record skipped'): {failed}"
    )
    site.survived = True


async def serving(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, address


async def genuine(site: Site) -> None:
    """One genuine record for each consumer, each acted on within WAIT_S."""
    endpoints = Endpoints(site.addresses["admission"], site.addresses["notifier"], TlsConfig())
    host, fan = (Client(endpoints, u, TOKENS.mint(u, GRANTS)) for u in (8_800_001, 8_800_002))
    try:
        await fan.follow(host.user)
        inbox = await open_inbox(fan)
        # StartRoom waits for admission's replica to hold every record written before it.
        room = await host.start_room((await host.create_room("after the fuzz")).room_id)
        guard = site.apps["relay"].guard
        await until(lambda: (r := guard.rules(room.room_id)) is not None and r.version == room.version)
        note = await asyncio.wait_for(inbox.read(), WAIT_S)  # planner, workers, Inbox reader
        assert note.room_id == room.room_id
        inbox.cancel()
        relay = site.addresses["relay"]
        report = events_pb2.RelayLoad(relay=relay, capacity=4242, at_ms=int(time.time() * 1000))
        topic = Topics(site.config.kafka.topic_prefix).relay_load
        value = report.SerializeToString()
        headers = RecordSigner(site.config.auth, Writer(RELAY, relay)).headers(topic, relay.encode(), value)
        await site.writer.send_and_wait(topic, value, key=relay.encode(), headers=headers)
        placer = site.apps["admission"].placer
        await until(lambda: placer.capacity(relay) == 4242)
    finally:
        await host.close()
        await fan.close()


async def until(condition: Any) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "a genuine record did not take effect"
        await asyncio.sleep(0.05)


def _write_report(site: Site) -> None:
    """Counts of this run, for docs/hostile-input.md."""
    short = {t: t.partition(".")[2] for t in site.topics}
    kinds: dict[str, dict[str, Any]] = {}
    for (topic, kind), n in sorted(site.written.items()):
        row = kinds.setdefault(kind, {"records": 0, "topics": set()})
        row["records"] += n
        row["topics"].add(short[topic])
    reasons = Counter({r: 0 for r in REASONS})
    for (_, reason), n in site.skipped.items():
        reasons[reason] += int(n)
    summary = {
        "examples": EXAMPLES,
        "kinds": {k: {"records": v["records"], "topics": sorted(v["topics"])} for k, v in kinds.items()},
        "records": sum(site.written.values()),
        "skipped_by_reason": dict(reasons),
        "consumers_still_act_on_genuine_records": site.survived,
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(summary, indent=2) + "\n")
    rows = ["| record | written | topics |", "|---|---|---|"]
    rows += [f"| {k} | {v['records']} | {', '.join(v['topics'])} |" for k, v in summary["kinds"].items()]
    rows.append(f"| **all** | **{summary['records']}** | |")
    rows.append("")
    rows.append(
        "skipped, summed over consumers: "
        + ", ".join(f"{r} {n}" for r, n in summary["skipped_by_reason"].items())
        + f"; consumers acting on genuine records afterwards: {'yes' if site.survived else 'NO'}"
    )
    REPORT.with_suffix(".md").write_text("\n".join(rows) + "\n")
