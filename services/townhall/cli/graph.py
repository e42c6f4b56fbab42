"""`townhall graph generate|import`: synthetic follow graphs and bulk import into the notifiers."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from townhall.cli.endpoints import config, internal_address, minting
from townhall.core.config import AuthConfig, TlsConfig
from townhall.core.credentials import operator_credential
from townhall.notifier.graphfile import GraphSpec, ImportResult, import_file, read_pairs, write

console = Console()
IMPORT = "/townhall.v1.Graph/Import"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers `graph generate` and `graph import`."""
    graph = sub.add_parser("graph", help="generate a synthetic follow graph, or import one")
    actions = graph.add_subparsers(dest="action", required=True)
    gen = actions.add_parser("generate", help="write a power-law graph with one celebrity to FILE")
    gen.add_argument("file", type=Path)
    gen.add_argument("--users", type=int, default=GraphSpec.users, help="user id space 1..N")
    gen.add_argument("--celebrity-followers", type=int, default=GraphSpec.celebrity_followers)
    gen.add_argument("--hosts", type=int, default=GraphSpec.hosts, help="ordinary hosts (ids 2..)")
    gen.add_argument("--max-followers", type=int, default=GraphSpec.max_followers)
    gen.add_argument("--seed", type=int, default=GraphSpec.seed)
    imp = actions.add_parser("import", help="stream FILE of (followee, follower) pairs to a notifier")
    imp.add_argument("file", type=Path)
    imp.add_argument(
        "--internal",
        help="the notifier's internal host:port, where Import is served (default: topology.json)",
    )
    imp.add_argument(
        "--member",
        help="the notifier's notifier.advertise, if --internal is another way to reach it (a port-forward)",
    )


def run(args: argparse.Namespace) -> int:
    """Runs `graph generate` or `graph import`."""
    if args.action == "generate":
        if not 1 <= args.celebrity_followers <= args.users or args.hosts < 0 or args.max_followers < 1:
            console.print(
                "[red]need 1 <= --celebrity-followers <= --users, --hosts >= 0, --max-followers >= 1[/red]"
            )
            return 2
        spec = GraphSpec(
            users=args.users,
            celebrity_followers=args.celebrity_followers,
            hosts=args.hosts,
            max_followers=args.max_followers,
            seed=args.seed,
        )
        with console.status(f"writing {args.file}..."):
            edges = write(spec, args.file)
        console.print(f"{edges:,} edges written to {args.file} (celebrity: user {spec.celebrity})")
        return 0
    # Import is an operator's call, served on the notifier's internal port: it takes a service
    # credential (auth.service_keys) for that notifier, not a user token.
    address = args.internal or internal_address(args.root / "topology.json", "notifier")
    settings = config(args.config)
    total = len(read_pairs(args.file))
    result = import_with_progress(
        address, args.file, total, console, minting(args.config), settings.tls, args.member or address
    )
    console.print(
        f"{result.received:,} pairs sent, {result.created:,} new edges, {result.invalid:,} invalid, "
        f"{result.seconds:.1f} s, {result.edges_per_s:,.0f} edges/s"
    )
    return 0


def import_with_progress(
    address: str,
    path: Path,
    total: int,
    console: Console,
    auth: AuthConfig,
    tls: TlsConfig | None = None,
    member: str = "",
) -> ImportResult:
    """Streams a graph file to a notifier's internal port with Graph.Import, with a progress bar."""
    credential = operator_credential(auth).metadata(member or address, IMPORT)
    with Progress(
        TextColumn("import"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("import", total=total)
        progress = lambda n: bar.update(task, completed=n)  # noqa: E731
        return asyncio.run(import_file(address, path, credential, tls, progress))
