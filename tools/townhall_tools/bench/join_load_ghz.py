"""Join load from ghz's runner (a compiled gRPC load generator): open loop at a fixed rate, cheap per call.

The generator is deploy/tools/joinload, ghz's runner with a metadata provider that gives every call
a new user and an HS256 user token of its own (ghz 0.93's own command sends one metadata object for
all calls), so a storm is a storm of first joins, each token verified by the server. `make joinload`
builds it into .cache/bin (`make bench` does). One process per room class and address (ghz dials one),
each offering its share of the class's rate; their JSON reports (ghz's: status codes, latency
percentiles, every call) are merged into one per class.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from townhall.core.auth import signing_key
from townhall.core.config import AuthConfig, TlsConfig
from townhall_tools.bench.stats import PerSecond, percentile

PROTO_ROOT = Path(__file__).resolve().parents[3] / "proto"
LOCAL = Path(".cache/bin/joinload")
_CODES = {"OK": "ok", "ResourceExhausted": "shed", "Canceled": "cancelled", "Unavailable": "unavailable"}


# Concurrent calls the generator keeps at most (ghz's workers): what its end can leave in flight.
WORKERS = 50


def find() -> str | None:
    """The joinload binary (.cache/bin first, then PATH), if built."""
    if LOCAL.exists():
        return str(LOCAL.resolve())
    return shutil.which("joinload")


def start(
    binary: str,
    address: str,
    rooms: list[str],
    rate: float,
    seconds: float,
    skip: int,
    out: Path,
    auth: AuthConfig,
    tls: TlsConfig,
    index: int = 0,
) -> subprocess.Popen[bytes]:
    """A generator process offering `rate` joins/s round-robin over `rooms`, each call a new user; `index`
    tells the processes of one load apart (their users are 10**12 ids apart)."""
    data = [{"room_id": r} for r in rooms]
    key = signing_key(auth.keys)
    # Ids different for every run and process.
    first = 10**15 + index * 10**12 + (time.time_ns() // 1000) % 10**11
    if tls.enabled:
        transport = ["-cacert", tls.ca, "-cert", tls.cert, "-cert-key", tls.key]
        transport += ["-cname", tls.server_name] if tls.server_name else []
    else:
        transport = []
    argv = [
        binary, *transport, "-proto", str(PROTO_ROOT / "townhall/v1/admission.proto"),
        "-import-paths", str(PROTO_ROOT), "-d", json.dumps(data if len(data) > 1 else data[0]),
        "-first-user", str(first), "-ttl", f"{int(seconds) + 600}s",
        *(["-iss", auth.issuer] if auth.issuer else []), *(["-aud", auth.audience] if auth.audience else []),
        "-rps", str(int(rate)), "-c", str(WORKERS), "-connections", "4", "-z", f"{seconds}s",
        "-skip-first", str(skip), "-t", "10s", "-o", str(out), address,
    ]  # fmt: skip
    # The key in the environment, not on a command line that `ps` shows.
    env = {**os.environ, "JOINLOAD_KEY": f"{key.kid}={key.secret.decode()}"}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read(out: Path) -> dict[str, Any]:
    """A ghz JSON report."""
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of several processes' (one class's load over several addresses): counts and status
    codes summed, every call kept, p50 and p99 taken from all the calls' latencies."""
    if len(reports) == 1:
        return reports[0]
    codes: dict[str, int] = {}
    for report in reports:
        for code, count in (report.get("statusCodeDistribution") or {}).items():
            codes[code] = codes.get(code, 0) + count
    details = [d for report in reports for d in report.get("details") or []]
    latencies = [d["latency"] for d in details]
    return {
        "count": sum(report.get("count", 0) for report in reports),
        "statusCodeDistribution": codes,
        "latencyDistribution": [
            {"percentage": q, "latency": percentile(latencies, q / 100)} for q in (50, 99) if latencies
        ],
        "details": details,
    }


def _at(detail: dict[str, Any]) -> float:
    """A call's start, Unix seconds (ghz writes Go's RFC 3339 with nanoseconds)."""
    return datetime.fromisoformat(detail["timestamp"]).timestamp()


def first_call(report: dict[str, Any]) -> float | None:
    """When the report's first kept call started, Unix seconds (None without calls)."""
    details = report.get("details") or []
    return min(map(_at, details)) if details else None


def figures(report: dict[str, Any], seconds: float, start: float) -> dict[str, Any]:
    """Rates by outcome, latency percentiles and outcomes per second of `seconds` from `start`, from a
    ghz JSON report."""
    codes: dict[str, int] = report.get("statusCodeDistribution") or {}
    result: dict[str, Any] = {"sent_per_s": round(report.get("count", 0) / seconds, 1), "unsent": 0}
    for code, count in codes.items():
        result[f"{_CODES.get(code, code)}_per_s"] = round(count / seconds, 1)
    # ghz reports OK without telling a grant from a waiting answer; waiting is rare (lease refills).
    result["granted_per_s"] = result.pop("ok_per_s", 0.0)
    latencies = {int(p["percentage"]): p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
    result["p50_ms"] = round(latencies[50], 2) if 50 in latencies else None
    result["p99_ms"] = round(latencies[99], 2) if 99 in latencies else None
    per_second = PerSecond(start, seconds)
    for detail in report.get("details") or []:
        outcome = _CODES.get(detail.get("status", ""), detail.get("status", "unknown"))
        per_second.add(_at(detail), "granted" if outcome == "ok" else outcome)
    result["per_second"] = per_second.counts
    return result
