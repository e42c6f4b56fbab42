"""Join-storm benchmark: ceiling and capacity by rate search, cold rooms alone, a 3x storm (two ways).

Phases, all in one run on one machine (so ratios compare like with like):
1. ceiling  - a bare grpc.aio unary server (bare_join_server.py): offered rates rise step by step until
              a step is not clean (errors, offered not served, p99 over STEP_P99_MS); the best clean
              step gives the most calls/s and the calls per CPU-second (per core);
2. capacity - admission (no admit budget), the same search with joins to one room: its admits/s;
3. cold     - admission with its admit budget set to that capacity (and a crowd-lane process beside
              it, as the chart runs them): 50 cold rooms at a low rate;
4. storm    - the same cold load plus one hot room offered `overload` x capacity on the crowd lane
              (the hot room draws a crowd: its clients know it from the notification or the Room);
5. storm, one lane - the same storm with the hot room's joins on the owner's port, as without the
              crowd lane: what the lane buys;
6. cold, busy cores - the cold load alone while one plain busy loop per CPU (no Townhall, no
              network) holds the cores: what sharing this machine's cores alone does to cold p99,
              since the storm's generator and crowd lane must run on the same cores as the owner.
Figures are per core of the measured processes. The machine is shared and noisy: compare
figures within one run.

`python -m townhall_tools.bench.join_storm --seconds 60` or `run(...)` from `townhall bench`.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from townhall.core.config import DEV_AUTH, DEV_ENV, KafkaConfig, TlsConfig, load
from townhall.core.kafka import ensure_topics
from townhall.core.tickets import TicketSigner
from townhall.v1.common_pb2 import Role
from townhall_tools.bench import join_load_ghz
from townhall_tools.bench.env import LIMITS
from townhall_tools.bench.join_load import Load, make_rooms, offer, table, wait_live
from townhall_tools.devtools.kafka_broker import Broker, free_port
from townhall_tools.devtools.processes import start_serving, stop
from townhall_tools.devtools.topology import CROWD_PENDING

START_TIMEOUT_S = 30.0
# The servers under test run with the defaults (their TOWNHALL_* variables are cleared):
# development keys, no TLS; rate limits that never refuse (bench/env.py).
AUTH, TLS = DEV_AUTH, TlsConfig()


@contextlib.contextmanager
def _process(
    argv: list[str], env: dict[str, str], address: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A server child process, once it serves; always stopped on exit."""
    with open(log, "ab") as out:
        process = start_serving(log.stem, argv, env, address, out, START_TIMEOUT_S)
    try:
        yield process
    finally:
        stop([process])


def _admission_env(
    bootstrap: str,
    members: list[str],
    me: str,
    internal: str,
    admit_rate: float,
    crowd: bool,
    extra: dict[str, str],
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOWNHALL_")}
    env.update(
        DEV_ENV,
        TOWNHALL_KAFKA_BOOTSTRAP=bootstrap,
        TOWNHALL_ADMISSION_LISTEN=me,
        TOWNHALL_ADMISSION_INTERNAL_LISTEN=internal,
        TOWNHALL_ADMISSION_METRICS_PORT="0",
        TOWNHALL_ADMISSION_MEMBERS=",".join(members),
        TOWNHALL_ADMISSION_ADMIT_RATE=str(admit_rate),
        TOWNHALL_LOG_LEVEL="warning",
        **LIMITS,
    )
    if crowd:  # the crowd lane as `townhall dev` and the chart run it
        env.update(
            TOWNHALL_ADMISSION_OWNER="false", TOWNHALL_ADMISSION_MAX_PENDING_REQUESTS=str(CROWD_PENDING)
        )
    env.update(extra)
    return env


@dataclass(frozen=True)
class Admission:
    """Admission processes started for a phase: owners' and crowd-lane addresses, every pid."""

    addresses: tuple[str, ...]
    crowd: tuple[str, ...]
    pids: list[int]


@contextlib.contextmanager
def admission(
    bootstrap: str,
    count: int,
    admit_rate: float,
    logs: Path,
    crowd: int = 0,
    extra: dict[str, str] | None = None,
) -> Iterator[Admission]:
    """`count` owners and `crowd` crowd-lane processes on the broker (with `extra` TOWNHALL_* settings)."""
    owners = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    lane = [f"127.0.0.1:{free_port()}" for _ in range(crowd)]
    # Members know each other by their internal ports.
    internal = [f"127.0.0.1:{free_port()}" for _ in range(count + crowd)]
    with contextlib.ExitStack() as stack:
        pids = []
        for i, address in enumerate([*owners, *lane]):
            argv = [sys.executable, "-m", "townhall.admission"]
            env = _admission_env(
                bootstrap, internal[:count], address, internal[i], admit_rate, i >= count, extra or {}
            )
            pids.append(stack.enter_context(_process(argv, env, address, logs / f"admission-{i}.log")).pid)
        yield Admission(tuple(owners), tuple(lane), pids)


@contextlib.contextmanager
def busy_cores(count: int, seconds: float) -> Iterator[None]:
    """`count` processes spinning in a loop for at most `seconds` (killed on exit)."""
    spin = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait(5)


def jwt_cost_us(samples: int = 20_000) -> float:
    """Microseconds to issue and sign one listener ticket, in this process."""
    signer = TicketSigner.from_config(load(env=DEV_ENV).tickets)
    start = time.perf_counter()
    for i in range(samples):
        signer.sign(signer.issue("r" * 16, i + 1, Role.ROLE_LISTENER, "127.0.0.1:50052"))
    return (time.perf_counter() - start) / samples * 1e6


# A search step is clean when its calls are served: at most 1% errors, at least 97% of the offered
# rate answered, and p99 within STEP_P99_MS. Steps rise by STEP_FACTOR from `search_from`.
STEP_P99_MS = 250.0
STEP_FACTOR = 1.2
MAX_STEPS = 14
MAX_HALVINGS = 3


@dataclass(frozen=True)
class Settings:
    """What the benchmark offers and with what."""

    seconds: float = 60.0
    step_seconds: float = 6.0
    search_from: float = 400.0
    overload: float = 3.0
    cold_rate: float = 100.0
    generators: int = 2
    processes: int = 1
    ghz: str | None = None
    # The storm with the hot room on the main port as well (what the crowd lane buys); 0 skips it.
    one_lane_seconds: float = 20.0
    # Cold rooms while busy loops hold every core (the cost of sharing the cores); 0 skips it.
    busy_seconds: float = 20.0


def clean(figures: dict[str, Any], rate: float, kind: str = "hot") -> bool:
    """Whether a step served its offered `rate` of `kind` joins cleanly (the bar of every rate search)."""
    joins = figures[kind]
    sent = joins["sent_per_s"] or 1e-9
    answered = sum(v for k, v in joins.items() if k in ("granted_per_s", "waiting_per_s"))
    errors = sent - answered
    p99 = joins["p99_ms"] if joins["p99_ms"] is not None else float("inf")
    return errors <= 0.01 * sent and answered >= 0.97 * rate and p99 <= STEP_P99_MS


async def search(
    load_at: Callable[[float], Load],
    start: float,
    pids: list[int],
    name: str,
    console: Console,
    kind: str = "hot",
    refine: int = 0,
) -> dict[str, Any]:
    """Offers `load_at(rate)` at rates rising by STEP_FACTOR from `start` until a step is not clean; the
    best clean step's figures, with every step. A first step that is not clean halves the start (at most
    MAX_HALVINGS times) before the search gives up. `refine` more steps then halve the gap between the
    best clean rate and the first rate that was not (geometrically): each halves the figure's uncertainty,
    x1.2 -> x1.095 -> x1.047."""
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    rate = start
    halvings = 0
    clean_rate, failed_rate = 0.0, 0.0

    async def step(rate: float) -> bool:
        nonlocal best
        figures = await offer(load_at(rate), pids, f"{name} {rate:,.0f}/s", console)
        ok = clean(figures, rate, kind)
        steps.append({"offered_per_s": round(rate, 1), "clean": ok, **figures})
        if ok and (best is None or figures["admitted_per_s"] > best["admitted_per_s"]):
            best = figures
        return ok

    for _ in range(MAX_STEPS + MAX_HALVINGS):
        ok = await step(rate)
        if not ok and best is None and halvings < MAX_HALVINGS:
            halvings += 1
            rate /= 2
            continue
        if not ok:
            failed_rate = rate
            break
        clean_rate = rate
        rate *= STEP_FACTOR
    if best is None:
        raise RuntimeError(f"{name}: not even {rate:.0f} calls/s were served cleanly")
    for _ in range(refine if failed_rate else 0):
        middle = (clean_rate * failed_rate) ** 0.5
        if await step(middle):
            clean_rate = middle
        else:
            failed_rate = middle
    return {**best, "steps": [_step_row(s, kind) for s in steps]}


def _step_row(step: dict[str, Any], kind: str) -> dict[str, Any]:
    joins = step[kind]
    keep = ("offered_per_s", "clean", "admitted_per_s", "server_cpu_cores", "admitted_per_core_s",
            "generator_cpu_cores")  # fmt: skip
    return {**{k: step[k] for k in keep}, "p99_ms": joins["p99_ms"], "sent_per_s": joins["sent_per_s"]}


async def _run(out_dir: Path, settings: Settings, console: Console) -> dict[str, Any]:
    seconds, overload, cold_rate = settings.seconds, settings.overload, settings.cold_rate
    generators, processes, ghz_binary = settings.generators, settings.processes, settings.ghz
    phases: dict[str, dict[str, Any]] = {}

    def step_load(addresses: tuple[str, ...], room: str) -> Callable[[float], Load]:
        return lambda rate: Load(addresses, room, rate, (), 0.0, settings.step_seconds, generators=generators,
                                 ghz=ghz_binary, auth=AUTH, tls=TLS)  # fmt: skip

    broker = Broker(out_dir / "joinstorm-kafka", port=free_port())
    broker.start()
    try:
        await ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        port = free_port()
        argv = [sys.executable, "-m", "townhall_tools.bench.bare_join_server", "--port", str(port)]
        address = f"127.0.0.1:{port}"
        with _process(argv, dict(os.environ), address, out_dir / "unary-ceiling.log") as ceiling:
            phases["ceiling"] = await search(
                step_load((address,), "ceiling-room"), settings.search_from, [ceiling.pid], "ceiling", console
            )
        with admission(broker.bootstrap, processes, 0.0, out_dir) as admitting:
            hot, colds = await make_rooms(admitting.addresses[0], 50, AUTH, TLS)
            await wait_live(admitting.addresses, [hot, *colds], AUTH, TLS)
            phases["capacity"] = await search(
                step_load(admitting.addresses, hot), settings.search_from, admitting.pids, "capacity", console
            )
        capacity = phases["capacity"]["admitted_per_s"]
        # The admit budget an operator would set from the capacity phase, split between processes; one
        # crowd-lane process per owner, as the chart runs them.
        with admission(broker.bootstrap, processes, capacity / processes, out_dir, processes) as admitting:
            # Rooms of their own: these processes rightly refuse room records signed by the capacity
            # phase's owner, which is not one of their members.
            hot, colds = await make_rooms(admitting.addresses[0], 50, AUTH, TLS)
            await wait_live((*admitting.addresses, *admitting.crowd), [hot, *colds], AUTH, TLS)
            pids = admitting.pids

            def storm(
                hot_addresses: tuple[str, ...], length: float, rate: float = overload * capacity
            ) -> Load:
                return Load(admitting.addresses, hot if rate else None, rate, tuple(colds), cold_rate, length,
                            generators=generators, ghz=ghz_binary, hot_addresses=hot_addresses, auth=AUTH,
                            tls=TLS)  # fmt: skip

            phases["cold"] = await offer(storm((), seconds, 0.0), pids, "cold rooms alone", console)
            phases["storm"] = await offer(storm(admitting.crowd, seconds), pids, "storm", console)
            if settings.one_lane_seconds:
                phases["storm_one_lane"] = await offer(
                    storm((), settings.one_lane_seconds), pids, "storm, one lane", console
                )
            if settings.busy_seconds:
                load = storm((), settings.busy_seconds, 0.0)
                with busy_cores(os.cpu_count() or 1, load.warmup_s + load.seconds + 5.0):
                    phases["cold_busy_cores"] = await offer(load, pids, "cold rooms, busy cores", console)
    finally:
        broker.stop()
    return phases


def targets(phases: dict[str, dict[str, Any]], processes: int) -> dict[str, Any]:
    """The issue's targets as ratios measured in this run."""
    ceiling = phases["ceiling"]["admitted_per_core_s"]
    capacity = phases["capacity"]
    storm, cold = phases["storm"], phases["cold"]
    per_core = capacity["admitted_per_core_s"]

    def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
        return round(a / b, digits) if a and b else None

    result = {
        "unary_ceiling_per_core_s": ceiling,
        "unary_ceiling_per_s": phases["ceiling"]["admitted_per_s"],
        "admitted_per_core_s": per_core,
        "capacity_per_s": capacity["admitted_per_s"],
        "admitted_vs_ceiling": ratio(per_core, ceiling),
        "admitted_vs_ceiling_target": 0.8,
        "storm_admitted_per_core_s": storm["admitted_per_core_s"],
        "cold_p99_ms_alone": cold["cold"]["p99_ms"],
        "cold_p99_ms_storm": storm["cold"]["p99_ms"],
        "cold_p99_storm_vs_alone": ratio(storm["cold"]["p99_ms"], cold["cold"]["p99_ms"], 2),
        "cold_p99_storm_vs_alone_target": 2.0,
        "cold_granted_storm_vs_sent": ratio(storm["cold"].get("granted_per_s"), storm["cold"]["sent_per_s"]),
        "overload_admitted_vs_capacity": ratio(storm["admitted_per_s"], capacity["admitted_per_s"]),
        "overload_admitted_vs_capacity_target": 0.9,
        "storm_shed_rate": round(
            (storm["hot"]["sent_per_s"] - storm["hot"].get("granted_per_s", 0.0))
            / max(1e-9, storm["hot"]["sent_per_s"]),
            3,
        ),
        "admission_processes": processes,
    }
    one_lane = phases.get("storm_one_lane")
    if one_lane:
        result["one_lane_cold_p99_ms"] = one_lane["cold"]["p99_ms"]
        result["one_lane_cold_granted_vs_sent"] = ratio(
            one_lane["cold"].get("granted_per_s"), one_lane["cold"]["sent_per_s"]
        )
        result["one_lane_admitted_vs_capacity"] = ratio(
            one_lane["admitted_per_s"], capacity["admitted_per_s"]
        )
    busy = phases.get("cold_busy_cores")
    if busy:
        result["cold_p99_ms_busy_cores"] = busy["cold"]["p99_ms"]
        result["cold_p99_busy_cores_vs_alone"] = ratio(busy["cold"]["p99_ms"], cold["cold"]["p99_ms"], 2)
    return result


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
    console.print(_steps_table(phases))
    console.print(
        table(f"Join storm ({os.cpu_count()} CPUs, {settings.processes} admission process(es))", phases)
    )
    console.print_json(json.dumps({"jwt_sign_us": report["jwt_sign_us"], **report["targets"]}))
    (out_dir / "joinstorm.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _steps_table(phases: dict[str, dict[str, Any]]) -> Table:
    """The rate searches, one row per step."""
    out = Table(title="Rate search: the best clean step is the ceiling / capacity")
    for heading in ("phase", "offered/s", "served/s", "p99 ms", "server cores", "served/core/s", "clean"):
        out.add_column(heading, justify="left" if heading == "phase" else "right")
    for name in ("ceiling", "capacity"):
        for step in phases[name]["steps"]:
            clean = "yes" if step["clean"] else "no"
            out.add_row(
                name, f"{step['offered_per_s']:,.0f}", f"{step['admitted_per_s']:,.0f}", str(step["p99_ms"]),
                str(step["server_cpu_cores"]), str(step["admitted_per_core_s"]), clean,
            )  # fmt: skip
    return out


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m townhall_tools.bench.join_storm", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".townhall/bench"))
    parser.add_argument("--seconds", type=float, default=60.0, help="cold and storm phases")
    parser.add_argument("--step-seconds", type=float, default=6.0, help="each step of the rate searches")
    parser.add_argument("--search-from", type=float, default=400.0, help="first offered rate of a search")
    parser.add_argument("--one-lane-seconds", type=float, default=20.0, help="storm without the crowd lane")
    parser.add_argument("--busy-seconds", type=float, default=20.0, help="cold rooms with busy cores")
    parser.add_argument("--generators", type=int, default=2, help="Python generator processes (without ghz)")
    parser.add_argument("--processes", type=int, default=1, help="admission processes")
    parser.add_argument(
        "--no-ghz", action="store_true", help="generate with Python processes even if ghz is built"
    )
    args = parser.parse_args()
    binary = None if args.no_ghz else join_load_ghz.find()
    settings = Settings(
        args.seconds, args.step_seconds, args.search_from, generators=args.generators,
        processes=args.processes, ghz=binary, one_lane_seconds=args.one_lane_seconds,
        busy_seconds=args.busy_seconds,
    )  # fmt: skip
    run(args.out, settings)


if __name__ == "__main__":
    main()
