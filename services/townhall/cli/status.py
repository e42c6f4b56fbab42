"""`townhall status`: every process of the topology, as the processes themselves report it.

Each process is asked over gRPC health (the status of every service it serves) and its Prometheus
endpoint is read for what it says of membership (admission: the admission and relay members its
probes find down, the relays it knows; the processes listed per service are the configured members)
and of Kafka (each consumer group's lag in records, per topic).
"""

from __future__ import annotations

import argparse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from rich.console import Console
from rich.table import Table

from townhall.cli.endpoints import config, load_manifest
from townhall.cli.output import print_json
from townhall.core.channels import blocking_channel
from townhall.core.config import TlsConfig

console = Console()
SERVING = "SERVING"
# What a process's metrics say of membership (admission's view of its peers) and of Kafka lag.
_MEMBERSHIP = ("townhall_admission_peers_down", "townhall_admission_relays_known")
_LAG = "townhall_kafka_consumer_lag_records"
# At most this many processes are asked: a manifest is the operator's, but a status line per process
# of a large cluster is no status.
MAX_PROCESSES = 200


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers `status`."""
    status = sub.add_parser(
        "status", help="every process: gRPC health, membership and Kafka lag (exit 1 if one is not serving)"
    )
    status.add_argument(
        "--timeout-s", type=float, default=3.0, help="how long each health check and scrape may take"
    )


@dataclass
class ProcessStatus:
    """One process as it reports itself."""

    name: str
    service: str
    grpc: str
    metrics: str
    # Each served service's health status ("" is the whole server), or {"": "UNREACHABLE"}.
    health: dict[str, str] = field(default_factory=dict)
    # Membership gauges (name{labels} -> value) and Kafka lag ("group topic" -> records).
    membership: dict[str, float] = field(default_factory=dict)
    lag: dict[str, float] = field(default_factory=dict)
    error: str = ""  # why health or metrics could not be read

    @property
    def serving(self) -> bool:
        """Whether the process answers SERVING for the whole server."""
        return self.health.get("") == SERVING


def samples(url: str, timeout_s: float = 5.0) -> list[Sample]:
    """Every sample a Prometheus endpoint serves."""
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        text = reply.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def sample_key(sample: Sample) -> str:
    """`name{label="value",...}` (labels sorted), as PromQL writes a series."""
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
    return f"{sample.name}{{{labels}}}" if labels else sample.name


def health(address: str, tls: TlsConfig, timeout_s: float) -> dict[str, str]:
    """The health status of every service the process at `address` serves, by name ("" is the server)."""
    with blocking_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            listed = stub.List(health_pb2.HealthListRequest(), timeout=timeout_s)
            return {name: _status_name(s.status) for name, s in listed.statuses.items()}
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        return {"": _status_name(reply.status)}


def _status_name(status: int) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def collect(manifest: Path, tls: TlsConfig, timeout_s: float = 3.0) -> list[ProcessStatus]:
    """The status of every process in a topology manifest (`townhall dev`'s topology.json)."""
    found: list[ProcessStatus] = []
    for service, entries in load_manifest(manifest)["services"].items():
        for index, entry in enumerate(entries):
            lane = f"{entry['lane']}-" if entry.get("lane") else ""
            found.append(
                ProcessStatus(f"{service}-{lane}{index}", service, entry["grpc"], entry.get("metrics", ""))
            )
    for process in found[:MAX_PROCESSES]:
        _fill(process, tls, timeout_s)
    return found[:MAX_PROCESSES]


def _fill(process: ProcessStatus, tls: TlsConfig, timeout_s: float) -> None:
    errors = []
    try:
        process.health = health(process.grpc, tls, timeout_s)
    except grpc.RpcError as exc:
        process.health = {"": "UNREACHABLE"}
        errors.append(f"health: {exc.code().name}")
    if process.metrics:
        try:
            found = samples(process.metrics, timeout_s)
        except (OSError, ValueError) as exc:  # URLError is an OSError
            errors.append(f"metrics: {exc}")
            found = []
        for sample in found:
            if sample.name in _MEMBERSHIP:
                process.membership[sample_key(sample)] = sample.value
            elif sample.name == _LAG:
                process.lag[f"{sample.labels.get('group', '')} {sample.labels.get('topic', '')}"] = (
                    sample.value
                )
    process.error = "; ".join(errors)


def run(args: argparse.Namespace) -> int:
    """Prints the status of every process (a table, or JSON with --json); 1 if any is not serving."""
    statuses = collect(args.root / "topology.json", config(args.config).tls, args.timeout_s)
    if args.json:
        print_json([_as_json(s) for s in statuses])
    else:
        table = Table("process", "address", "health", "membership", "kafka lag (records)", "error")
        for s in statuses:
            health_text = ", ".join(
                f"{name or 'server'}: {value}" for name, value in sorted(s.health.items())
            )
            members = "\n".join(f"{k} = {v:g}" for k, v in sorted(s.membership.items()))
            lag = "\n".join(f"{k}: {v:g}" for k, v in sorted(s.lag.items()))
            table.add_row(s.name, s.grpc, health_text, members, lag, s.error)
        console.print(table)
    return 0 if all(s.serving for s in statuses) else 1


def _as_json(status: ProcessStatus) -> dict[str, Any]:
    data = asdict(status)
    data["serving"] = status.serving
    return data
