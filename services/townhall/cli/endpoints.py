"""What the CLI connects with: its config (keys and TLS, as the services read theirs), then where the
services are (flags first, then the local topology.json)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from townhall.client import Endpoints
from townhall.core.auth import Tokens
from townhall.core.config import DEV_AUTH, AuthConfig, Config, ConfigError, load

_loaded: dict[str, Config] = {}


def config(path: str | Path | None = None) -> Config:
    """The config (--config, else $TOWNHALL_CONFIG, defaults and TOWNHALL_* variables); exits 2 if bad."""
    key = str(path or "")
    if key not in _loaded:
        try:
            _loaded[key] = load(path)
        except ConfigError as exc:
            print(f"townhall: configuration error: {exc}", file=sys.stderr)
            raise SystemExit(2) from exc
    return _loaded[key]


def minting(path: str | Path | None = None) -> AuthConfig:
    """[auth] as the CLI signs with it (user tokens, an operator's import): the configured keys (the
    first entry of auth.keys, auth.service_keys), else the development keys, which `townhall dev`'s
    processes accept and no other process does unless it is given them."""
    auth = config(path).auth
    return dataclasses.replace(
        auth, keys=auth.keys or DEV_AUTH.keys, service_keys=auth.service_keys or DEV_AUTH.service_keys
    )


def tokens(path: str | Path | None = None, ttl_s: float = 3600) -> Tokens:
    """Mints user tokens (see `minting`)."""
    try:
        return Tokens(minting(path), ttl_s)
    except ConfigError as exc:
        print(f"townhall: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def resolve(
    manifest: Path,
    admission: str | None = None,
    notifier: str | None = None,
    path: str | Path | None = None,
    crowd: str | None = None,
) -> Endpoints:
    """Endpoints from explicit addresses, else the manifest: every admission owner (the client moves to
    another when one stops), the first crowd-lane process and the first notifier."""
    tls = config(path).tls
    if admission and notifier:
        return Endpoints(admission, notifier, tls, crowd or "")
    services = load_manifest(manifest)["services"]
    owners = [e["grpc"] for e in services["admission"] if not e.get("lane")]
    crowd_lane = [e["grpc"] for e in services["admission"] if e.get("lane") == "crowd"]
    return Endpoints(
        admission or ",".join(owners),
        notifier or services["notifier"][0]["grpc"],
        tls,
        crowd or (crowd_lane[0] if crowd_lane else ""),
    )


def internal_address(manifest: Path, service: str) -> str:
    """The internal host:port of the first process of `service` in the local topology."""
    return str(load_manifest(manifest)["services"][service][0]["internal"])


def load_manifest(path: Path) -> dict[str, Any]:
    """A topology.json written by `townhall dev`, or a clear error if there is none."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: start the topology with `make dev` (townhall dev)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data
