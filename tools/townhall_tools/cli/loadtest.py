"""`townhall loadtest`: open-loop join arrivals against a running topology; live progress, table, JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from townhall.cli.endpoints import config, load_manifest, minting
from townhall.cli.main import Subparsers
from townhall_tools.bench import join_load_ghz
from townhall_tools.bench.join_load import Load, make_rooms, offer, table, wait_live

console = Console() if Console().is_terminal else Console(width=160)


def add_parser(sub: Subparsers) -> None:
    """Registers the `loadtest` command."""
    p = sub.add_parser("loadtest", help="offer joins at fixed arrival rates (open loop) and measure them")
    p.add_argument("--hot-rate", type=float, default=2000.0, help="joins/s offered to one hot room")
    p.add_argument("--cold-rate", type=float, default=100.0, help="joins/s offered to the cold rooms in all")
    p.add_argument("--cold-rooms", type=int, default=50, help="cold rooms")
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds (after 1 s of warm-up)")
    p.add_argument("--generators", type=int, default=2, help="generator processes (Python generator)")
    p.add_argument(
        "--ghz",
        action="store_true",
        help="generate with ghz's runner (.cache/bin/joinload) instead of Python",
    )
    p.add_argument(
        "--hot-lane",
        choices=("crowd", "main"),
        default="crowd",
        help="where the hot room's joins go: the crowd lane (as clients that know the room draws a crowd "
        "send them; the main port if the topology has no crowd lane) or the main port",
    )
    p.add_argument("--json", type=Path, help="write the figures to this file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Creates the rooms, offers the load to every admission process, prints and writes the figures."""
    manifest = args.root / "topology.json"
    if args.admission:
        addresses, crowd, pids = [args.admission], [args.crowd] if args.crowd else [], []
    else:
        entries = load_manifest(manifest)["services"]["admission"]
        addresses = [e["grpc"] for e in entries if not e.get("lane")]
        crowd = [e["grpc"] for e in entries if e.get("lane") == "crowd"]
        pids = [e["pid"] for e in entries if e.get("pid")]
    hot_addresses = tuple(crowd) if args.hot_lane == "crowd" else ()
    binary = join_load_ghz.find() if args.ghz else None
    if args.ghz and binary is None:
        console.print("[red]joinload not found: build it with `make joinload` (into .cache/bin)[/red]")
        return 2

    auth, tls = minting(args.config), config(args.config).tls

    async def main() -> dict[str, Any]:
        hot, colds = await make_rooms(addresses[0], args.cold_rooms, auth, tls)
        await wait_live(addresses, [hot, *colds], auth, tls)
        load = Load(
            tuple(addresses), hot if args.hot_rate > 0 else None, args.hot_rate, tuple(colds),
            args.cold_rate, args.seconds, generators=args.generators, ghz=binary, hot_addresses=hot_addresses,
            auth=auth, tls=tls,
        )  # fmt: skip
        return await offer(load, pids, "loadtest", console)

    figures = asyncio.run(main())
    console.print(
        table(f"townhall loadtest against {len(addresses)} admission process(es)", {"load": figures})
    )
    if not pids:
        console.print("server CPU unknown (no pids: pass a topology from `townhall dev`)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        console.print(f"JSON written to {args.json}")
    return 0
