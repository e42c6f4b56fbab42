"""A real single-node Apache Kafka broker (KRaft) on loopback, from Apache's jars on Maven Central.

The jars are fetched once with Maven into `.cache/kafka/libs` (about 46 MB); the data folder is
formatted on first use. Used by `townhall kafka`, `townhall dev` and the integration tests.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from townhall.core import logging

log = logging.get(__name__)

REPO = Path(__file__).resolve().parents[3]
POM = REPO / "deploy" / "kafka" / "pom.xml"
LOG4J = REPO / "deploy" / "kafka" / "log4j.properties"
LIBS = REPO / ".cache" / "kafka" / "libs"


class BrokerError(RuntimeError):
    """The broker could not be fetched, formatted or started; the message says why."""


def fetch_jars(libs: Path = LIBS) -> Path:
    """Downloads the broker jars with Maven unless they are already cached."""
    if (libs / ".complete").exists():
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
    (libs / ".complete").touch()
    return libs


# Ports handed out for servers come from below the kernel's ephemeral range: a port the kernel picked
# (bind to 0) is one it may give the next outgoing connection as its source port before the server
# that was meant to have it binds (seen in CI: a metrics port taken between pick and bind).
_SERVER_PORTS = range(20_000, 32_768)


def free_port() -> int:
    """A TCP port on loopback that is free right now, outside the ephemeral range where possible."""
    low = _ephemeral_low()
    ports = [p for p in _SERVER_PORTS if p < low]
    for port in random.sample(ports, min(len(ports), 200)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


@dataclass
class Broker:
    """One KRaft broker+controller process on 127.0.0.1."""

    data_dir: Path
    port: int = 19092
    controller_port: int = 0
    heap: str = "768m"
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """The bootstrap address clients use."""
        return f"127.0.0.1:{self.port}"

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
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={self.data_dir / 'logs'}",
                    "num.partitions=12",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=12",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
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
        """Formats the KRaft storage for a new cluster id (any urlsafe id, one starting with "-" too)."""
        done = subprocess.run(
            # --cluster-id=...: as a separate argument an id starting with "-" reads as an option.
            self._java("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(props)),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise BrokerError(f"kafka storage format failed:\n{done.stdout}\n{done.stderr}")

    def start(self, timeout_s: float = 90.0) -> None:
        """Formats storage on first use, starts the broker and waits until it accepts clients."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
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
