"""`townhall cluster`: the multi-host topology in containers (up, down, status) and its partition faults."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from townhall.cli.main import Subparsers

console = Console(stderr=True)


def add_parser(sub: Subparsers) -> None:
    """Adds `townhall cluster` to the CLI."""
    cluster = sub.add_parser(
        "cluster", help="Townhall on many hosts: every process in a container of its own (docs/hosts.md)"
    )
    cluster.add_argument("action", choices=("up", "down", "status", "faults", "scale", "isolation"))
    cluster.add_argument("--image", default="townhall:0.1.0", help="the Townhall image (make image)")
    cluster.add_argument(
        "--kafka-image", default="townhall-kafka:3.9.1", help="the broker image (make kafka-image)"
    )
    cluster.add_argument("--timeout-s", type=float, default=300.0, help="up: seconds for everything to serve")
    cluster.add_argument("--runs", type=int, default=5, help="faults: runs of each scenario (1..20)")
    cluster.add_argument("--only", nargs="+", help="faults: these scenarios only")
    cluster.add_argument(
        "--json", type=Path, help="faults: where the figures go (default <root>/hosts/faults.json)"
    )
    cluster.add_argument(
        "--steps",
        type=int,
        nargs="*",
        default=[1, 2, 4],
        help="scale: admission processes of each step (none: skip the admission half)",
    )
    cluster.add_argument(
        "--edges",
        type=int,
        nargs="*",
        default=[1, 2, 4],
        help="scale: edge relays of each step (none: skip the relay half)",
    )
    cluster.add_argument(
        "--listeners",
        type=int,
        nargs="+",
        default=[50, 100, 150, 175, 200, 225, 250, 300, 400, 600],
        help="scale: listeners per edge of each rising step, until one misses the bar",
    )
    cluster.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="scale: joins/s per admission process the rate search starts from (open loop, rising x1.2)",
    )
    cluster.add_argument(
        "--quota",
        type=float,
        default=0.2,
        help="scale: CPU quota (cores) of every admission process in its curve",
    )
    cluster.add_argument(
        "--relay-quota",
        type=float,
        default=0.1,
        help="scale: CPU quota (cores) of every relay in its curve (the listeners' generator is on the host)",
    )
    cluster.add_argument(
        "--seconds", type=float, default=20.0, help="scale, isolation: measured seconds per step or phase"
    )
    cluster.add_argument("--hot-rate", type=float, default=2000.0, help="isolation: the storm's joins/s")
    cluster.add_argument("--cold-rate", type=float, default=100.0, help="isolation: cold rooms' joins/s")
    cluster.add_argument(
        "--out", type=Path, help="scale, isolation: JSON (and PNG) folder (default <root>/bench)"
    )
    cluster.add_argument(
        "--halves",
        nargs="+",
        choices=("joins", "notifications"),
        default=["joins", "notifications"],
        help="isolation: which halves to run",
    )
    cluster.add_argument(
        "--lean",
        action="store_true",
        help="isolation: each half on a topology of only the processes it uses (replaces a running one)",
    )
    cluster.add_argument(
        "--followers", type=int, default=10_000_000, help="isolation: the celebrity's followers"
    )
    cluster.add_argument(
        "--small-hosts",
        type=int,
        default=100,
        help="isolation: small hosts starting rooms (2 Inbox streams each)",
    )
    cluster.add_argument(
        "--window", type=float, default=10.0, help="isolation: seconds over which the small hosts start rooms"
    )
    cluster.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Runs one action; `up` leaves the containers running, `down` removes them."""
    from townhall_tools.hosts.cluster import Cluster, ClusterError

    root: Path = args.root / "hosts"
    cluster = Cluster(root, args.image, args.kafka_image)
    if args.action == "down":
        console.print(f"removed {cluster.down()} containers")
        return 0
    if args.action == "status":
        table = Table(title=f"Townhall hosts ({cluster.manifest})")
        for column in ("container", "address", "client (host)", "running"):
            table.add_column(column)
        for host in cluster.hosts:
            published = host.grpc if host.published else ""
            table.add_row(host.name, host.ip, published, "yes" if cluster.running(host) else "no")
        console.print(table)
        return 0
    if args.action == "up":
        try:
            with console.status("starting 3 brokers and the services, each in its container..."):
                cluster.up(args.timeout_s)
        except ClusterError as exc:
            console.print(f"[red]cluster up failed[/red]: {exc}")
            return 1
        console.print(json.dumps(cluster.describe()["services"], indent=1))
        console.print(
            f"[green]up[/green]: townhall --root {root} --config {root / 'client.toml'} demo "
            "(or loadtest); make cluster-down removes it"
        )
        return 0
    if args.action == "isolation":
        from townhall_tools.hosts import isolation

        if not args.lean and not cluster.manifest.exists():
            console.print("[red]the topology is not up: make cluster-up (or --lean)[/red]")
            return 2
        out = args.out or args.root / "bench"
        sizes = isolation.Notifications(args.followers, args.small_hosts, args.window)
        try:
            report = isolation.run(
                cluster,
                args.hot_rate,
                args.cold_rate,
                args.seconds,
                out,
                tuple(args.halves),
                sizes,
                lean=args.lean,
            )
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            return 2
        if "joins" in report:
            j = report["joins"]
            console.print(
                f"cold rooms' join p99: {j['cold_p99_ms_alone']} ms alone, {j['cold_p99_ms_storm']} ms "
                f"during the storm: x{j['ratio']} (bound x{j['bound']})"
            )
        if "notifications" in report:
            n = report["notifications"]
            console.print(
                f"small hosts' notification p99: {n['p99_s_alone']} s alone, {n['p99_s_during']} s during "
                f"the {n['followers']:,}-follower fan-out ({n['during']['fanout_s']} s), bound {n['bound_s']}"
            )
        console.print(f"{out}/isolation.json")
        return 0 if all(report[half]["within_bound"] for half in args.halves) else 1
    if args.action == "scale":
        from townhall_tools.hosts import scale

        out = args.out or args.root / "bench"
        try:
            report = scale.run(
                root,
                args.image,
                args.kafka_image,
                args.steps,
                args.rate,
                args.seconds,
                out,
                edges=args.edges,
                listeners_per_edge=args.listeners,
                quota=args.quota,
                relay_quota=args.relay_quota,
            )
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            return 2
        for point in report.get("points", []) if args.steps else []:
            console.print(
                f"admission x{point['admission']}: {point['admitted_per_s']} joins/s, "
                f"p99 {point['p99_ms']} ms, efficiency {point['efficiency']}"
            )
        for point in report["relays"]["points"] if args.edges else []:
            console.print(
                f"relays x{point['edges']}: {point['served']} listeners served, "
                f"{point['delivered_per_s']} chunks/s, p99 {point['latency_p99_ms']} ms, "
                f"efficiency {point['efficiency']}"
                + (" (the steps ran out first)" if point["limited_by_steps"] else "")
            )
        console.print(f"figures and plot written to {out}/scaleout.json, scaleout.png")
        return 0
    from townhall_tools.hosts.faults import run_cli

    return run_cli(cluster, args)
