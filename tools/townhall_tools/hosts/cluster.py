"""The multi-host topology: each process in a container of its own on one user-defined Docker network.

Three KRaft brokers (broker and controller each, replication factor 3, min.insync.replicas 2; the
services' producers use acks=all), three admission owners and a crowd-lane process, five relays and two
notifiers. Every container has a fixed address on the network, a CPU quota (--cpus) and a memory limit.
Kafka is secured as the chart's bundled broker is (SASL_SSL, one SCRAM user per service, ACLs), the
services get fresh keys (`townhall keys`), each only those it uses, as the chart's Secrets give them.

Clients outside the containers use the client ports published on 127.0.0.1 (relays advertise theirs, so
tickets name an address the host can dial); the harness also reaches each container's own address
(internal ports, metrics, Kafka), as a host on the same network would. State (keys, certificates,
topology.json, client.toml) is kept under the root folder until `down`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import grpc
from docker.errors import APIError, NotFound
from docker.types import IPAMConfig, IPAMPool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from townhall.cli.keys import fresh
from townhall.core import logging
from townhall.core.certs import Authority, pem_keystore
from townhall.core.channels import blocking_channel
from townhall.core.config import AuthConfig, KafkaConfig, TlsConfig
from townhall.core.kafka import Topics
from townhall_tools.devtools.kafka_broker import ADMIN, SCRAM, SECURE_SETTINGS, Security, _jaas, grant

log = logging.get(__name__)

LABEL = "townhall.hosts"  # on every container and the network: what `down` removes
NETWORK = "townhall-hosts"
SUBNET = "172.29.0.0/24"
GATEWAY = "172.29.0.1"
TOPIC_PREFIX = "townhall"
NOTIFIER_GROUP = "townhall-notifier"
CLUSTER_ID = "tGGAtrvUQyyNQw06mjnUkQ"  # KRaft cluster id: 16 bytes, URL-safe base64
KAFKA_PORT, CONTROLLER_PORT = 9092, 9093
HEALTH_PORT = 8081
# Container ports (the chart's) of each service: client, internal, metrics.
PORTS = {
    "admission": (50051, 50071, 9101),
    "crowd": (50061, 0, 9161),
    "relay": (50052, 50072, 9102),
    "notifier": (50053, 50073, 9103),
}
# The client port of process i is published on 127.0.0.1 at port_base + OFFSETS[role] + i.
OFFSETS = {"admission": 50, "crowd": 60, "notifier": 70, "relay": 100}
# The last byte of each role's first address on SUBNET.
FIRST_IP = {"kafka": 10, "admission": 20, "crowd": 30, "relay": 40, "notifier": 50}
# (CPU quota in cores, memory limit) of each role's containers.
LIMITS = {
    "kafka": (1.0, "900m"),
    "admission": (0.5, "512m"),
    "crowd": (0.5, "512m"),
    "relay": (0.5, "512m"),
    "notifier": (0.5, "1g"),
}
KAFKA_HEAP = "-Xms384m -Xmx384m"
# The CFS period of every quota: a process that spends its quota early in a period waits for the next
# one, so the period bounds that pause. Docker's (and the kubelet's) default is 100 ms: at a quarter
# core a burst of joins can then wait 75 ms per period, which is the quota's artefact, not the service's
# cost; 10 ms keeps the same share with pauses ten times shorter (kubelet: --cpu-cfs-quota-period).
CPU_PERIOD_US = 10_000
# Settings of the services' own, as the chart's values give them (ci/kind-default-values.yaml keeps the
# defaults); the relay tree is small so that one room of a few listeners spans an origin and its edges.
SERVICE_ENV = {
    "TOWNHALL_LOG_JSON": "true",
    "TOWNHALL_SERVER_HEALTH_PORT": str(HEALTH_PORT),
    "TOWNHALL_RELAY_EDGE_TARGET": "2",
    "TOWNHALL_RELAY_TREE_DEGREE": "2",
    "TOWNHALL_ADMISSION_ROOMS_PER_HOST_PER_HOUR": "0",
}
# What the benches' topologies change: their rooms' hosts never publish, and a live room whose host is
# away for admission.host_grace_s (60 s) ends as abandoned (host failover), mid-measurement; off there.
BENCH_SETTINGS = {"TOWNHALL_ADMISSION_HOST_GRACE_S": "0"}
SERVICE_USER = {"admission": "admission", "crowd": "admission", "relay": "relay", "notifier": "notifier"}
SECRETS_DIR = "/etc/townhall/kafka"
KAFKA_DIR = "/mnt/hosts"


class ClusterError(RuntimeError):
    """The topology could not be started; the message says which container and why."""


@dataclass(frozen=True)
class Host:
    """One container: a broker or one Townhall process."""

    role: str  # kafka, admission, crowd, relay, notifier
    index: int
    ip: str
    published: int = 0  # the client port on the host's 127.0.0.1 (0: none)

    @property
    def name(self) -> str:
        """The container's name (and hostname): townhall-admission-0, townhall-kafka-2, ..."""
        return f"townhall-{self.role}-{self.index}"

    @property
    def service(self) -> str:
        """The Townhall service it runs (the crowd lane is admission); kafka for a broker."""
        return "admission" if self.role == "crowd" else self.role

    @property
    def volume(self) -> str:
        """Its named volume (notifiers: the follower graph), removed with the topology."""
        return f"{self.name}-data"

    @property
    def grpc(self) -> str:
        """The client address from the host (its published port)."""
        return f"127.0.0.1:{self.published}"

    @property
    def direct(self) -> str:
        """Its client port at its own address: what the benches dial from the host, through the bridge,
        with no docker-proxy (a process on the host, outside every quota) in the path."""
        return f"{self.ip}:{PORTS[self.role][0]}"

    @property
    def internal(self) -> str:
        """Its internal address on the network (the client port for the crowd lane and brokers)."""
        if self.role == "kafka":
            return f"{self.ip}:{KAFKA_PORT}"
        client, internal, _ = PORTS[self.role]
        return f"{self.ip}:{internal or client}"

    @property
    def health(self) -> str:
        """Its plaintext health port on the network."""
        return f"{self.ip}:{HEALTH_PORT}"

    @property
    def metrics(self) -> str:
        """Its /metrics URL on the network."""
        return f"http://{self.ip}:{PORTS[self.role][2]}/metrics"


def plan(
    admission: int = 3, crowd: int = 1, relays: int = 5, notifiers: int = 2, port_base: int = 31000
) -> list[Host]:
    """Every container of the topology, brokers first, then in the order they start."""
    hosts = [Host("kafka", i, _ip("kafka", i)) for i in range(3)]
    for role, count in (
        ("relay", relays),
        ("notifier", notifiers),
        ("admission", admission),
        ("crowd", crowd),
    ):
        hosts += [Host(role, i, _ip(role, i), port_base + OFFSETS[role] + i) for i in range(count)]
    return hosts


def _accepts(ip: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((ip, port)) == 0


def _owned(files: dict[Path, str], uid: int) -> None:
    """Files a container's user (uid) alone may read, mounted read-only."""
    for path in files:
        os.chown(path, uid, uid)
        path.chmod(0o400)


def _ip(role: str, index: int) -> str:
    return SUBNET.rsplit(".", 1)[0] + f".{FIRST_IP[role] + index}"


@dataclass
class Secrets:
    """The deployment's keys and the brokers' users and certificate, made once per root folder."""

    folder: Path
    keys: dict[str, str] = field(default_factory=dict)
    security: Security | None = None

    @classmethod
    def load_or_make(cls, folder: Path, brokers: list[Host]) -> Secrets:
        """The secrets kept in `folder`, or new ones written there (0600, never in Git: .townhall)."""
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        path = folder / "secrets.json"
        if path.exists():
            saved = json.loads(path.read_text())
            keys, passwords = saved["keys"], saved["kafka_passwords"]
        else:
            keys, passwords = fresh("k1"), {}
        security = Security(folder / "kafka", dict(passwords))
        if not path.exists():
            path.write_text(json.dumps({"keys": keys, "kafka_passwords": security.passwords}, indent=2))
            path.chmod(0o600)
        if not security.keystore.exists():
            pem = Authority(security.folder, "Townhall hosts Kafka CA").issue(
                "kafka-broker", dns=tuple(h.name for h in brokers), ips=tuple(h.ip for h in brokers)
            )
            pem_keystore(pem.key, pem.cert, security.keystore)
        return cls(folder, keys, security)

    @property
    def auth(self) -> AuthConfig:
        """[auth] of a client that mints user tokens and signs as an operator (the harness, the CLI)."""
        return AuthConfig(keys=(self.keys["auth.keys"],), service_keys=(self.keys["auth.service_keys"],))

    def env(self, service: str) -> dict[str, str]:
        """The keys one service gets: admission all, relays the service and ticket public keys, notifiers
        the user and service keys (as the chart's Secret projections)."""
        wanted = {
            "admission": ("auth.keys", "auth.service_keys", "tickets.private_key", "tickets.public_keys"),
            "relay": ("auth.service_keys", "tickets.public_keys"),
            "notifier": ("auth.keys", "auth.service_keys"),
        }[service]
        return {f"TOWNHALL_{k.replace('.', '_').upper()}": self.keys[k] for k in wanted}


class Cluster:
    """The containers of `plan()` under one Docker daemon; `up` starts them, `down` removes them."""

    def __init__(
        self,
        root: Path,
        image: str = "townhall:0.1.0",
        kafka_image: str = "townhall-kafka:3.9.1",
        hosts: list[Host] | None = None,
        cpus: dict[str, float] | None = None,
        settings: dict[str, str] | None = None,
        cpusets: dict[str, str] | None = None,
    ) -> None:
        self.root = root.resolve()
        # CPU quota (cores) of each role's containers: LIMITS unless given here (the scale-out curve runs
        # every scaled process at one quota of its choosing).
        if set(cpus or {}) - set(LIMITS) or any(not 0.1 <= c <= 8 for c in (cpus or {}).values()):
            raise ValueError(
                f"cpus: 0.1..8 cores (1 ms per 10 ms period at least) of roles {sorted(LIMITS)}, not {cpus}"
            )
        self.cpus = {role: (cpus or {}).get(role, limits[0]) for role, limits in LIMITS.items()}
        # TOWNHALL_* settings every service gets on top of the chart's (the benches' BENCH_SETTINGS).
        self.settings = dict(settings or {})
        # CPUs (cpuset) of containers by name: pinned ones run on those cores only; the others anywhere.
        self.cpusets = dict(cpusets or {})
        self.image = image
        self.kafka_image = kafka_image
        self.hosts = hosts if hosts is not None else plan()
        self.docker = docker.from_env(timeout=120)
        self._secrets: Secrets | None = None

    # What the topology is made of.

    def of(self, role: str) -> list[Host]:
        """The hosts of one role, by index."""
        return [h for h in self.hosts if h.role == role]

    def host(self, name: str) -> Host:
        """A host by container name."""
        return next(h for h in self.hosts if h.name == name)

    @property
    def secrets(self) -> Secrets:
        """The deployment's keys and Kafka users (made on first use)."""
        if self._secrets is None:
            self._secrets = Secrets.load_or_make(self.root / "secrets", self.of("kafka"))
        return self._secrets

    @property
    def bootstrap(self) -> str:
        """The brokers' client addresses (reachable from the host and from every container)."""
        return ",".join(h.internal for h in self.of("kafka"))

    def kafka(self, user: str = ADMIN) -> KafkaConfig:
        """The [kafka] config of a client signing in as `user` (the harness reads the topics as admin)."""
        security = self.secrets.security
        assert security is not None
        return security.client(user, self.bootstrap, TOPIC_PREFIX)

    @property
    def manifest(self) -> Path:
        """topology.json: the client addresses, as `townhall dev` writes them (`townhall --root`)."""
        return self.root / "topology.json"

    def describe(self) -> dict[str, Any]:
        """The topology.json content: services with their published client addresses."""
        services: dict[str, list[dict[str, Any]]] = {"admission": [], "relay": [], "notifier": []}
        for host in self.hosts:
            if host.role == "kafka":
                continue
            entry: dict[str, Any] = {
                "grpc": host.grpc,
                "internal": host.internal,
                "metrics": host.metrics,
                "container": host.name,
            }
            if host.role == "crowd":
                entry["lane"] = "crowd"
            if self.running(host):
                # The service's host PID (its container's init): `townhall loadtest` reads server CPU from it.
                entry["pid"] = self.pid(host)
            services[host.service].append(entry)
        return {"kafka": self.bootstrap, "network": NETWORK, "services": services}

    # Starting and stopping.

    def up(self, timeout_s: float = 300.0) -> None:
        """Creates the network and every container, brokers first; waits for each service to serve;
        writes topology.json and client.toml. Nothing to do when every container is up already; refuses to
        start over a topology that is partly up."""
        existing = self._containers()
        if existing and self.manifest.exists() and all(self.running(h) for h in self.hosts):
            log.info("hosts already up", manifest=str(self.manifest))
            return
        if existing:
            raise ClusterError(f"a topology is partly up ({NETWORK}); `make cluster-down` first")
        self.root.mkdir(parents=True, exist_ok=True)
        secrets = self.secrets
        self._network()
        deadline = time.monotonic() + timeout_s
        try:
            for broker in self.of("kafka"):
                self._run_broker(broker)
            asyncio.run(self._topics(deadline))
            for role in ("relay", "notifier", "admission", "crowd"):
                group = self.of(role)
                for host in group:
                    self._run_service(host, secrets)
                for host in group:
                    self.wait_serving(host, deadline - time.monotonic())
        except BaseException:
            for host in self.hosts:
                self._print_logs(host)
            self.down()
            raise
        self.manifest.write_text(json.dumps(self.describe(), indent=2))
        self._client_config()
        log.info("hosts up", manifest=str(self.manifest), containers=len(self.hosts))

    @contextlib.contextmanager
    def fresh(self, timeout_s: float = 300.0) -> Iterator[float]:
        """This topology brought up anew (any topology up before is removed first) for the block, and
        removed after it; yields the seconds `up` took."""
        self.down()
        started = time.monotonic()
        try:
            self.up(timeout_s)
            yield time.monotonic() - started
        finally:
            self.down()

    def down(self) -> int:
        """Removes every container of the topology (and its volumes) and the network; returns how many
        containers were removed. Safe to run when nothing is up."""
        removed = 0
        for container in self._containers():
            try:
                container.remove(force=True, v=True)
                removed += 1
            except NotFound:
                pass
        # Named volumes outlive their container (remove(v=True) takes anonymous ones only): a notifier's graph
        # would be the next topology's. Those of this plan by name (made before they were labelled), others by
        # label.
        names = {h.volume for h in self.hosts if h.role == "notifier"}
        names |= {v.name for v in self.docker.volumes.list(filters={"label": LABEL})}
        for name in names:
            with contextlib.suppress(NotFound):
                self.docker.volumes.get(name).remove(force=True)
        for network in self.docker.networks.list(filters={"label": LABEL}):
            with contextlib.suppress(NotFound):
                network.remove()
        for name in ("topology.json", "client.toml"):
            (self.root / name).unlink(missing_ok=True)
        return removed

    def _containers(self) -> list[Any]:
        return list(self.docker.containers.list(all=True, filters={"label": LABEL}))

    def _network(self) -> None:
        ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=SUBNET, gateway=GATEWAY)])
        self.docker.networks.create(NETWORK, driver="bridge", ipam=ipam, labels={LABEL: "1"})

    def _create(
        self,
        host: Host,
        image: str,
        command: list[str],
        env: dict[str, str],
        binds: dict[str, str] | None = None,
        user: str | None = None,
    ) -> None:
        cpus, memory = self.cpus[host.role], LIMITS[host.role][1]
        api = self.docker.api
        ports = [PORTS[host.role][0]] if host.published else []
        host_config = api.create_host_config(
            cpuset_cpus=self.cpusets.get(host.name),
            cpu_period=CPU_PERIOD_US,
            cpu_quota=int(cpus * CPU_PERIOD_US),
            mem_limit=memory,
            memswap_limit=memory,
            port_bindings={p: ("127.0.0.1", host.published) for p in ports},
            binds={src: {"bind": dst, "mode": "ro"} for src, dst in (binds or {}).items()},
            read_only=host.role != "kafka",
            tmpfs={"/tmp": "size=64m"} if host.role != "kafka" else None,
            # The notifier's graph: a volume of its own at the image's data folder (owned by its user).
            mounts=[docker.types.Mount("/var/lib/townhall", host.volume, labels={LABEL: "1"})]
            if host.role == "notifier"
            else None,
            cap_drop=["ALL"] if host.role != "kafka" else None,
        )
        endpoint = api.create_endpoint_config(ipv4_address=host.ip)
        networking = api.create_networking_config({NETWORK: endpoint})  # type: ignore[arg-type]
        api.create_container(
            image,
            command,
            name=host.name,
            hostname=host.name,
            environment=env,
            labels={LABEL: "1", f"{LABEL}.role": host.role},
            ports=ports,
            host_config=host_config,
            networking_config=networking,
            user=user,
        )
        api.start(host.name)

    def _run_broker(self, host: Host) -> None:
        security = self.secrets.security
        assert security is not None
        folder = self.root / "kafka" / host.name
        folder.mkdir(parents=True, exist_ok=True)
        admin = security.passwords[ADMIN]
        voters = ",".join(f"{b.index + 1}@{b.ip}:{CONTROLLER_PORT}" for b in self.of("kafka"))
        lines = [
            "process.roles=broker,controller",
            f"node.id={host.index + 1}",
            f"controller.quorum.voters={voters}",
            f"listeners=CLIENT://0.0.0.0:{KAFKA_PORT},CONTROLLER://0.0.0.0:{CONTROLLER_PORT}",
            f"advertised.listeners=CLIENT://{host.ip}:{KAFKA_PORT}",
            "controller.listener.names=CONTROLLER",
            *(f"{key}={value}" for key, value in SECURE_SETTINGS.items()),
            f"listener.name.client.scram-sha-512.sasl.jaas.config={_jaas('scram', ADMIN, admin)}",
            f"ssl.keystore.location={KAFKA_DIR}/keystore.pem",
            f"ssl.truststore.location={KAFKA_DIR}/ca.pem",
            "listener.name.controller.plain.sasl.jaas.config="
            + _jaas("plain", ADMIN, admin, **{f"user_{ADMIN}": admin}),
            "log.dirs=/var/lib/kafka/data",
            "num.partitions=12",
            "auto.create.topics.enable=false",
            # A write is acknowledged (acks=all) once on 2 of the 3 replicas; no unclean leader ever.
            "default.replication.factor=3",
            "min.insync.replicas=2",
            "unclean.leader.election.enable=false",
            "offsets.topic.replication.factor=3",
            "offsets.topic.num.partitions=12",
            "transaction.state.log.replication.factor=3",
            "transaction.state.log.min.isr=2",
            # A room writer that died in a transaction holds up readers of its partition until it is
            # aborted (docs/ownership.md): look for timed-out ones every second, not every 10.
            "transaction.abort.timed.out.transaction.cleanup.interval.ms=1000",
            "group.initial.rebalance.delay.ms=0",
            "",
        ]
        (folder / "server.properties").write_text("\n".join(lines))
        shutil.copyfile(security.keystore, folder / "keystore.pem")
        shutil.copyfile(security.ca, folder / "ca.pem")
        files = {folder / name: name for name in ("server.properties", "keystore.pem", "ca.pem")}
        _owned(files, 1000)  # the image's appuser
        scram = " ".join(
            f"--add-scram '{SCRAM}=[name={user},password={password}]'"
            for user, password in security.passwords.items()
        )
        script = (
            f"/opt/kafka/bin/kafka-storage.sh format --ignore-formatted --cluster-id={CLUSTER_ID} "
            f"-c {KAFKA_DIR}/server.properties {scram} >/dev/null && "
            f"exec /opt/kafka/bin/kafka-server-start.sh {KAFKA_DIR}/server.properties"
        )
        env = {
            "KAFKA_HEAP_OPTS": KAFKA_HEAP,
            "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseG1GC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true",
        }
        binds = {str(path): f"{KAFKA_DIR}/{name}" for path, name in files.items()}
        self._create(host, self.kafka_image, ["bash", "-c", script], env, binds)

    async def _topics(self, deadline: float) -> None:
        """Creates the topics (replication factor 3) and every service user's ACLs, as admin, once the
        three brokers take them."""
        while True:
            try:
                # Not before every broker accepts connections (aiokafka logs each refused one as an error).
                if not all(_accepts(b.ip, KAFKA_PORT) for b in self.of("kafka")):
                    raise ConnectionRefusedError("brokers starting")
                await grant(self.kafka(), Topics(TOPIC_PREFIX), NOTIFIER_GROUP, replication=3)
                return
            except Exception as exc:  # brokers still starting or electing: try again until the deadline
                if time.monotonic() > deadline:
                    raise ClusterError(f"the brokers did not take the topics: {exc!r}") from exc
                for broker in self.of("kafka"):
                    self._check_running(broker)
                await asyncio.sleep(2.0)

    def _service_env(self, host: Host, secrets: Secrets) -> dict[str, str]:
        service = host.service
        client, internal, metrics = PORTS[host.role]
        prefix = f"TOWNHALL_{service.upper()}_"
        kafka_user = SERVICE_USER[host.role]
        env = {
            **SERVICE_ENV,
            **secrets.env(service),
            "TOWNHALL_KAFKA_BOOTSTRAP": self.bootstrap,
            "TOWNHALL_KAFKA_TOPIC_PREFIX": TOPIC_PREFIX,
            "TOWNHALL_KAFKA_PARTITIONS": "12",
            "TOWNHALL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "TOWNHALL_KAFKA_SASL_MECHANISM": SCRAM,
            "TOWNHALL_KAFKA_CA": f"{SECRETS_DIR}/ca.crt",
            "TOWNHALL_KAFKA_USERNAME": kafka_user,
            "TOWNHALL_KAFKA_PASSWORD_FILE": f"{SECRETS_DIR}/password",
            # Clients outside reach the published ports through the network's gateway: one address for
            # every client, as behind a load balancer that rewrites addresses (chart: limits.exempt).
            "TOWNHALL_LIMITS_EXEMPT": f"{GATEWAY}/32",
            f"{prefix}LISTEN": f"0.0.0.0:{client}",
            f"{prefix}INTERNAL_LISTEN": f"0.0.0.0:{internal}" if internal else "",
            f"{prefix}METRICS_PORT": str(metrics),
            "TOWNHALL_ADMISSION_RELAYS": "",
            "TOWNHALL_ADMISSION_RELAYS_INTERNAL": "",
        }
        if service == "admission":
            env["TOWNHALL_ADMISSION_ADVERTISE"] = host.internal
            env["TOWNHALL_ADMISSION_MEMBERS"] = ",".join(h.internal for h in self.of("admission"))
            if host.role == "crowd":
                env["TOWNHALL_ADMISSION_OWNER"] = "false"
                env["TOWNHALL_ADMISSION_MAX_PENDING_REQUESTS"] = "16"
        elif service == "relay":
            env["TOWNHALL_RELAY_ADVERTISE"] = host.grpc
            env["TOWNHALL_RELAY_INTERNAL_ADVERTISE"] = host.internal
        else:
            env["TOWNHALL_NOTIFIER_ADVERTISE"] = host.internal
            env["TOWNHALL_NOTIFIER_MEMBERS"] = ",".join(h.internal for h in self.of("notifier"))
            env["TOWNHALL_NOTIFIER_DATA_DIR"] = "/var/lib/townhall/notifier"
            env["TOWNHALL_NOTIFIER_GROUP_ID"] = NOTIFIER_GROUP
        return {**env, **self.settings}

    def _run_service(self, host: Host, secrets: Secrets) -> None:
        security = secrets.security
        assert security is not None
        folder = self.root / "secrets" / host.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "password").write_text(security.passwords[SERVICE_USER[host.role]])
        shutil.copyfile(security.ca, folder / "ca.crt")
        files = {folder / name: name for name in ("password", "ca.crt")}
        _owned(files, 10001)  # the image's townhall user
        binds = {str(path): f"{SECRETS_DIR}/{name}" for path, name in files.items()}
        command = ["python", "-m", f"townhall.{host.service}"]
        self._create(host, self.image, command, self._service_env(host, secrets), binds)

    def _client_config(self) -> None:
        """client.toml: the keys the CLI mints user tokens with (`townhall --config`), kept secret."""
        auth = self.secrets.auth
        path = self.root / "client.toml"
        path.write_text(
            "# The multi-host topology's keys for the CLI (townhall --config): keep secret.\n"
            f"[auth]\nkeys = {json.dumps(list(auth.keys))}\n"
            f"service_keys = {json.dumps(list(auth.service_keys))}\n"
        )
        path.chmod(0o600)

    # Containers as hosts: health, stop, start, kill.

    def container(self, host: Host) -> Any:
        """The Docker container of a host."""
        return self.docker.containers.get(host.name)

    def pid(self, host: Host) -> int:
        """The host's init process id (its network namespace is /proc/PID/ns/net)."""
        pid = int(self.container(host).attrs["State"]["Pid"])
        if pid <= 0:
            raise ClusterError(f"{host.name} is not running")
        return pid

    def running(self, host: Host) -> bool:
        """Whether the container is running."""
        try:
            return bool(self.container(host).attrs["State"]["Running"])
        except NotFound:
            return False

    def _check_running(self, host: Host) -> None:
        if not self.running(host):
            raise ClusterError(f"{host.name} exited; `docker logs {host.name}`:\n{self.logs(host)}")

    def logs(self, host: Host, lines: int = 30) -> str:
        """The last lines the container wrote."""
        try:
            return str(self.container(host).logs(tail=lines).decode(errors="replace"))
        except (NotFound, APIError):
            return ""

    def _print_logs(self, host: Host) -> None:
        if not self.running(host):
            text = self.logs(host)
            if text:
                log.warning("container stopped", container=host.name, logs=text[-3000:])

    def wait_serving(self, host: Host, timeout_s: float) -> float:
        """Waits until the host's gRPC health (its health port, on the network) says SERVING; returns
        the seconds it took."""
        if host.role == "kafka":
            raise ValueError("brokers have no gRPC health")
        started = time.monotonic()
        deadline = started + max(1.0, timeout_s)
        with blocking_channel(host.health, TlsConfig()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self._check_running(host)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - started
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        raise ClusterError(f"{host.name} not serving within {timeout_s:.0f} s:\n{self.logs(host)}")

    def stop(self, host: Host, timeout_s: int = 20) -> None:
        """docker stop: SIGTERM, SIGKILL after the timeout."""
        self.container(host).stop(timeout=timeout_s)

    def kill(self, host: Host) -> None:
        """docker kill: the whole host is gone at once (SIGKILL of every process in it)."""
        self.container(host).kill()

    def start(self, host: Host) -> None:
        """Starts a stopped or killed container again (same address, same volumes)."""
        self.container(host).start()
