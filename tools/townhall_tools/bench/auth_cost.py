"""What authentication costs on the join path: token verification with and without the cache.

In this process: microseconds to verify a user token with PyJWT (a cache miss) and to answer it from
the cache (a hit), and to mint one. Then a real admission process on its own Kafka broker, driven by
joins from this process: server CPU per join (i) for users whose tokens it has seen (a client that
retries, leaves and joins again, re-opens the app) with the cache on, (ii) the same with the cache off
(auth.cache_size 0), (iii) for a new user with a new token on every join (a storm of first joins: a
cache miss each time, whatever the cache). Joins are re-joins of admitted listeners in (i) and (ii), so
they differ only in verification. Figures are per process CPU; the machine is noisy: compare one run.

Three runs on the 2-core development machine (shared, load 2 to 12): PyJWT verify 125-166 us, a
cache hit 1.3-2.6 us (metadata scan included); server CPU per join 725-792 us with seen tokens and
the cache on, 900-1045 us with it off (the cache saves 175-304 us a join), 945-1071 us for a new
user on every join.

`python -m townhall_tools.bench.auth_cost --joins 20000` or `run(...)` from `townhall bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
from rich.console import Console
from rich.table import Table

from townhall.core.auth import SUBSCRIBE, Authenticator, Tokens, bearer
from townhall.core.channels import channel
from townhall.core.config import DEV_AUTH, DEV_ENV, KafkaConfig, TlsConfig, load
from townhall.core.kafka import ensure_topics
from townhall.core.tickets import REQUIRED_CLAIMS as TICKET_CLAIMS
from townhall.core.tickets import TicketSigner, TicketVerifier
from townhall.core.tokens import KeyRing, SigningKey, Verifier
from townhall.v1.admission_pb2 import JoinRequest
from townhall.v1.common_pb2 import Role
from townhall_tools.bench.join_load import make_rooms, wait_live
from townhall_tools.bench.join_storm import admission
from townhall_tools.devtools.kafka_broker import Broker, free_port

JOIN = "/townhall.v1.Admission/Join"
HS_SECRET = "a-ticket-secret-of-the-old-hs256-kind-0123"
CONCURRENCY = 32
POOL = 2000  # users whose tokens repeat in the seen-token phases


def micro(samples: int = 20_000) -> dict[str, float]:
    """Microseconds per operation in this process: verify (miss), verify (hit), mint."""
    tokens = Tokens(DEV_AUTH)
    cold = Authenticator(dataclasses.replace(DEV_AUTH, cache_size=0))
    warm = Authenticator(DEV_AUTH)
    metadata = [bearer(tokens.mint(i + 1, (SUBSCRIBE,))) for i in range(samples)]
    for md in metadata:
        warm.principal(md)
    miss = timeit.timeit(lambda: [cold.principal(md) for md in metadata], number=1) / samples
    hit = timeit.timeit(lambda: [warm.principal(md) for md in metadata], number=1) / samples
    minted = timeit.timeit(lambda: [tokens.mint(i + 1, (SUBSCRIBE,)) for i in range(samples)], number=1)
    return {
        "verify_miss_us": round(miss * 1e6, 2),
        "verify_hit_us": round(hit * 1e6, 2),
        "mint_us": round(minted / samples * 1e6, 2),
    }


def tickets(samples: int = 5_000) -> dict[str, float]:
    """Microseconds to issue and sign one listener ticket (the join path) and to verify one (a relay,
    per stream open): ES256 as now, against HS256 as tickets were signed before, with the same
    claims and the same code around the signature."""
    config = load(env=DEV_ENV).tickets
    es = TicketSigner.from_config(config)
    hs = TicketSigner.from_config(config)
    hs._key = SigningKey("hs", HS_SECRET)  # type: ignore[assignment]  # the HS256 signer tickets had
    relay = "10.0.0.3:50052"
    path = ("10.0.0.1:50072",)
    es_verifier = TicketVerifier.from_config(config)
    hs_verifier = Verifier(
        "ticket", KeyRing([("hs", HS_SECRET)]), lambda claims: claims, require=TICKET_CLAIMS, audience=relay
    )
    figures: dict[str, float] = {}
    verifiers: dict[str, Callable[[str], object]] = {
        "es256": lambda token: es_verifier.verify(token, relay),
        "hs256": hs_verifier.verify,
    }
    for name, signer in (("es256", es), ("hs256", hs)):
        start = time.perf_counter()
        made = [
            signer.sign(signer.issue("r" * 16, i + 1, Role.ROLE_LISTENER, relay, upstream=path))
            for i in range(samples)
        ]
        signed = time.perf_counter() - start
        verify = verifiers[name]
        start = time.perf_counter()
        for token in made:
            verify(token)
        verified = time.perf_counter() - start
        figures[f"ticket_sign_{name}_us"] = round(signed / samples * 1e6, 2)
        figures[f"ticket_verify_{name}_us"] = round(verified / samples * 1e6, 2)
    return figures


async def _drive(address: str, room: str, metadata: list[Any], joins: int) -> int:
    """Sends `joins` Join calls, CONCURRENCY at a time, cycling through `metadata`; returns the OKs."""
    request = JoinRequest(room_id=room).SerializeToString()
    ok = 0
    async with channel(address, TlsConfig()) as ch:
        call = ch.unary_unary(JOIN)
        queue = iter(range(joins))

        async def worker() -> None:
            nonlocal ok
            for i in queue:
                try:
                    await call(request, metadata=metadata[i % len(metadata)], timeout=10)
                    ok += 1
                except grpc.aio.AioRpcError:
                    pass

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return ok


async def _phase(address: str, pid: int, room: str, metadata: list[Any], joins: int) -> dict[str, Any]:
    process = psutil.Process(pid)
    await _drive(address, room, metadata[: min(len(metadata), 500)], 500)  # warm up (and fill the cache)
    before, started = process.cpu_times(), time.perf_counter()
    ok = await _drive(address, room, metadata, joins)
    after, wall = process.cpu_times(), time.perf_counter() - started
    cpu = after.user + after.system - before.user - before.system
    return {
        "joins": joins,
        "ok": ok,
        "server_cpu_us_per_join": round(cpu / max(1, ok) * 1e6, 1),
        "joins_per_s": round(ok / wall, 1),
    }


async def _server_phases(out_dir: Path, joins: int) -> dict[str, Any]:
    broker = Broker(out_dir / "auth-kafka", port=free_port())
    broker.start()
    auth, tls = DEV_AUTH, TlsConfig()
    tokens = Tokens(auth)
    seen = [bearer(tokens.mint(10**12 + i, (SUBSCRIBE,))) for i in range(POOL)]
    phases: dict[str, Any] = {}
    try:
        await ensure_topics(KafkaConfig(bootstrap=broker.bootstrap))
        for name, cache in (("seen_tokens_cache_on", "100000"), ("seen_tokens_cache_off", "0")):
            extra = {"TOWNHALL_AUTH_CACHE_SIZE": cache}
            with admission(broker.bootstrap, 1, 0.0, out_dir, extra=extra) as admitting:
                (address,), (pid,) = admitting.addresses, admitting.pids
                room, _ = await make_rooms(address, 0, auth, tls)
                await wait_live([address], [room], auth, tls)
                phases[name] = await _phase(address, pid, room, seen, joins)
                if name == "seen_tokens_cache_on":
                    # Every join from a new user (new token): what a storm of first joins costs.
                    fresh = [bearer(tokens.mint(2 * 10**12 + i, (SUBSCRIBE,))) for i in range(joins + 500)]
                    phases["new_users_cache_on"] = await _phase(address, pid, room, fresh, joins)
    finally:
        broker.stop()
    return phases


def run(out_dir: Path, joins: int = 20_000) -> dict[str, Any]:
    """Runs both parts, prints a table, writes out_dir/auth.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console() if Console().is_terminal else Console(width=160)
    figures = {**micro(), **tickets()}
    phases = asyncio.run(_server_phases(out_dir, joins))
    on, off = phases["seen_tokens_cache_on"], phases["seen_tokens_cache_off"]
    report = {
        "benchmark": "auth",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "grpcio": grpc.__version__},
        "micro": figures,
        "phases": phases,
        "cache_saves_us_per_join": round(off["server_cpu_us_per_join"] - on["server_cpu_us_per_join"], 1),
    }
    table = Table(title="Token verification on the join path")
    for heading in ("figure", "value"):
        table.add_column(heading, justify="left" if heading == "figure" else "right")
    for key, value in figures.items():
        table.add_row(key, str(value))
    for name, phase in phases.items():
        table.add_row(f"{name}: server CPU us/join", str(phase["server_cpu_us_per_join"]))
        table.add_row(f"{name}: joins/s", str(phase["joins_per_s"]))
    table.add_row("cache saves (us/join)", str(report["cache_saves_us_per_join"]))
    console.print(table)
    (out_dir / "auth.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m townhall_tools.bench.auth_cost", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".townhall/bench"))
    parser.add_argument("--joins", type=int, default=20_000)
    args = parser.parse_args()
    run(args.out, args.joins)


if __name__ == "__main__":
    main()
