"""The tooling's `townhall` commands, registered through the `townhall.commands` entry point
(tools/pyproject.toml): the runtime's CLI lists them only where townhall-tools is installed."""

from __future__ import annotations

import argparse
from pathlib import Path

from townhall.cli.main import DEFAULT_ROOT, Subparsers


def add_commands(sub: Subparsers) -> None:
    """Adds dev, demo, kafka, loadtest, faults, cluster and bench; each sets `run`, what main() calls."""
    dev = sub.add_parser("dev", help="start Kafka and the services locally; Ctrl-C stops them")
    dev.add_argument("--admission", type=int, default=1, help="admission processes")
    dev.add_argument("--relays", type=int, default=1, help="relay processes")
    dev.add_argument("--notifiers", type=int, default=1, help="notifier processes")
    dev.add_argument(
        "--crowd", type=int, default=1, help="admission processes of the crowd lane (own no rooms; 0: none)"
    )
    dev.add_argument("--ports", choices=("fixed", "auto"), default="fixed", help="fixed or free ports")
    dev.add_argument("--run-demo", action="store_true", help="run the demo, stop, exit with its status")
    dev.set_defaults(run=_dev)

    demo = sub.add_parser("demo", help="run the scripted celebrity-room demo against `townhall dev`")
    demo.add_argument("--followers", type=int, default=20, help="followers, all connected to Inbox")
    demo.add_argument("--listeners", type=int, default=20, help="listeners that join and subscribe")
    demo.add_argument("--audio", type=Path, help="audio file to speak (default: a generated voice)")
    demo.set_defaults(run=_demo)

    sub.add_parser("kafka", help="run the local Kafka broker in the foreground").set_defaults(run=_kafka)

    from townhall_tools.cli import faults, hosts, loadtest

    loadtest.add_parser(sub)
    faults.add_parser(sub)
    hosts.add_parser(sub)

    bench = sub.add_parser("bench", help="run the benchmarks; figures on screen, JSON in --out")
    bench.add_argument("--out", type=Path, default=DEFAULT_ROOT / "bench")
    bench.add_argument("--listeners", type=int, nargs="+", default=[100, 500, 1000, 2000])
    bench.add_argument("--seconds", type=float, default=10.0, help="measured seconds per step")
    bench.add_argument("--storm-seconds", type=float, default=60.0, help="join storm: seconds per phase")
    bench.add_argument("--followers", type=int, default=10_000_000, help="notify: the celebrity's followers")
    bench.set_defaults(run=_bench)


def _dev(args: argparse.Namespace) -> int:
    from townhall_tools.cli.dev import run_dev

    return run_dev(args)


def _demo(args: argparse.Namespace) -> int:
    from townhall_tools.cli.demo import run_demo

    manifest = args.root / "topology.json"
    return run_demo(
        manifest, args.followers, args.listeners, args.audio, args.admission, args.notifier, args.crowd,
        args.config,
    )  # fmt: skip


def _kafka(args: argparse.Namespace) -> int:
    from townhall_tools.cli.dev import run_kafka

    return run_kafka(args.root)


def _bench(args: argparse.Namespace) -> int:
    from townhall_tools.cli.bench import run_bench

    return run_bench(args)
