"""`townhall bench`: the benchmarks, each printing a table and writing JSON and a PNG plot to --out."""

from __future__ import annotations

import argparse
from pathlib import Path

from townhall_tools.bench import audience, auth_cost, join_load_ghz, join_storm, notify, plots, relay, watch


def _written(out: Path, name: str) -> None:
    """Says where the bench's JSON is, and draws its plot beside it."""
    print(f"JSON written to {out}/{name}.json")
    print(f"plot written to {plots.write(out, name)}")


def run_bench(args: argparse.Namespace) -> int:
    """Runs the relay fan-out and audience benchmarks (each with its bare-gRPC ceiling in the same run)."""
    relay.run(args.out, args.listeners, args.seconds)
    _written(args.out, "relay")
    # Steps of at most 5 s: the audience bench has a dozen of them (3 chunk intervals).
    audience.run(args.out, seconds=min(args.seconds, 5.0))
    _written(args.out, "audience")
    # WatchRoom: updates per admission core, and the audience's listeners per core with one watch each.
    watch.run(args.out, seconds=min(args.seconds, 5.0))
    print(f"JSON written to {args.out}/watch.json")
    # What token verification costs per join, with and without the cache.
    auth_cost.run(args.out)
    print(f"JSON written to {args.out}/auth.json")
    # Join storm: ghz generates the load if it is built (.cache/bin), else Python processes.
    join_storm.run(args.out, join_storm.Settings(args.storm_seconds, ghz=join_load_ghz.find()))
    _written(args.out, "joinstorm")
    # Celebrity notification: 10M followers (--followers) while 100 small hosts start rooms.
    notify.run(args.out, followers=args.followers)
    _written(args.out, "notify")
    return 0
