"""`townhall dev` and `townhall kafka`: the local topology in the foreground."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from townhall_tools.devtools.kafka_broker import Broker
from townhall_tools.devtools.topology import FIXED_KAFKA_PORT, Topology

console = Console(stderr=True)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def run_dev(args: argparse.Namespace) -> int:
    """Starts the topology; runs the demo (--run-demo) or waits for Ctrl-C; stops everything."""
    counts = {"admission": args.admission, "relay": args.relays, "notifier": args.notifiers}
    for name, count in counts.items():
        if not 1 <= count <= 16:
            console.print(f"[red]--{name} must be within 1..16[/red]")
            return 2
    if not 0 <= args.crowd <= 16:
        console.print("[red]--crowd must be within 0..16[/red]")
        return 2
    counts["crowd"] = args.crowd
    topology = Topology(args.root, counts, fixed_ports=args.ports == "fixed")
    with console.status("starting Kafka and the services..."):
        topology.start()
    try:
        _print(topology)
        if args.run_demo:
            from townhall_tools.cli.demo import run_demo

            return run_demo(topology.manifest, followers=20, listeners=20, audio=None)
        console.print("[green]up[/green]: Ctrl-C stops everything. In another shell: make demo")
        _wait_for_signal()
        return 0
    finally:
        with console.status("stopping..."):
            topology.stop()
        console.print("stopped")


def run_kafka(root: Path) -> int:
    """Runs the local broker alone until Ctrl-C."""
    broker = Broker(root / "kafka", port=FIXED_KAFKA_PORT)
    with console.status("starting Kafka..."):
        broker.start()
    console.print(f"Kafka at {broker.bootstrap}; Ctrl-C stops it")
    try:
        _wait_for_signal()
    finally:
        broker.stop()
    return 0


def _print(topology: Topology) -> None:
    table = Table(title=f"Townhall local topology ({topology.manifest})")
    table.add_column("service")
    table.add_column("gRPC")
    table.add_column("metrics")
    table.add_column("pid", justify="right")
    assert topology.broker is not None
    table.add_row(
        "kafka",
        topology.broker.bootstrap,
        "",
        str(topology.broker.process.pid if topology.broker.process else ""),
    )
    for proc in topology.processes:
        info = proc.describe()
        table.add_row(proc.name, proc.grpc, info["metrics"], str(info["pid"]))
    console.print(table)
