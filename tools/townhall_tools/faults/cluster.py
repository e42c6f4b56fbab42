"""The local topology as the fault scenarios use it: endpoints, metrics, kill, SIGTERM and restore."""

from __future__ import annotations

import asyncio
import random
import time

from townhall.cli.status import sample_key, samples
from townhall.client import Client, Endpoints
from townhall.core.auth import GRANTS, Tokens
from townhall.core.config import DEV_AUTH
from townhall_tools.devtools.topology import Process, Topology
from townhall_tools.faults.measure import until

# The local topology runs with the built-in development keys: users' tokens are minted with them.
TOKENS = Tokens(DEV_AUTH)
user_metadata = TOKENS.metadata


def endpoints(topology: Topology) -> Endpoints:
    """Every admission owner (clients fail over between them), the crowd lane and the first notifier."""
    owners = [p for p in topology.of("admission") if not p.lane]
    crowd = [p.grpc for p in topology.of("admission") if p.lane == "crowd"]
    admission = ",".join(p.grpc for p in owners)
    notifiers = topology.of("notifier")
    return Endpoints(
        admission, notifiers[0].grpc if notifiers else admission, crowd=crowd[0] if crowd else ""
    )


def user(ends: Endpoints, user_id: int, retry_s: float | None = None) -> Client:
    """A client of `user_id` with every grant (a development token)."""
    token = TOKENS.mint(user_id, GRANTS)
    return Client(ends, user_id, token) if retry_s is None else Client(ends, user_id, token, retry_s=retry_s)


def fresh_user() -> int:
    """A user id no earlier run used."""
    return random.randrange(1, 2**40) * 1000


def scrape(proc: Process) -> dict[str, float]:
    """A process's Prometheus samples, keyed `name{label="value",...}` (labels sorted)."""
    found = samples(f"http://127.0.0.1:{proc.metrics_port}/metrics")
    return {sample_key(sample): sample.value for sample in found}


def metric(proc: Process, name: str) -> float:
    """The sum of a metric's samples on one process (every label combination)."""
    return sum(v for k, v in scrape(proc).items() if k == name or k.startswith(name + "{"))


async def seen_by_admission(topology: Topology, timeout_s: float = 30.0) -> None:
    """Waits until every admission process probes every member and relay up."""

    def all_up() -> bool:
        try:
            return all(metric(p, "townhall_admission_peers_down") == 0 for p in topology.of("admission"))
        except OSError:
            return False

    await until(all_up, timeout_s, "every admission process seeing every peer up", step_s=0.1)


async def restore(topology: Topology, proc: Process) -> float:
    """Starts a killed or stopped process again and waits until admission sees it; returns seconds."""
    started = time.monotonic()
    if proc.popen is not None and proc.popen.poll() is None:
        await asyncio.to_thread(proc.popen.wait, 60)
    await asyncio.to_thread(topology.restart, proc)
    await seen_by_admission(topology)
    return time.monotonic() - started


def fault(topology: Topology, proc: Process, kill: bool) -> None:
    """kill -9, or SIGTERM (the process drains and exits on its own)."""
    if kill:
        topology.kill(proc)
    else:
        topology.terminate(proc)


async def exited(proc: Process, timeout_s: float = 30.0) -> int:
    """Waits for a process to exit; returns its exit status."""
    assert proc.popen is not None
    return await asyncio.to_thread(proc.popen.wait, timeout_s)
