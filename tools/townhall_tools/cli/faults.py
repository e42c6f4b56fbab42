"""`townhall faults`: run the fault scenarios N times on local topologies; a table, JSON, Markdown."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from townhall.cli.main import Subparsers
from townhall_tools.faults.measure import Outcome
from townhall_tools.faults.runner import SCENARIOS, Report, run_faults, write

console = Console()


def add_parser(sub: Subparsers) -> None:
    """Adds `townhall faults` to the CLI."""
    faults = sub.add_parser(
        "faults", help="kill -9 / SIGTERM processes and restart Kafka under load; measure what users notice"
    )
    faults.add_argument("--runs", type=int, default=1, help="runs of each scenario (1..50)")
    faults.add_argument("--only", nargs="+", choices=SCENARIOS, help="these scenarios only")
    faults.add_argument(
        "--json", type=Path, help="write every figure here (default .townhall/faults/faults.json)"
    )
    faults.add_argument("--markdown", action="store_true", help="print the summary as docs/faults.md's table")
    faults.add_argument("--report", type=Path, help="run nothing: print the tables of a JSON written before")
    faults.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Runs the scenarios; exit 0 only if every run of every scenario passed its checks."""
    if not 1 <= args.runs <= 50:
        console.print("[red]--runs must be within 1..50[/red]")
        return 2

    def show(outcome: Outcome) -> None:
        mark = "[green]ok[/green]" if outcome.ok else f"[red]FAILED[/red] {'; '.join(outcome.problems)}"
        console.print(f"{outcome.scenario}: {mark} {json.dumps(outcome.figures)}")

    if args.report:
        report = Report.load(args.report)
    else:
        report = run_faults(args.root / "faults", args.runs, args.only, show)
    table = Table(title="Faults")
    for column in (
        "scenario",
        "runs",
        "passed",
        "recovery p50/max s",
        "audio gap p50/max ms",
        "lost",
        "errors",
    ):
        table.add_column(column)
    for row in report.summary():
        table.add_row(
            row["scenario"],
            str(row["runs"]),
            str(row["passed"]),
            f"{row['recovery_s_p50']:.2f} / {row['recovery_s_max']:.2f}",
            f"{row['gap_ms_p50']:.0f} / {row['gap_ms_max']:.0f}",
            f"{row['lost']:g}",
            f"{row['errors']:g}",
        )
    console.print(table)
    if args.markdown:
        print(report.markdown())
    if not args.report:
        path = args.json or args.root / "faults" / "faults.json"
        write(report, path)
        console.print(f"figures written to {path}")
    return 0 if all(row["passed"] == row["runs"] for row in report.summary()) else 1
