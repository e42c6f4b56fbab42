"""Where the CLI finds the services: flags first, then the local topology.json."""

from __future__ import annotations

from pathlib import Path

from townhall.client import Endpoints
from townhall.devtools.topology import load_manifest


def resolve(
    manifest: Path, admission: str | None = None, notifier: str | None = None, crowd: str | None = None
) -> Endpoints:
    """Endpoints from explicit addresses, else the first process of each service in the manifest."""
    if admission and notifier:
        return Endpoints(admission, notifier, crowd or "")
    services = load_manifest(manifest)["services"]
    owners = [e["grpc"] for e in services["admission"] if not e.get("lane")]
    crowd_lane = [e["grpc"] for e in services["admission"] if e.get("lane") == "crowd"]
    return Endpoints(
        admission or owners[0],
        notifier or services["notifier"][0]["grpc"],
        crowd or (crowd_lane[0] if crowd_lane else ""),
    )
