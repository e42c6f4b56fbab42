"""Where the CLI finds the services: flags first, then the local topology.json."""

from __future__ import annotations

from pathlib import Path

from townhall.client import Endpoints
from townhall.devtools.topology import load_manifest


def resolve(manifest: Path, admission: str | None = None, notifier: str | None = None) -> Endpoints:
    """Endpoints from explicit addresses, else the manifest: every admission process (the client
    moves to another when one stops) and the first notifier."""
    if admission and notifier:
        return Endpoints(admission, notifier)
    services = load_manifest(manifest)["services"]
    return Endpoints(
        admission or ",".join(p["grpc"] for p in services["admission"]),
        notifier or services["notifier"][0]["grpc"],
    )
