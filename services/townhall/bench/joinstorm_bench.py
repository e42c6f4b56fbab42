"""Join-storm benchmark: ceiling, capacity, cold rooms alone, then a hot room at 3x capacity plus cold rooms.

Phases, all in one run on one machine (so ratios compare like with like):
1. ceiling  - a bare grpc.aio unary server (unary_ceiling.py) offered `probe_rate` joins/s;
2. capacity - admission (no admit budget) offered `probe_rate` joins/s to one room: its admits/s;
3. cold     - admission with its admit budget set to that capacity; 50 cold rooms at a low rate;
4. storm    - the same cold load plus one hot room offered `overload` x capacity.
Figures are per core of the measured processes. The machine is shared and noisy: compare
figures within one run.

`python -m townhall.bench.joinstorm_bench --seconds 60` or `run(...)` from `townhall bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console

from townhall.bench import ghz
from townhall.bench.joinstorm import Load, make_rooms, offer, table, wait_live
from townhall.core.channels import blocking_channel
from townhall.core.config import AuthConfig, KafkaConfig, TlsConfig
from townhall.core.kafka import ensure_topics
from townhall.core.tickets import TicketSigner
from townhall.devtools.kafka_broker import Broker, free_port
from townhall.v1.common_pb2 import Role

START_TIMEOUT_S = 30.0
# The servers under test run with the defaults (their TOWNHALL_* variables are cleared):
# development keys, no TLS.
AUTH, TLS = AuthConfig(), TlsConfig()


@contextlib.contextmanager
def _process(
    argv: list[str], env: dict[str, str], address: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A server child process, ready when its port accepts gRPC; always stopped on exit."""
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with blocking_channel(address, TlsConfig()) as channel:
            grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT_S)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _admission_env(
    bootstrap: str, addresses: list[str], me: str, admit_rate: float, extra: dict[str, str] | None = None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOWNHALL_")}
    env.update(
        TOWNHALL_KAFKA_BOOTSTRAP=bootstrap,
        TOWNHALL_ADMISSION_LISTEN=me,
        TOWNHALL_ADMISSION_METRICS_PORT="0",
        TOWNHALL_ADMISSION_MEMBERS=",".join(addresses),
        TOWNHALL_ADMISSION_ADMIT_RATE=str(admit_rate),
        TOWNHALL_LOG_LEVEL="warning",
    )
    env.update(extra or {})
    return env


@contextlib.contextmanager
def admission(
    bootstrap: str, count: int, admit_rate: float, logs: Path, extra: dict[str, str] | None = None
) -> Iterator[tuple[list[str], list[int]]]:
    """`count` admission processes on the broker (with `extra` TOWNHALL_* settings); addresses and pids."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    with contextlib.ExitStack() as stack:
        pids = []
        for i, address in enumerate(addresses):
            argv = [sys.executable, "-m", "townhall.admission"]
            env = _admission_env(bootstrap, addresses, address, admit_rate, extra)
            pids.append(stack.enter_context(_process(argv, env, address, logs / f"admission-{i}.log")).pid)
        yield addresses, pids


def jwt_cost_us(samples: int = 20_000) -> float:
    """Microseconds to issue and sign one listener ticket (PyJWT HS256), in this process."""
    signer = TicketSigner([("bench", "x" * 40)], 3600)
    start = time.perf_counter()
    for i in range(samples):
        signer.sign(signer.issue("r" * 16, i + 1, Role.ROLE_LISTENER, "127.0.0.1:50052"))
    return (time.perf_counter() - start) / samples * 1e6


@dataclass(frozen=True)
class Settings:
    """What the benchmark offers and with what."""

    seconds: float = 60.0
    probe_rate: float = 5000.0
    overload: float = 3.0
    cold_rate: float = 100.0
    generators: int = 2
    processes: int = 1
    ghz: str | None = None


async def _run(out_dir: Path, settings: Settings, console: Console) -> dict[str, Any]:
    seconds, probe_rate, overload, cold_rate = (
        settings.seconds, settings.probe_rate, settings.overload, settings.cold_rate
    )  # fmt: skip
    generators, processes, ghz_binary = settings.generators, settings.processes, settings.ghz
    phases: dict[str, dict[str, Any]] = {}
    short = min(seconds, 20.0)
    broker = Broker(out_dir / "joinstorm-kafka", port=free_port())
    broker.start()
    try:
        await ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        port = free_port()
        argv = [sys.executable, "-m", "townhall.bench.unary_ceiling", "--port", str(port)]
        address = f"127.0.0.1:{port}"
        with _process(argv, dict(os.environ), address, out_dir / "unary-ceiling.log") as ceiling:
            load = Load(
                (address,), "ceiling-room", probe_rate, (), 0.0, short, generators=generators, ghz=ghz_binary
            )
            phases["ceiling"] = await offer(load, [ceiling.pid], "ceiling", console)
        with admission(broker.bootstrap, processes, 0.0, out_dir) as (addresses, pids):
            hot, colds = await make_rooms(addresses[0], 50, AUTH, TLS)
            await wait_live(addresses, [hot, *colds], AUTH, TLS)
            load = Load(
                tuple(addresses), hot, probe_rate, (), 0.0, short, generators=generators, ghz=ghz_binary
            )
            phases["capacity"] = await offer(load, pids, "capacity", console)
        capacity = phases["capacity"]["admitted_per_s"]
        # The admit budget an operator would set from the capacity phase, split between processes.
        with admission(broker.bootstrap, processes, capacity / processes, out_dir) as (addresses, pids):
            await wait_live(addresses, [hot, *colds], AUTH, TLS)
            load = Load(
                tuple(addresses),
                None,
                0.0,
                tuple(colds),
                cold_rate,
                seconds,
                generators=generators,
                ghz=ghz_binary,
            )
            phases["cold"] = await offer(load, pids, "cold rooms alone", console)
            storm = Load(tuple(addresses), hot, overload * capacity, tuple(colds), cold_rate, seconds,
                         generators=generators, ghz=ghz_binary)  # fmt: skip
            phases["storm"] = await offer(storm, pids, "storm", console)
    finally:
        broker.stop()
    return phases


def targets(phases: dict[str, dict[str, Any]], processes: int) -> dict[str, Any]:
    """The issue's targets as ratios measured in this run."""
    ceiling = phases["ceiling"]["admitted_per_core_s"]
    capacity = phases["capacity"]
    storm, cold = phases["storm"], phases["cold"]
    per_core = capacity["admitted_per_core_s"]
    cold_ratio = (
        storm["cold"]["p99_ms"] / cold["cold"]["p99_ms"]
        if storm["cold"]["p99_ms"] and cold["cold"]["p99_ms"]
        else None
    )
    overload_ratio = (
        storm["admitted_per_s"] / capacity["admitted_per_s"] if capacity["admitted_per_s"] else None
    )
    return {
        "unary_ceiling_per_core_s": ceiling,
        "admitted_per_core_s": per_core,
        "admitted_vs_ceiling": round(per_core / ceiling, 3) if per_core and ceiling else None,
        "admitted_vs_ceiling_target": 0.8,
        "cold_p99_storm_vs_alone": round(cold_ratio, 2) if cold_ratio else None,
        "cold_p99_storm_vs_alone_target": 2.0,
        "overload_admitted_vs_capacity": round(overload_ratio, 3) if overload_ratio else None,
        "overload_admitted_vs_capacity_target": 0.9,
        "storm_shed_rate": round(
            (storm["hot"].get("shed_per_s", 0) + storm["hot"].get("waiting_per_s", 0))
            / max(1e-9, storm["hot"]["sent_per_s"]),
            3,
        ),
        "admission_processes": processes,
    }


def run(out_dir: Path, settings: Settings) -> dict[str, Any]:
    """Runs every phase, prints the table and targets, writes out_dir/joinstorm.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console() if Console().is_terminal else Console(width=180)
    phases = asyncio.run(_run(out_dir, settings, console))
    report: dict[str, Any] = {
        "benchmark": "joinstorm",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "grpcio": grpc.__version__},
        "parameters": {**dataclasses.asdict(settings), "cold_rooms": 50},
        "jwt_sign_us": round(jwt_cost_us(), 1),
        "phases": phases,
        "targets": targets(phases, settings.processes),
    }
    console.print(
        table(f"Join storm ({os.cpu_count()} CPUs, {settings.processes} admission process(es))", phases)
    )
    console.print_json(json.dumps({"jwt_sign_us": report["jwt_sign_us"], **report["targets"]}))
    (out_dir / "joinstorm.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m townhall.bench.joinstorm_bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".townhall/bench"))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--probe-rate", type=float, default=5000.0)
    parser.add_argument("--generators", type=int, default=2, help="Python generator processes (without ghz)")
    parser.add_argument("--processes", type=int, default=1, help="admission processes")
    parser.add_argument(
        "--no-ghz", action="store_true", help="generate with Python processes even if ghz is built"
    )
    args = parser.parse_args()
    binary = None if args.no_ghz else ghz.find()
    run(
        args.out,
        Settings(
            args.seconds, args.probe_rate, generators=args.generators, processes=args.processes, ghz=binary
        ),
    )


if __name__ == "__main__":
    main()
