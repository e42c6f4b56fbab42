"""The local topology: a real Kafka broker and N processes of each service on loopback.

It mirrors the Helm chart (same entrypoints, same TOWNHALL_* settings) and records itself in
`topology.json` so the CLI, demo, tests, benchmarks and Prometheus can find every process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from townhall.core import logging
from townhall.core.config import DEV_ENV, KafkaConfig, TlsConfig
from townhall.core.config import load as load_config
from townhall.core.kafka import ensure_topics
from townhall_tools.devtools.kafka_broker import Broker, free_port
from townhall_tools.devtools.processes import stop, wait_serving

log = logging.get(__name__)

SERVICES = ("relay", "notifier", "admission")  # start order: admission hands out relays
# (client port, metrics port, internal port) of the first process of each service.
FIXED_PORTS = {
    "admission": (50051, 9101, 50071),
    "relay": (50052, 9102, 50072),
    "notifier": (50053, 9103, 50073),
}
# Admission's crowd lane: admission processes that own no rooms and take the joins of crowd rooms.
FIXED_CROWD_PORTS = (50061, 9161, 50081)
CROWD_PENDING = 16
FIXED_KAFKA_PORT = 19092
# A fixed-port topology gives process i of a service these ports plus 100 * i.
FIXED_STRIDE = 100


@dataclass
class Process:
    """One service process of the topology."""

    service: str
    index: int
    grpc: str
    metrics_port: int
    popen: subprocess.Popen[bytes] | None = None
    # "crowd" for an admission process of the crowd lane (owns no rooms, takes crowd rooms' joins).
    lane: str = ""
    # Its internal port (host:port): calls between Townhall processes only, never clients'.
    internal: str = ""
    # TOWNHALL_* settings of this process alone, over the topology's.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """admission-0, relay-1, admission-crowd-0, ..."""
        return f"{self.service}-{self.lane + '-' if self.lane else ''}{self.index}"

    def describe(self) -> dict[str, Any]:
        """Its entry in topology.json."""
        entry: dict[str, Any] = {
            "grpc": self.grpc,
            "internal": self.internal,
            "metrics": f"http://127.0.0.1:{self.metrics_port}/metrics",
            "pid": self.popen.pid if self.popen else None,
        }
        if self.lane:
            entry["lane"] = self.lane
        return entry


@dataclass
class Topology:
    """Kafka plus `counts[service]` processes of each service (and `counts["crowd"]` crowd-lane
    admission processes), under `root`."""

    root: Path
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERVICES, 1))
    fixed_ports: bool = True
    env: dict[str, str] = field(default_factory=dict)
    broker: Broker | None = None
    processes: list[Process] = field(default_factory=list)
    # An existing broker (bootstrap address) to use instead of starting one, and the topic prefix
    # (several topologies can share one broker with prefixes of their own).
    kafka: str | None = None
    topic_prefix: str = "townhall"
    # The development keys the processes get (those the environment leaves unset), set by start().
    _keys: dict[str, str] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        """The Kafka bootstrap address the processes use."""
        if self.kafka is not None:
            return self.kafka
        assert self.broker is not None
        return self.broker.bootstrap

    def of(self, service: str) -> list[Process]:
        """The processes of one service, by index."""
        return [p for p in self.processes if p.service == service]

    @property
    def manifest(self) -> Path:
        """Where the topology is recorded."""
        return self.root / "topology.json"

    def _process(self, service: str, index: int, lane: str = "") -> Process:
        if self.fixed_ports:
            ports = FIXED_CROWD_PORTS if lane else FIXED_PORTS[service]
            grpc_port, metrics_port, internal_port = (port + FIXED_STRIDE * index for port in ports)
        else:
            grpc_port, metrics_port, internal_port = free_port(), free_port(), free_port()
        return Process(
            service,
            index,
            f"127.0.0.1:{grpc_port}",
            metrics_port,
            lane=lane,
            internal=f"127.0.0.1:{internal_port}",
        )

    def start(self, timeout_s: float = 60.0) -> None:
        """Starts Kafka and every process, waits until all report SERVING, writes topology.json."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        if self.kafka is None:
            kafka_port = FIXED_KAFKA_PORT if self.fixed_ports else free_port()
            self.broker = Broker(self.root / "kafka", port=kafka_port)
            self.broker.start()
        asyncio.run(ensure_topics(KafkaConfig(bootstrap=self.bootstrap, topic_prefix=self.topic_prefix)))
        for service in SERVICES:
            for index in range(self.counts.get(service, 0)):
                self.processes.append(self._process(service, index))
        for index in range(self.counts.get("crowd", 0)):
            self.processes.append(self._process("admission", index, "crowd"))
        # The children read the same TOWNHALL_* settings: health checks dial them as they serve.
        tls = load_config(env={**os.environ, **self.env}).tls
        self._keys = self.development_keys()
        try:
            for service in SERVICES:
                group = [p for p in self.processes if p.service == service]
                for proc in group:
                    self._spawn(proc)
                for proc in group:
                    self._wait(proc, timeout_s, tls)
        except BaseException:
            self.stop()
            raise
        self.manifest.write_text(json.dumps(self.describe(), indent=2))
        log.info("topology ready", manifest=str(self.manifest))

    def add(self, service: str, timeout_s: float = 60.0, env: Mapping[str, str] | None = None) -> Process:
        """Starts one more process of `service` in a running topology (a relay added as an autoscaler
        would add one: the processes already running are not told), waits until it serves. `env`: settings
        of this process alone."""
        index = max((p.index for p in self.of(service)), default=-1) + 1
        proc = self._process(service, index)
        proc.env.update(env or {})
        self.processes.append(proc)
        self._spawn(proc)
        self._wait(proc, timeout_s)
        self.manifest.write_text(json.dumps(self.describe(), indent=2))
        return proc

    def describe(self) -> dict[str, Any]:
        """The topology.json content."""
        return {
            "kafka": self.bootstrap,
            "services": {s: [p.describe() for p in self.processes if p.service == s] for s in SERVICES},
        }

    def development_keys(self) -> dict[str, str]:
        """The development keys of every key the environment and config file leave unset: the local
        topology (and only it) runs with them when it is given none."""
        config = load_config(env={**os.environ, **self.env})
        unset = {
            "TOWNHALL_AUTH_KEYS": not (config.auth.keys or config.auth.jwks),
            "TOWNHALL_AUTH_SERVICE_KEYS": not config.auth.service_keys,
            "TOWNHALL_TICKETS_PRIVATE_KEY": not config.tickets.private_key,
            "TOWNHALL_TICKETS_PUBLIC_KEYS": not config.tickets.public_keys,
        }
        return {key: DEV_ENV[key] for key, missing in unset.items() if missing}

    def _child_env(self, proc: Process) -> dict[str, str]:
        prefix = f"TOWNHALL_{proc.service.upper()}_"
        relays = [p for p in self.processes if p.service == "relay"]
        env = {
            # Load tests against the local topology come from loopback: not limited per address
            # unless the caller's environment says otherwise.
            "TOWNHALL_LIMITS_EXEMPT": "127.0.0.0/8,::1/128",
            **self._keys,
            **os.environ,
            "TOWNHALL_KAFKA_BOOTSTRAP": self.bootstrap,
            "TOWNHALL_KAFKA_TOPIC_PREFIX": self.topic_prefix,
            "TOWNHALL_ADMISSION_RELAYS": ",".join(p.grpc for p in relays),
            "TOWNHALL_ADMISSION_RELAYS_INTERNAL": ",".join(p.internal for p in relays),
            f"{prefix}LISTEN": proc.grpc,
            f"{prefix}INTERNAL_LISTEN": proc.internal,
            f"{prefix}METRICS_PORT": str(proc.metrics_port),
            "TOWNHALL_NOTIFIER_DATA_DIR": str(self.root / f"notifier-{proc.index}"),
            "TOWNHALL_NOTIFIER_GROUP_ID": f"{self.topic_prefix}-notifier",
            **self.env,
        }
        if proc.service == "relay":
            env["TOWNHALL_RELAY_ADVERTISE"] = proc.grpc
        if proc.service == "admission":
            # Every admission process knows the owners (their internal ports): rooms are owned by
            # rendezvous over this list.
            env["TOWNHALL_ADMISSION_ADVERTISE"] = proc.internal
            env["TOWNHALL_ADMISSION_MEMBERS"] = ",".join(
                p.internal for p in self.processes if p.service == "admission" and not p.lane
            )
            if proc.lane == "crowd":
                env["TOWNHALL_ADMISSION_OWNER"] = "false"
                env["TOWNHALL_ADMISSION_MAX_PENDING_REQUESTS"] = str(CROWD_PENDING)
        if proc.service == "notifier":
            # Each followee's graph shard lives on one notifier, by rendezvous over this list.
            env["TOWNHALL_NOTIFIER_ADVERTISE"] = proc.internal
            env["TOWNHALL_NOTIFIER_MEMBERS"] = ",".join(
                p.internal for p in self.processes if p.service == "notifier"
            )
        env.update(proc.env)
        return env

    def _spawn(self, proc: Process) -> None:
        logfile = open(self.root / "logs" / f"{proc.name}.log", "ab")  # noqa: SIM115
        proc.popen = subprocess.Popen(
            [sys.executable, "-m", f"townhall.{proc.service}"],
            env=self._child_env(proc),
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _wait(self, proc: Process, timeout_s: float, tls: TlsConfig | None = None) -> None:
        assert proc.popen is not None
        # The children read the same TOWNHALL_* settings: health checks dial them as they serve.
        tls = tls or load_config(env={**os.environ, **self.env}).tls
        wait_serving(proc.popen, proc.grpc, proc.name, timeout_s, tls)

    def restart(self, proc: Process, timeout_s: float = 60.0) -> None:
        """Starts a stopped or killed process again on the same ports."""
        self._spawn(proc)
        self._wait(proc, timeout_s)

    def kill(self, proc: Process) -> None:
        """kill -9 of one process (no drain, no goodbye), for fault tests."""
        if proc.popen is not None and proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait(10)

    def terminate(self, proc: Process) -> None:
        """SIGTERM to one process; returns at once (it drains, then exits)."""
        if proc.popen is not None and proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to every process (admission first), then the broker; kills stragglers."""
        stop([proc.popen for proc in reversed(self.processes)], grace_s)
        if self.broker is not None:
            self.broker.stop()
