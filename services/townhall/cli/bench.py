"""`townhall bench`: the benchmarks, each printing a table and writing JSON to --out."""

from __future__ import annotations

import argparse

from townhall.bench import relay


def run_bench(args: argparse.Namespace) -> int:
    """Runs the relay fan-out benchmark (with its bare-gRPC ceiling in the same run)."""
    relay.run(args.out, args.listeners, args.seconds)
    print(f"JSON written to {args.out}/relay.json")
    return 0
