"""The multi-host topology end to end (`make cluster-e2e`; collected only with HOSTS_E2E=1).

The session fixture brings the topology up the way a user does (`make cluster-up`, which builds the images)
and removes it at the end (`make cluster-down`), whatever happened. Variables given to `make cluster-e2e`
(PYTHON_IMAGE, JAVA_IMAGE, ...) reach the inner make calls through MAKEFLAGS.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from townhall_tools.hosts.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
MAKE = shlex.split(os.environ.get("HOSTS_E2E_MAKE", "make --no-print-directory"))
ROOT = REPO / ".townhall" / "hosts"


def make(*targets: str, timeout_s: float = 1800) -> None:
    """Runs make targets (output streamed); fails the test on a non-zero exit."""
    done = subprocess.run([*MAKE, *targets], cwd=REPO, timeout=timeout_s, check=False)
    assert done.returncode == 0, f"make {' '.join(targets)} exited with {done.returncode}"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The running topology (make cluster-up); make cluster-down afterwards."""
    try:
        make("cluster-up")
        image = subprocess.run(
            [*MAKE, "-s", "print-hosts-images"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
        yield Cluster(ROOT, *image)
    finally:
        make("cluster-down", timeout_s=300)
