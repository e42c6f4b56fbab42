"""Kafka helpers shared by every service: topic names and who writes them, clients, followers, event queue."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from prometheus_client import Counter, Gauge

from townhall.core import logging
from townhall.core.config import AuthConfig, KafkaConfig
from townhall.core.metrics import KAFKA_PRODUCE_ERRORS, from_zero
from townhall.core.provenance import ADMISSION, CROWD, NOTIFIER, RELAY, RecordSigner, RecordVerifier
from townhall.core.records import REASONS, RECORDS_SKIPPED, Reader, Record, guarded
from townhall.core.tasks import cancel, supervise

log = logging.get(__name__)

# The broker's users: its super user (the broker itself, topics, ACLs) and one principal per service, each
# allowed what Topics.access() says.
KAFKA_ADMIN = "admin"
KAFKA_SERVICES = (ADMISSION, RELAY, NOTIFIER)

EVENTS_DROPPED = Counter(
    "townhall_events_dropped_total",
    "Best-effort events dropped because the in-process queue to Kafka was full or Kafka failed.",
    ["topic"],
)
EVENTS_QUEUED = Gauge("townhall_events_queued", "Best-effort events waiting for Kafka.")
CONSUMER_LAG = Gauge(
    "townhall_kafka_consumer_lag_records",
    "Records between a consumer's position and the end of its assigned partitions.",
    ["group", "topic"],
)


@dataclass(frozen=True)
class Topics:
    """The project's topic names, derived from one prefix."""

    prefix: str

    @property
    def room_state(self) -> str:
        """Compacted; key room id; value townhall.v1.Room."""
        return f"{self.prefix}.room-state"

    @property
    def presence(self) -> str:
        """Key room id; value PresenceEvent."""
        return f"{self.prefix}.presence"

    @property
    def room_started(self) -> str:
        """Key host id; value RoomStarted."""
        return f"{self.prefix}.room-started"

    @property
    def notifications(self) -> str:
        """Key user shard; value NotificationBatch."""
        return f"{self.prefix}.notifications"

    @property
    def relay_load(self) -> str:
        """Compacted; key relay address; value RelayLoad."""
        return f"{self.prefix}.relay-load"

    @property
    def fanout_fast(self) -> str:
        """Key task id; value FanoutTask: small hosts and reminders."""
        return f"{self.prefix}.fanout-fast"

    @property
    def fanout_bulk(self) -> str:
        """Key task id; value FanoutTask: hosts above notifier.bulk_threshold followers."""
        return f"{self.prefix}.fanout-bulk"

    @property
    def room_writers(self) -> str:
        """What every room's transactional.id starts with (admission/fencing.py); the admission principal
        may write with any such id."""
        return f"{self.prefix}.room-"

    def writers(self) -> dict[str, frozenset[str]]:
        """Per topic, the writer roles (core/provenance.py) whose records its readers act on."""
        return {
            self.room_state: frozenset({ADMISSION}),
            self.room_started: frozenset({ADMISSION}),
            self.presence: frozenset({ADMISSION, CROWD}),
            self.relay_load: frozenset({RELAY}),
            self.fanout_fast: frozenset({NOTIFIER}),
            self.fanout_bulk: frozenset({NOTIFIER}),
            self.notifications: frozenset({NOTIFIER}),
        }

    def access(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """Per service principal (its Kafka user): (topics it writes, topics it reads). The broker's ACLs
        grant exactly this (townhall_tools.devtools.kafka_broker, the chart's topics Job); the notifier
        also reads its consumer groups (kafka.acl_groups)."""
        return {
            # Admission reads the other processes' listener tallies from presence (admission/tallies.py).
            ADMISSION: (
                (self.room_state, self.room_started, self.presence),
                (self.room_state, self.relay_load, self.presence),
            ),
            # Relays read leaves (Admission.Leave voids a listener's older tickets) from presence.
            RELAY: ((self.relay_load,), (self.room_state, self.presence)),
            NOTIFIER: (
                (self.fanout_fast, self.fanout_bulk, self.notifications),
                (self.room_state, self.room_started, self.fanout_fast, self.fanout_bulk, self.notifications),
            ),
        }

    def used_by(self, service: str) -> tuple[str, ...]:
        """Every topic a service principal writes or reads (what it waits for at start: wait_for_topics)."""
        writes, reads = self.access()[service]
        return tuple(dict.fromkeys((*writes, *reads)))

    def all(self) -> dict[str, dict[str, str]]:
        """Every topic with its configuration."""
        compacted = {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1"}
        day = {"retention.ms": str(24 * 3600 * 1000)}
        return {
            self.room_state: compacted,
            self.presence: day,
            self.room_started: day,
            self.notifications: day,
            self.fanout_fast: day,
            self.fanout_bulk: day,
            self.relay_load: compacted,
        }


def reader(kafka: KafkaConfig, auth: AuthConfig, topic: str, *alike: str) -> Reader:
    """How a process reads `topic` (and `alike` topics, with the same writers): signed by a writer whose
    role may write it (core/records.py). Their skipped-record counts start at 0 for every reason."""
    writers = Topics(kafka.topic_prefix).writers()
    if any(writers[other] != writers[topic] for other in alike):
        raise ValueError(f"{alike} are not written by the writers of {topic}")
    from_zero(RECORDS_SKIPPED, *((name, reason) for name in (topic, *alike) for reason in REASONS))
    return Reader(writers[topic], RecordVerifier(auth), kafka.refuse_unsigned)


def client_options(config: KafkaConfig) -> dict[str, Any]:
    """The connection settings (kafka.security_protocol, TLS, SASL) every Kafka client here is made with."""
    options: dict[str, Any] = {"security_protocol": config.security_protocol}
    if config.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=config.ca or None, certfile=config.cert or None, keyfile=config.key or None
        )
    if config.security_protocol.startswith("SASL_"):
        options.update(
            sasl_mechanism=config.sasl_mechanism,
            sasl_plain_username=config.username,
            sasl_plain_password=config.secret(),
        )
    return options


def consumer(config: KafkaConfig, *topics: str, **settings: Any) -> AIOKafkaConsumer:
    """A consumer of `topics` (none: assigned later) with the connection settings of `config`.

    It reads committed records only (unless `settings` say otherwise): a room change written by a fenced
    owner (admission/fencing.py) is aborted, and no reader may act on it. Topics written without
    transactions read the same either way.
    """
    options: dict[str, Any] = {"isolation_level": "read_committed", **settings}
    return AIOKafkaConsumer(*topics, bootstrap_servers=config.bootstrap, **client_options(config), **options)


class KafkaUnreachable(RuntimeError):
    """Kafka, or topics a process needs, could not be had within the allowed time; the message says what."""


# The one exception policy of the loops that read or write Kafka (core/tasks.py): these are what a Kafka
# client raises while a broker is away, slow, restarting or moving partitions: aiokafka's KafkaError
# family, a dropped connection (OSError), a timeout, a client that could not start (KafkaUnreachable),
# and AssertionError, which aiokafka raises on a partition a rebalance took away mid-call. A loop catches
# these, logs them and tries again; anything else is a fault nobody planned for, and ends the loop, which
# the supervisor reports (the process stops and is restarted) instead of retrying it for ever.
KAFKA_ERRORS: tuple[type[Exception], ...] = (
    KafkaError,
    OSError,
    TimeoutError,
    KafkaUnreachable,
    AssertionError,
)


# How often wait_for_topics asks the broker again, and how often it says what it still waits for.
WAIT_CHECK_S = 1.0
WAIT_LOG_S = 5.0


async def missing_topics(config: KafkaConfig, topics: Iterable[str], timeout_s: float = 10.0) -> list[str]:
    """The topics of `topics` the broker does not have ready (absent, or a partition without a leader).

    Asks for every topic rather than for these by name: a metadata request that names a topic creates
    it on a broker with auto.create.topics.enable, with none of the project's settings (compaction).
    Raises KafkaError or OSError if the broker cannot be reached within `timeout_s`.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=config.bootstrap, request_timeout_ms=int(timeout_s * 1000), **client_options(config)
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        described = await asyncio.wait_for(admin.describe_topics(), timeout_s)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    ready = {
        t["topic"]
        for t in described
        if t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
    }
    return [topic for topic in topics if topic not in ready]


async def wait_for_topics(
    config: KafkaConfig,
    topics: Iterable[str],
    within_s: float,
    check_s: float = WAIT_CHECK_S,
    log_every_s: float = WAIT_LOG_S,
) -> None:
    """Returns once the broker answers and has every topic of `topics` ready; KafkaUnreachable after
    `within_s` (server.kafka_wait_s) naming what is still missing.

    A process starts before Kafka or its topics exist on a fresh install (the chart creates the topics
    after the pods start), so it waits, saying every `log_every_s` what it waits for.
    """
    wanted = list(dict.fromkeys(topics))
    if not wanted:
        return
    started = time.monotonic()
    deadline = started + within_s
    logged = started - log_every_s
    while True:
        try:
            missing = await missing_topics(config, wanted, max(1.0, min(10.0, deadline - time.monotonic())))
            problem = f"topics missing: {', '.join(missing)}"
        except (KafkaError, OSError, TimeoutError) as exc:
            missing = wanted
            problem = f"broker at {config.bootstrap} not reachable ({type(exc).__name__}: {exc})"
        if not missing:
            if time.monotonic() - started >= check_s:
                log.info("kafka ready", topics=len(wanted), waited_s=round(time.monotonic() - started, 1))
            return
        now = time.monotonic()
        if now >= deadline:
            raise KafkaUnreachable(
                f"Kafka not ready within server.kafka_wait_s ({within_s:g} s): {problem}. Create the topics "
                "(the chart's topics Job, or `townhall dev`) or check kafka.bootstrap and the credentials"
            )
        if now - logged >= log_every_s:
            logged = now
            log.warning(
                "waiting for kafka",
                bootstrap=config.bootstrap,
                missing=missing,
                problem=problem,
                waited_s=round(now - started, 1),
                within_s=within_s,
            )
        await asyncio.sleep(min(check_s, max(0.0, deadline - now)))


async def ensure_topics(config: KafkaConfig, replication: int = 1) -> None:
    """Creates the project's topics if they do not exist (local broker, tests; `replication` replicas each:
    3 on the multi-host topology's brokers)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=config.bootstrap, **client_options(config))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, config.partitions, replication, topic_configs=cfg)
            for name, cfg in Topics(config.topic_prefix).all().items()
            if name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
            log.info("topics created", topics=[t.name for t in wanted])
    finally:
        await admin.close()


# Not idempotent, on purpose: aiokafka's idempotent producer stops for good when a broker
# restart leaves it with OutOfOrderSequenceNumber (sequence numbers of batches that never made
# it), and every later send fails. Every reader here tolerates a record written twice (room
# versions, notification and task ids), and aiokafka keeps one batch in flight per partition,
# so a retry never reorders a partition either.
IDEMPOTENT = False


def producer(config: KafkaConfig, client_id: str, **settings: Any) -> AIOKafkaProducer:
    """A producer whose send_and_wait means the record is on every in-sync replica (acks=all unless
    `settings` say otherwise), with the connection settings of `config`."""
    options: dict[str, Any] = {
        "acks": "all",
        "enable_idempotence": IDEMPOTENT,
        "linger_ms": 2,
        "request_timeout_ms": 15_000,
        "retry_backoff_ms": 200,
    }
    options.update(settings)
    return AIOKafkaProducer(
        bootstrap_servers=config.bootstrap, client_id=client_id, **client_options(config), **options
    )


async def read_to_end(
    config: KafkaConfig, topic: str, apply: Callable[[Record], object]
) -> dict[TopicPartition, int]:
    """Applies every record of `topic` up to its current end; returns the end offsets.

    A record `apply` raises on is counted (core/records.py, failed) and skipped: a bad record kept by
    a compacted topic must not stop every later start.
    """
    apply = guarded(apply)
    # Without a group, a subscription is assigned every partition of the topic.
    reader = consumer(
        config, topic, enable_auto_commit=False, auto_offset_reset="earliest", metadata_max_age_ms=5_000
    )
    await reader.start()
    try:
        partitions = list(reader.assignment())
        if not partitions:
            raise RuntimeError(f"topic {topic} does not exist or has no partitions")
        await reader.seek_to_beginning(*partitions)
        ends = await reader.end_offsets(partitions)
        pending = {tp for tp, end in ends.items() if end > 0}
        while pending:
            batch = await reader.getmany(*pending, timeout_ms=500)
            for records in batch.values():
                for record in records:
                    apply(record)
            # By position, not by the last record's offset: a partition may end with a transaction
            # marker or an aborted record, which the reader skips.
            for tp in list(pending):
                if await reader.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return ends
    finally:
        await reader.stop()


async def end_offsets(config: KafkaConfig, topic: str) -> dict[TopicPartition, int]:
    """The current end offset of every partition of `topic`: where to follow it from, reading nothing."""
    reader = consumer(config, topic, enable_auto_commit=False, metadata_max_age_ms=5_000)
    await reader.start()
    try:
        partitions = list(reader.assignment())
        if not partitions:
            raise RuntimeError(f"topic {topic} does not exist or has no partitions")
        return dict(await reader.end_offsets(partitions))
    finally:
        await reader.stop()


async def follow_from_end(
    config: KafkaConfig, topic: str, handle: Callable[[Record], object], name: str, *, gather: bool = False
) -> Follower:
    """A started Follower of `topic` from its current end: records written before now are not read."""
    follower = Follower(config, await end_offsets(config, topic), handle, name, gather=gather)
    await follower.start()
    return follower


# How long a follower's fetch waits at a broker for records before it is answered empty. A record that
# lands answers the waiting fetch at once, so this is not a delay; it sets how often an idle follower asks
# again: each Follower sends one fetch per broker it reads from per wait, over TLS. Idle, 4 admission
# processes, a relay, a notifier and 3 brokers (SASL_SSL) took 0.92 cores at 100 ms and 0.29 at 500
# (each broker 0.15 -> 0.05, each admission process 0.07 -> 0.025).
FOLLOW_WAIT_MS = 500
# What a gathering follower's fetch waits for at a broker (or FOLLOW_WAIT_MS, whichever comes first). A
# follower answered at every record fetches as often as records land, and each fetch (building it,
# reading the answer) costs about as much as the record: 4 admission processes following the presence
# topic (each writing ~100 records/s) spent more on fetching it than on any one part of a join. A follower
# that may be FOLLOW_WAIT_MS late (the tallies) gathers instead: 1/FOLLOW_WAIT_MS fetches per broker per
# second, however busy the topic. The relay loads may not: an edge cut from its origin reports the room
# lost just before it sends its listeners to join again, and placement must have read it by then.
GATHER_BYTES = 1 << 20


class Follower:
    """Hands every record after `positions` (e.g. read_to_end's ends) to `handle` as it arrives.

    `positions` is kept up to date, so after a Kafka error the consumer is made again and resumes where it
    stopped; a record `handle` raises on is counted (failed) and skipped, so no record stops a follower.
    """

    def __init__(
        self,
        config: KafkaConfig,
        positions: dict[TopicPartition, int],
        handle: Callable[[Record], object],
        name: str,
        retry_s: float = 1.0,
        *,
        gather: bool = False,
    ) -> None:
        """`gather`: fetch at most once per FOLLOW_WAIT_MS per broker (records up to that late), not at
        every record that lands."""
        self.positions = dict(positions)
        self._min_bytes = GATHER_BYTES if gather else 1
        self._config = config
        self._handle = guarded(handle)
        self._name = name
        self._retry_s = retry_s
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The consumer in use (None while it is being made again after an error)."""
        return self._consumer

    async def reached(self, ends: dict[TopicPartition, int]) -> bool:
        """Whether every record before `ends` has been handed to `handle` (or skipped: aborted records,
        transaction markers). The consumer's position counts: it moves past markers at once, and past
        records only when getmany returns them, which hands them over before anything else runs."""
        current = self._consumer
        for tp, end in ends.items():
            done = self.positions.get(tp, 0)
            if done < end and current is not None:
                with contextlib.suppress(KafkaError, AssertionError):
                    done = max(done, await current.position(tp))
            if done < end:
                return False
        return True

    async def start(self) -> None:
        """Connects (raising if Kafka cannot be reached), then follows in the background."""
        self._consumer = await self._connect()
        self._task = supervise(self._run(), self._name)

    async def close(self) -> None:
        """Stops following."""
        await cancel(self._task)
        current, self._consumer = self._consumer, None
        if current is not None:
            with contextlib.suppress(Exception):
                await current.stop()

    async def _connect(self) -> AIOKafkaConsumer:
        made = consumer(
            self._config,
            enable_auto_commit=False,
            fetch_max_wait_ms=FOLLOW_WAIT_MS,
            fetch_min_bytes=self._min_bytes,
        )
        try:
            await made.start()
            made.assign(list(self.positions))
            for tp, offset in self.positions.items():
                made.seek(tp, offset)
        except BaseException:
            with contextlib.suppress(Exception):
                await made.stop()
            raise
        return made

    async def _run(self) -> None:
        while True:
            try:
                if self._consumer is None:
                    self._consumer = await self._connect()
                while True:
                    batch = await self._consumer.getmany(timeout_ms=1_000)
                    for tp, records in batch.items():
                        for record in records:
                            self._handle(record)
                            self.positions[tp] = record.offset + 1
            except KAFKA_ERRORS as exc:  # make the consumer again, resume at the positions
                log.warning("following a topic failed; resuming", follower=self._name, error=repr(exc))
                current, self._consumer = self._consumer, None
                if current is not None:
                    with contextlib.suppress(*KAFKA_ERRORS):
                        await current.stop()
            await asyncio.sleep(self._retry_s)


async def report_lag(
    consumer: AIOKafkaConsumer | Callable[[], AIOKafkaConsumer | None], group: str, every_s: float = 5.0
) -> None:
    """Publishes the consumer's lag per topic every `every_s` seconds, until cancelled (`consumer` may be
    a function naming the one in use: a Follower's is made again after a Kafka error)."""
    while True:
        current = consumer() if callable(consumer) else consumer
        if current is not None:
            for topic, records in (await _lag(current)).items():
                CONSUMER_LAG.labels(group, topic).set(records)
        await asyncio.sleep(every_s)


async def _lag(consumer: AIOKafkaConsumer) -> dict[str, int]:
    lag: dict[str, int] = {}
    for tp in consumer.assignment():
        lag.setdefault(tp.topic, 0)
        try:
            # A rebalance during the awaits below can take a partition of this (copied) assignment
            # away: aiokafka then asserts it is not assigned.
            high = consumer.highwater(tp)
            if high is None:  # nothing fetched yet from this partition
                continue
            position = await asyncio.wait_for(consumer.position(tp), 1.0)
        except KAFKA_ERRORS:
            continue
        lag[tp.topic] += max(0, high - position)
    return lag


class EventQueue:
    """A bounded in-process queue of best-effort records to Kafka that never blocks the caller.

    `offer` returns at once; a full queue or a failed send drops the record and counts it.
    """

    def __init__(self, producer: AIOKafkaProducer, capacity: int, signer: RecordSigner | None = None) -> None:
        self._producer = producer
        self._signer = signer
        self._queue: asyncio.Queue[tuple[str, bytes, bytes]] = asyncio.Queue(capacity)
        self._task: asyncio.Task[None] | None = None

    def offer(self, topic: str, key: bytes, value: bytes) -> bool:
        """Queues a record; False (and counted) if the queue is full."""
        try:
            self._queue.put_nowait((topic, key, value))
        except asyncio.QueueFull:
            EVENTS_DROPPED.labels(topic).inc()
            return False
        EVENTS_QUEUED.inc()
        return True

    def start(self) -> None:
        """Starts the background sender."""
        self._task = supervise(self._run(), "event-queue")

    async def close(self, flush_s: float = 5.0) -> None:
        """Sends what is queued (within flush_s), then stops."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), flush_s)
        await cancel(self._task)

    async def _run(self) -> None:
        while True:
            topic, key, value = await self._queue.get()
            try:
                headers = self._signer.headers(topic, key, value) if self._signer is not None else None
                future = await self._producer.send(topic, value, key=key, headers=headers)
                future.add_done_callback(lambda f, t=topic: _count_failure(f, t))
            except KAFKA_ERRORS as exc:
                EVENTS_DROPPED.labels(topic).inc()
                KAFKA_PRODUCE_ERRORS.labels(topic).inc()
                log.warning("event dropped", topic=topic, error=str(exc))
            finally:
                EVENTS_QUEUED.dec()
                self._queue.task_done()


def _count_failure(future: asyncio.Future[object], topic: str) -> None:
    if future.cancelled() or future.exception() is not None:
        EVENTS_DROPPED.labels(topic).inc()
        KAFKA_PRODUCE_ERRORS.labels(topic).inc()
