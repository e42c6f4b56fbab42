"""The chart on a kind cluster, end to end (`make kind-e2e`; collected only with KIND_E2E=1).

The session fixture brings the cluster up the way a user does, with the make targets (`kind-up`,
`kind-images`, `kind-load`, `deploy`, `kind-prometheus`), each timed; the tests then use it from the host
through kind's port mappings. Every step's time is printed at the end as a table and written to
.townhall/e2e/kind.json. Variables given to `make kind-e2e` (KIND_NODE_IMAGE, PYTHON_IMAGE, ...) reach the
inner make calls through MAKEFLAGS.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.table import Table

from townhall.client import Endpoints
from townhall_tools.devtools.kind import Cluster

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / ".townhall" / "e2e" / "kind.json"
NAMESPACE = os.environ.get("NAMESPACE", "townhall")
RELEASE = os.environ.get("RELEASE", "townhall")
CONTEXT = os.environ.get("KUBE_CONTEXT", "kind-townhall")
MAKE = shlex.split(os.environ.get("KIND_E2E_MAKE", "make --no-print-directory"))
# kind's port mappings (deploy/kind/cluster.yaml).
ADMISSION = "127.0.0.1:30051"
NOTIFIER = "127.0.0.1:30053"
CROWD = "127.0.0.1:30061"
PROMETHEUS = "http://127.0.0.1:30090"
RELAY_PORT_BASE = 30100

console = Console()


@dataclass
class Steps:
    """Each step's time and figures, printed as a table and written as JSON when the session ends."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, step: str, seconds: float, ok: bool, **figures: Any) -> None:
        self.rows.append({"step": step, "seconds": round(seconds, 1), "ok": ok, **figures})

    def make(self, step: str, *targets: str, timeout_s: float = 3600) -> float:
        """Runs make targets (output streamed), records the time; fails the step on a non-zero exit."""
        started = self._begin(step, targets)
        done = subprocess.run([*MAKE, *targets], cwd=REPO, timeout=timeout_s, check=False)
        return self._end(step, targets, done.returncode, started)

    async def amake(self, step: str, *targets: str, timeout_s: float = 1200) -> float:
        """`make` that leaves the event loop running (an audience keeps listening meanwhile)."""
        started = self._begin(step, targets)
        proc = await asyncio.create_subprocess_exec(*MAKE, *targets, cwd=REPO)
        return self._end(step, targets, await asyncio.wait_for(proc.wait(), timeout_s), started)

    def _begin(self, step: str, targets: tuple[str, ...]) -> float:
        console.rule(f"[bold]{step}[/bold]: make {' '.join(targets)}")
        return time.monotonic()

    def _end(self, step: str, targets: tuple[str, ...], code: int, started: float) -> float:
        seconds = time.monotonic() - started
        self.add(step, seconds, code == 0)
        assert code == 0, f"make {' '.join(targets)} exited with {code}"
        return seconds

    def report(self) -> None:
        if not self.rows:
            return
        table = Table(title="kind end to end: steps")
        table.add_column("step")
        table.add_column("s", justify="right")
        table.add_column("ok")
        table.add_column("figures")
        for row in self.rows:
            figures = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("step", "seconds", "ok"))
            table.add_row(
                row["step"], f"{row['seconds']:.1f}", "yes" if row["ok"] else "[red]NO[/red]", figures
            )
        console.print(table)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(
            json.dumps(
                {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": self.rows}, indent=2
            )
        )
        console.print(f"written to {OUT.relative_to(REPO)}")


@pytest.fixture(scope="session")
def steps() -> Iterator[Steps]:
    recorder = Steps()
    try:
        yield recorder
    finally:
        recorder.report()


@pytest.fixture(scope="session")
def deployed(steps: Steps) -> Cluster:
    """The cluster, the images in it, the chart installed with every pod Ready, Prometheus beside it."""
    steps.make("cluster up", "kind-up")
    steps.make("images built", "kind-images")
    steps.make("images loaded", "kind-load")
    steps.make("chart installed, every pod Ready", "deploy")
    steps.make("Prometheus in the cluster", "kind-prometheus")
    return Cluster(CONTEXT)


@pytest.fixture(scope="session")
def endpoints(deployed: Cluster) -> Endpoints:
    """The client APIs through the NodePorts on localhost."""
    return Endpoints(ADMISSION, NOTIFIER, crowd=CROWD)
