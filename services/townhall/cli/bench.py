"""`townhall bench`: the benchmarks, each printing a table and writing JSON to --out."""

from __future__ import annotations

import argparse

from townhall.bench import audience, auth_cost, ghz, joinstorm_bench, notify, relay


def run_bench(args: argparse.Namespace) -> int:
    """Runs the relay fan-out and audience benchmarks (each with its bare-gRPC ceiling in the same run)."""
    relay.run(args.out, args.listeners, args.seconds)
    print(f"JSON written to {args.out}/relay.json")
    # Steps of at most 5 s: the audience bench has a dozen of them (3 chunk intervals).
    audience.run(args.out, seconds=min(args.seconds, 5.0))
    print(f"JSON written to {args.out}/audience.json")
    # What token verification costs per join, with and without the cache.
    auth_cost.run(args.out)
    print(f"JSON written to {args.out}/auth.json")
    # Join storm: ghz generates the load if it is built (.cache/bin), else Python processes.
    joinstorm_bench.run(args.out, joinstorm_bench.Settings(args.storm_seconds, ghz=ghz.find()))
    print(f"JSON written to {args.out}/joinstorm.json")
    # Celebrity notification: 10M followers (--followers) while 100 small hosts start rooms.
    notify.run(args.out, followers=args.followers)
    print(f"JSON written to {args.out}/notify.json")
    return 0
