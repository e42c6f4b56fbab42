"""A real single-node Apache Kafka broker (KRaft) on loopback, from Apache's jars on Maven Central.

The jars are fetched once with Maven into `.cache/kafka/libs` (about 46 MB); the data folder is
formatted on first use. Used by `townhall kafka`, `townhall dev` and the integration tests.

With `Security` the broker runs as the chart's bundled broker does: clients on SASL_SSL (SCRAM-SHA-512
users created when the storage is formatted, `kafka-storage format --add-scram`), the controller on
a loopback SASL_PLAINTEXT listener (PLAIN, the admin user), ACLs on (StandardAuthorizer, nothing
allowed without an ACL), one principal per service granted exactly Topics.access() (`grant`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import os
import random
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.admin import CreateAclsRequest

from townhall.core import logging
from townhall.core.certs import Authority, pem_keystore
from townhall.core.config import KafkaConfig
from townhall.core.kafka import KAFKA_ADMIN, KAFKA_SERVICES, Topics, client_options, ensure_topics

log = logging.get(__name__)

REPO = Path(__file__).resolve().parents[3]
POM = REPO / "deploy" / "kafka" / "pom.xml"
LOG4J = REPO / "deploy" / "kafka" / "log4j.properties"
LIBS = REPO / ".cache" / "kafka" / "libs"


class BrokerError(RuntimeError):
    """The broker could not be fetched, formatted or started; the message says why."""


def fetch_jars(libs: Path = LIBS) -> Path:
    """Downloads the broker jars with Maven unless the jars of this pom.xml are already cached."""
    # The marker names the pom the jars were fetched for: a changed pom fetches again (from ~/.m2 mostly).
    marker = libs / ".complete"
    wanted = hashlib.sha256(POM.read_bytes()).hexdigest()
    if marker.exists() and marker.read_text().strip() == wanted:
        return libs
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise BrokerError("the local Kafka broker needs java (17+) and mvn on PATH")
    libs.mkdir(parents=True, exist_ok=True)
    log.info("fetching kafka jars", pom=str(POM), into=str(libs))
    cmd = [
        "mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
        f"-DoutputDirectory={libs}", "-DincludeScope=runtime",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BrokerError(f"mvn could not fetch the Kafka jars:\n{done.stdout}\n{done.stderr}")
    marker.write_text(wanted)
    return libs


# Ports handed out for servers come from below the kernel's ephemeral range: a port the kernel picked
# (bind to 0) is one it may give the next outgoing connection as its source port before the server
# that was meant to have it binds (seen in CI: a metrics port taken between pick and bind).
_SERVER_PORTS = range(20_000, 32_768)
# Ports handed out lately, never handed out again while remembered: a topology picks every process's
# ports before starting any, and a port free at two picks would go to two servers (at ~20 ports of a
# 12,768-port range, one topology in ~70; seen in CI: a metrics port already in use).
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=2_000)


def free_port() -> int:
    """A TCP port on loopback that is free right now, outside the ephemeral range where possible, and
    not one this process handed out lately."""
    low = _ephemeral_low()
    ports = [p for p in _SERVER_PORTS if p < low]
    taken = set(_HANDED_OUT)
    for port in random.sample(ports, min(len(ports), 200)):
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.append(port)
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


ADMIN, SERVICES = KAFKA_ADMIN, KAFKA_SERVICES
SCRAM = "SCRAM-SHA-512"
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
# What makes a broker secure, the same here and in the chart's bundled broker (tests/chart checks it);
# the JAAS lines (passwords) and file locations are added where they are known.
SECURE_SETTINGS = {
    "inter.broker.listener.name": "CLIENT",
    "listener.security.protocol.map": "CONTROLLER:SASL_PLAINTEXT,CLIENT:SASL_SSL",
    # Clients: SCRAM users over TLS; the broker talks to itself as admin.
    "listener.name.client.sasl.enabled.mechanisms": SCRAM,
    "sasl.mechanism.inter.broker.protocol": SCRAM,
    "ssl.keystore.type": "PEM",
    # The broker's own connections (inter-broker) check its certificate against the CA.
    "ssl.truststore.type": "PEM",
    # The controller listener (loopback only): PLAIN, since KRaft keeps SCRAM users in the metadata the
    # controller serves; the broker signs in as admin.
    "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
    "sasl.mechanism.controller.protocol": "PLAIN",
    # ACLs on: nothing is allowed without one, except to admin.
    "authorizer.class.name": AUTHORIZER,
    "super.users": f"User:{ADMIN}",
    "allow.everyone.if.no.acl.found": "false",
}


@dataclass
class Security:
    """SASL_SSL for the broker's clients: a throwaway CA and broker certificate, and a SCRAM user per
    service plus `admin` (the super user: the broker itself, topic creation, ACLs)."""

    folder: Path
    passwords: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.passwords:
            self.passwords = {user: secrets.token_urlsafe(24) for user in (ADMIN, *SERVICES)}

    @property
    def ca(self) -> Path:
        """The CA bundle clients check the broker's certificate against."""
        return self.folder / "ca.pem"

    @property
    def keystore(self) -> Path:
        """The broker's key and certificate, in one PEM file (ssl.keystore.type=PEM)."""
        return self.folder / "broker-keystore.pem"

    def make_certificates(self) -> None:
        """A CA and a broker certificate for 127.0.0.1 and localhost (once)."""
        if self.keystore.exists():
            return
        pem = Authority(self.folder, "Townhall local Kafka CA").issue(
            "kafka-broker", dns=("localhost",), ips=("127.0.0.1",)
        )
        pem_keystore(pem.key, pem.cert, self.keystore)

    def client(self, user: str, bootstrap: str, prefix: str = "townhall", **settings: object) -> KafkaConfig:
        """The [kafka] config of a process that connects as `user`."""
        return KafkaConfig(
            bootstrap=bootstrap,
            topic_prefix=prefix,
            security_protocol="SASL_SSL",
            ca=str(self.ca),
            sasl_mechanism=SCRAM,
            username=user,
            password=self.passwords[user],
            **settings,  # type: ignore[arg-type]
        )


def _jaas(module: str, user: str, password: str, **extra: str) -> str:
    login = {
        "scram": "org.apache.kafka.common.security.scram.ScramLoginModule",
        "plain": "org.apache.kafka.common.security.plain.PlainLoginModule",
    }[module]
    more = "".join(f' {k}="{v}"' for k, v in extra.items())
    return f'{login} required username="{user}" password="{password}"{more};'


@dataclass(frozen=True)
class Acl:
    """One ALLOW rule: `principal` may do `operation` on a topic, group or transactional id (a literal
    name, or a prefix)."""

    principal: str
    operation: str  # Read or Write (Describe comes with either)
    resource: str  # topic, group or transactional-id
    name: str
    prefixed: bool = False


def acls(topics: Topics, notifier_group: str) -> list[Acl]:
    """Exactly what Topics.access() says each service principal may do: Write on the topics it writes, Read
    on those it reads, for the notifier Read on its consumer groups (those named `notifier_group`...), and
    for admission Write with the rooms' transactional ids (Topics.room_writers..., admission/fencing.py).
    The chart's topics Job creates the same rules with kafka-acls.sh."""
    rules = [
        Acl(f"User:{service}", operation, "topic", name)
        for service, (writes, reads) in topics.access().items()
        for operation, names in (("Write", writes), ("Read", reads))
        for name in names
    ]
    return [
        *rules,
        Acl("User:notifier", "Read", "group", notifier_group, prefixed=True),
        Acl("User:admission", "Write", "transactional-id", topics.room_writers, prefixed=True),
    ]


# Kafka's protocol numbers (org.apache.kafka.common.acl / resource).
_RESOURCE = {"topic": 2, "group": 3, "transactional-id": 5}
_OPERATION = {"Read": 3, "Write": 4}
_LITERAL, _PREFIXED, _ALLOW = 3, 4, 3


async def _create_acls(config: KafkaConfig, rules: list[Acl]) -> None:
    client = AIOKafkaClient(bootstrap_servers=config.bootstrap, **client_options(config))
    await client.bootstrap()
    try:
        node = client.get_random_node()
        for rule in rules:
            request = CreateAclsRequest(
                _RESOURCE[rule.resource],
                rule.name,
                _PREFIXED if rule.prefixed else _LITERAL,
                rule.principal,
                "*",
                _OPERATION[rule.operation],
                _ALLOW,
            )
            response = await client.send(node, request)
            for error_code, message in response.creation_responses:
                if error_code:
                    raise BrokerError(f"creating ACL {rule} failed: error {error_code} {message}")
    finally:
        await client.close()


async def grant(admin: KafkaConfig, topics: Topics, notifier_group: str, replication: int = 1) -> None:
    """Creates the topics (`replication` replicas each) and the ACLs of every service principal (`acls`),
    as `admin` (a super user): a secure broker's, or every broker's of the multi-host topology."""
    await ensure_topics(admin, replication)
    await _create_acls(admin, acls(topics, notifier_group))
    log.info("topics and ACLs created", prefix=topics.prefix, principals=list(topics.access()))


@dataclass
class Broker:
    """One KRaft broker+controller process on 127.0.0.1 (PLAINTEXT, or SASL_SSL with ACLs: `security`)."""

    data_dir: Path
    port: int = 19092
    controller_port: int = 0
    heap: str = "768m"
    process: subprocess.Popen[bytes] | None = None
    security: Security | None = None

    @property
    def bootstrap(self) -> str:
        """The bootstrap address clients use."""
        return f"127.0.0.1:{self.port}"

    def _listeners(self) -> list[str]:
        cport = self.controller_port
        if self.security is None:
            return [
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{cport}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            ]
        admin = self.security.passwords[ADMIN]
        return [
            f"listeners=CLIENT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{cport}",
            f"advertised.listeners=CLIENT://127.0.0.1:{self.port}",
            *(f"{key}={value}" for key, value in SECURE_SETTINGS.items()),
            f"listener.name.client.scram-sha-512.sasl.jaas.config={_jaas('scram', ADMIN, admin)}",
            f"ssl.keystore.location={self.security.keystore}",
            f"ssl.truststore.location={self.security.ca}",
            "listener.name.controller.plain.sasl.jaas.config="
            + _jaas("plain", ADMIN, admin, **{f"user_{ADMIN}": admin}),
        ]

    def _properties(self) -> Path:
        if not self.controller_port:
            self.controller_port = free_port()
        path = self.data_dir / "server.properties"
        path.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    *self._listeners(),
                    "controller.listener.names=CONTROLLER",
                    f"log.dirs={self.data_dir / 'logs'}",
                    "num.partitions=12",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=12",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "transaction.state.log.num.partitions=12",
                    # A room writer that died in a transaction stops reads of its partition until the
                    # broker aborts it (admission/fencing.py): look for such every second, not 10 s.
                    "transaction.abort.timed.out.transaction.cleanup.interval.ms=1000",
                    "group.initial.rebalance.delay.ms=0",
                    "log.cleaner.backoff.ms=5000",
                    "",
                ]
            )
        )
        return path

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            "java",
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",  # quick start matters more than peak JIT for a dev broker
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{LOG4J}",
            "-cp",
            f"{fetch_jars()}/*",
            main,
            *args,
        ]

    def format(self, cluster_id: str, props: Path) -> None:
        """Formats the KRaft storage for a new cluster id (any urlsafe id, one starting with "-" too), with
        the SCRAM users of `security`."""
        # --cluster-id=...: as a separate argument an id starting with "-" reads as an option.
        args = ["format", f"--cluster-id={cluster_id}", "-c", str(props)]
        if self.security is not None:
            for user, password in self.security.passwords.items():
                args += ["--add-scram", f"{SCRAM}=[name={user},password={password}]"]
        done = subprocess.run(
            self._java("kafka.tools.StorageTool", *args), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise BrokerError(f"kafka storage format failed:\n{done.stdout}\n{done.stderr}")

    def start(self, timeout_s: float = 90.0) -> None:
        """Formats storage on first use, starts the broker and waits until it accepts clients."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.security is not None:
            self.security.make_certificates()
        props = self._properties()
        if not (self.data_dir / "logs" / "meta.properties").exists():
            self.format(base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode(), props)
        logpath = self.data_dir / "broker.log"
        since = logpath.stat().st_size if logpath.exists() else 0
        logfile = open(logpath, "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            self._java("kafka.Kafka", str(props)),
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"kafka exited with {self.process.returncode}; see {logfile.name}")
            if _accepts(self.port) and _ready(logpath, since):
                log.info("kafka ready", bootstrap=self.bootstrap, data_dir=str(self.data_dir))
                return
            time.sleep(0.2)
        self.stop()
        raise BrokerError(f"kafka did not become ready within {timeout_s:.0f} s; see {logfile.name}")

    def grant(self, topics: Topics, notifier_group: str, partitions: int = 12) -> None:
        """Creates the topics and the ACLs of every service principal (`acls`), as admin."""
        if self.security is None:
            raise BrokerError("grant needs a broker with security (SASL_SSL and ACLs)")
        admin = self.security.client(ADMIN, self.bootstrap, topics.prefix, partitions=partitions)
        asyncio.run(grant(admin, topics, notifier_group))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the broker cleanly (SIGTERM), or kills it after the timeout."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def kill(self) -> None:
        """kill -9 of the broker, for fault tests."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, 9)
            self.process.wait(10)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _ready(logfile: Path, since: int) -> bool:
    """Whether the broker logged that it finished starting, after offset `since` of its log."""
    try:
        with open(logfile, "rb") as fh:
            fh.seek(since)
            return b"Transition from STARTING to STARTED (kafka.server.BrokerServer)" in fh.read()
    except OSError:
        return False
