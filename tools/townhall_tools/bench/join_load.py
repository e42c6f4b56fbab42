"""Join storm: open-loop join arrivals from several generator processes, measured against the servers.

`offer` runs one load (a hot room and/or cold rooms at fixed arrival rates) against admission
addresses and returns its figures; `townhall loadtest` uses it against a running topology, and
the benchmark (join_storm.py) runs it in phases against processes it starts itself.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from townhall.client import Client, Endpoints
from townhall.core.auth import HOST, Tokens
from townhall.core.config import DEV_AUTH, AuthConfig, TlsConfig
from townhall_tools.bench import join_generator, join_load_ghz
from townhall_tools.bench.stats import LatencyHistogram, PerSecond

START_DELAY_S = 2.0  # generators spawn and connect before the first arrival


@dataclass(frozen=True)
class Load:
    """What to offer: arrival rates (joins/s) for one hot room and for cold rooms, for `seconds`."""

    addresses: tuple[str, ...]
    hot_room: str | None
    hot_rate: float
    cold_rooms: tuple[str, ...]
    cold_rate: float
    seconds: float
    warmup_s: float = 1.0
    generators: int = 2
    # A ghz binary to generate the load with (one process per room class) instead of Python processes.
    ghz: str | None = None
    # Where the hot room's joins go (admission's crowd lane, as clients that know the room draws a
    # crowd send them); empty: `addresses`, like the cold rooms.
    hot_addresses: tuple[str, ...] = ()
    # The keys and TLS of the servers under test: joiners' tokens are signed with auth.keys[0].
    auth: AuthConfig = DEV_AUTH
    tls: TlsConfig = field(default_factory=TlsConfig)


def _client(address: str, user: int, auth: AuthConfig, tls: TlsConfig, *grants: str) -> Client:
    return Client(Endpoints(address, address, tls), user, Tokens(auth).mint(user, grants))


async def make_rooms(
    address: str, cold: int, auth: AuthConfig, tls: TlsConfig, host: int = 7_000_000
) -> tuple[str, list[str]]:
    """Creates and starts one hot and `cold` cold rooms; returns their ids."""
    client = _client(address, host, auth, tls, HOST)
    try:
        ids = []
        for i in range(cold + 1):
            room = await client.create_room("hot room" if i == 0 else f"cold room {i}")
            await client.start_room(room.room_id)
            ids.append(room.room_id)
        return ids[0], ids[1:]
    finally:
        await client.close()


async def wait_live(
    addresses: Sequence[str],
    room_ids: Sequence[str],
    auth: AuthConfig,
    tls: TlsConfig,
    timeout_s: float = 30.0,
) -> None:
    """Waits until every address admits to every room (replicas caught up)."""
    deadline = time.monotonic() + timeout_s
    for address in addresses:
        client = _client(address, 1, auth, tls)
        try:
            for room_id in room_ids:
                while True:
                    try:
                        room = await client.get_room(room_id)
                        if room.state == 2:
                            break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                    await asyncio.sleep(0.1)
        finally:
            await client.close()


class _LastSeenCpu:
    """CPU seconds used by processes (servers, generators): one that exits keeps its last reading."""

    def __init__(self, processes: Sequence[psutil.Process]) -> None:
        self._processes = list(processes)
        self._seen: dict[int, float] = {}

    def total(self) -> float:
        for p in self._processes:
            try:
                times = p.cpu_times()
                self._seen[p.pid] = times.user + times.system
            except psutil.Error:
                pass
        return sum(self._seen.values())


async def offer(load: Load, server_pids: Sequence[int], name: str, console: Console) -> dict[str, Any]:
    """Runs the load; returns rates by outcome, latencies and CPU figures (server and generator)."""
    if load.ghz:
        return await _offer_ghz(load, server_pids, name, console, load.ghz)
    return await _offer_python(load, server_pids, name, console)


async def _offer_ghz(
    load: Load, server_pids: Sequence[int], name: str, console: Console, binary: str
) -> dict[str, Any]:
    servers = _LastSeenCpu([psutil.Process(pid) for pid in server_pids])
    duration = load.warmup_s + load.seconds
    classes = {"hot": (load.hot_room and [load.hot_room], load.hot_rate)}
    classes["cold"] = (list(load.cold_rooms), load.cold_rate)
    with tempfile.TemporaryDirectory() as tmp:
        # One generator per class and address (ghz dials one), each with its share of the class's rate.
        runs: dict[str, list[tuple[subprocess.Popen[bytes], Path]]] = {}
        for kind, (rooms, rate) in classes.items():
            if rooms and rate > 0:
                addresses = (load.hot_addresses or load.addresses) if kind == "hot" else load.addresses
                share = rate / len(addresses)
                for i, address in enumerate(addresses):
                    out = Path(tmp) / f"{kind}-{i}.json"
                    process = join_load_ghz.start(
                        binary,
                        address,
                        rooms,
                        share,
                        duration,
                        int(share * load.warmup_s),
                        out,
                        load.auth,
                        load.tls,
                        index=len(runs) * 100 + i,
                    )
                    runs.setdefault(kind, []).append((process, out))
        started_all = [p for kind_runs in runs.values() for p, _ in kind_runs]
        # Read every loop turn: a generator that ends before the window's end still counts.
        generators = _LastSeenCpu([psutil.Process(p.pid) for p in started_all])
        cpu: dict[str, float] = {}
        started = time.time()
        columns = (TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(f"{name}: ghz", total=None)
            last_cpu, last_at = servers.total(), started
            while any(p.poll() is None for p in started_all):
                now = time.time()
                generated = generators.total()
                if "start" not in cpu and now >= started + load.warmup_s:
                    cpu["start"], cpu["gen_start"] = servers.total(), generated
                if "end" not in cpu and now >= started + duration:
                    cpu["end"], cpu["gen_end"] = servers.total(), generated
                if now - last_at >= 1.0:
                    used = servers.total()
                    progress.update(
                        task,
                        description=f"{name}: hot {load.hot_rate:,.0f}/s cold {load.cold_rate:,.0f}/s  "
                        f"server {(used - last_cpu) / (now - last_at):.2f} cores  "
                        f"({max(0.0, started + duration - now):.0f} s left)",
                    )
                    last_cpu, last_at = used, now
                await asyncio.sleep(0.1)
        cpu.setdefault("end", servers.total())
        cpu.setdefault("gen_end", generators.total())
        figures = _base_figures(load, cpu, generators="ghz")
        reports = {
            kind: join_load_ghz.merge([join_load_ghz.read(out) for _, out in kind_runs])
            for kind, kind_runs in runs.items()
        }
        # The measured window starts at the first call either generator kept (each skips its warm-up).
        firsts = [t for t in map(join_load_ghz.first_call, reports.values()) if t is not None]
        window = min(firsts, default=started + load.warmup_s)
        empty: dict[str, Any] = {
            "sent_per_s": 0.0,
            "unsent": 0,
            "p50_ms": None,
            "p99_ms": None,
            "per_second": {},
        }
        for kind in ("hot", "cold"):
            report = reports.get(kind)
            figures[kind] = join_load_ghz.figures(report, load.seconds, window) if report else dict(empty)
    return _totals(figures)


async def _offer_python(
    load: Load, server_pids: Sequence[int], name: str, console: Console
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + START_DELAY_S
    workers: list[BaseProcess] = []
    pipes: list[Connection] = []
    n = load.generators
    for index in range(n):
        spec = join_generator.Spec(
            addresses=load.addresses,
            hot_room=load.hot_room,
            hot_rate=load.hot_rate / n,
            cold_rooms=load.cold_rooms or ("none",),
            cold_rate=load.cold_rate / n if load.cold_rooms else 0.0,
            start_at=start_at,
            warmup_s=load.warmup_s,
            seconds=load.seconds,
            first_user=(index + 1) * 10**12 + int(time.time() * 1000) % 10**9 * 1000,
            hot_addresses=load.hot_addresses,
            auth=load.auth,
            tls=load.tls,
        )
        parent, child = context.Pipe()
        worker = context.Process(target=join_generator.main, args=(spec, child), daemon=True)
        worker.start()
        workers.append(worker)
        pipes.append(parent)
    servers = _LastSeenCpu([psutil.Process(pid) for pid in server_pids])
    generators = _LastSeenCpu([psutil.Process(w.pid) for w in workers if w.pid is not None])
    results: list[dict[str, Any] | None] = [None] * n
    latest: list[dict[str, Any]] = [{} for _ in range(n)]
    measure_from, end = start_at + load.warmup_s, start_at + load.warmup_s + load.seconds
    cpu: dict[str, float] = {}
    columns = (TextColumn("{task.description}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(f"{name}: starting", total=None)
            last = (time.time(), 0, 0, 0)
            while any(r is None for r in results):
                for i, pipe in enumerate(pipes):
                    while results[i] is None and pipe.poll():
                        kind, body = pipe.recv()
                        if kind == "result":
                            results[i] = body
                        else:
                            latest[i] = body
                now = time.time()
                if "start" not in cpu and now >= measure_from:
                    cpu["start"], cpu["gen_start"] = servers.total(), generators.total()
                if "end" not in cpu and now >= end:
                    cpu["end"], cpu["gen_end"] = servers.total(), generators.total()
                if now - last[0] >= 1.0:
                    last = _describe(progress, task, name, latest, last, now, end)
                if now > end + join_generator.CALL_TIMEOUT_S + 15:
                    raise TimeoutError(f"{name}: load generators sent no result")
                await asyncio.sleep(0.1)
    finally:
        for proc in workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    return _figures(load, [r for r in results if r is not None], cpu)


def _describe(
    progress: Progress,
    task: Any,
    name: str,
    latest: list[dict[str, Any]],
    last: tuple[float, int, int, int],
    now: float,
    end: float,
) -> tuple[float, int, int, int]:
    """Live rates since the last update: sent, granted and shed per second."""
    sent = sum(c.get("sent", 0) for body in latest for c in body.values())
    granted = sum(c.get("granted", 0) for body in latest for c in body.values())
    shed = sum(c.get("shed", 0) + c.get("waiting", 0) for body in latest for c in body.values())
    dt = max(1e-3, now - last[0])
    rates = [(sent - last[1]) / dt, (granted - last[2]) / dt, (shed - last[3]) / dt]
    left = max(0.0, end - now)
    progress.update(
        task,
        description=f"{name}: sent {rates[0]:,.0f}/s  granted {rates[1]:,.0f}/s  "
        f"shed+waiting {rates[2]:,.0f}/s  ({left:.0f} s left)",
    )
    return now, sent, granted, shed


def _base_figures(load: Load, cpu: dict[str, float], generators: str) -> dict[str, Any]:
    seconds = load.seconds
    return {
        "seconds": seconds,
        "offered_hot_per_s": load.hot_rate if load.hot_room else 0.0,
        "offered_cold_per_s": load.cold_rate if load.cold_rooms else 0.0,
        "cold_rooms": len(load.cold_rooms),
        "server_cpu_cores": round((cpu.get("end", 0.0) - cpu.get("start", 0.0)) / seconds, 3),
        "generator_cpu_cores": round((cpu.get("gen_end", 0.0) - cpu.get("gen_start", 0.0)) / seconds, 3),
        "generator": generators,
    }


def _totals(figures: dict[str, Any]) -> dict[str, Any]:
    cores = figures["server_cpu_cores"]
    admitted = sum(figures[k].get("granted_per_s", 0.0) for k in ("hot", "cold"))
    figures["admitted_per_s"] = round(admitted, 1)
    figures["admitted_per_core_s"] = round(admitted / cores, 1) if cores > 0 else None
    return figures


def _figures(load: Load, results: list[dict[str, Any]], cpu: dict[str, float]) -> dict[str, Any]:
    figures = _base_figures(load, cpu, generators=f"{load.generators} python processes")
    for kind in ("hot", "cold"):
        latency = LatencyHistogram()
        per_second = PerSecond(0.0, load.seconds)
        outcomes: dict[str, int] = {}
        sent = unsent = 0
        for result in results:
            one = result[kind]
            sent += one["sent"]
            unsent += one["unsent"]
            latency.merge(one["latency"])
            per_second.merge(one["per_second"])
            for outcome, count in one["outcomes"].items():
                outcomes[outcome] = outcomes.get(outcome, 0) + count
        figures[kind] = {
            "sent_per_s": round(sent / load.seconds, 1),
            "unsent": unsent,
            **{f"{o.lower()}_per_s": round(c / load.seconds, 1) for o, c in sorted(outcomes.items())},
            "p50_ms": latency.percentile_ms(0.50),
            "p99_ms": latency.percentile_ms(0.99),
            "per_second": per_second.counts,
        }
    return _totals(figures)


def table(title: str, phases: dict[str, dict[str, Any]]) -> Table:
    """One row per phase and room class."""
    out = Table(title=title)
    headings = [
        "phase", "class", "offered/s", "sent/s", "granted/s", "waiting/s", "shed/s", "errors/s",
        "p50 ms", "p99 ms", "server cores", "admitted/core/s", "gen cores",
    ]  # fmt: skip
    for heading in headings:
        out.add_column(heading, justify="left" if heading in ("phase", "class") else "right")
    for name, f in phases.items():
        for kind in ("hot", "cold"):
            c = f[kind]
            if not c["sent_per_s"]:
                continue
            errors = sum(v for k, v in c.items() if k.endswith("_per_s") and k[:-6] not in _KNOWN)
            row = [
                name, kind, f"offered_{kind}_per_s", c["sent_per_s"], c.get("granted_per_s", 0),
                c.get("waiting_per_s", 0), c.get("shed_per_s", 0), round(errors, 1), c["p50_ms"], c["p99_ms"],
                f["server_cpu_cores"], f["admitted_per_core_s"], f["generator_cpu_cores"],
            ]  # fmt: skip
            row[2] = f[row[2]]
            out.add_row(*("-" if v is None else str(v) for v in row))
    return out


_KNOWN = {"sent", "granted", "waiting", "shed"}  # the rest (cancelled, unavailable, ...) are errors
