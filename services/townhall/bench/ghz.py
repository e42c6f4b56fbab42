"""Join load from ghz (a compiled gRPC load generator): open loop at a fixed rate, about 4x cheaper per call.

ghz is built by `make ghz` (deploy/tools/install-ghz.sh) into .cache/bin; `make bench` builds it. With
`--async` and `--rps` it starts calls on schedule without waiting for answers (open loop).
One ghz process per room class; its JSON report gives status codes and latency percentiles.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

PROTO_ROOT = Path(__file__).resolve().parents[3] / "proto"
LOCAL = Path(".cache/bin/ghz")
_CODES = {"OK": "ok", "ResourceExhausted": "shed", "Canceled": "cancelled", "Unavailable": "unavailable"}


def find() -> str | None:
    """The ghz binary (.cache/bin first, then PATH), if built."""
    if LOCAL.exists():
        return str(LOCAL.resolve())
    return shutil.which("ghz")


def start(
    binary: str, address: str, rooms: list[str], rate: float, seconds: float, skip: int, out: Path
) -> subprocess.Popen[bytes]:
    """A ghz process offering `rate` joins/s round-robin over `rooms`, each from a random new user."""
    data = [{"room_id": r} for r in rooms]
    argv = [
        binary, "--insecure", "--proto", str(PROTO_ROOT / "townhall/v1/admission.proto"),
        "--import-paths", str(PROTO_ROOT), "--call", "townhall.v1.Admission.Join",
        "-d", json.dumps(data if len(data) > 1 else data[0]),
        "-m", json.dumps({"townhall-user": "{{randomInt 1 4000000000000}}"}),
        "--async", "--rps", str(int(rate)), "-c", "50", "--connections", "4",
        "-z", f"{seconds}s", "--skipFirst", str(skip), "-t", "10s", "-O", "json", "-o", str(out), address,
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def figures(out: Path, seconds: float) -> dict[str, Any]:
    """Rates by outcome and latency percentiles from a ghz JSON report."""
    report = json.loads(out.read_text())
    codes: dict[str, int] = report.get("statusCodeDistribution") or {}
    result: dict[str, Any] = {"sent_per_s": round(report.get("count", 0) / seconds, 1), "unsent": 0}
    for code, count in codes.items():
        result[f"{_CODES.get(code, code)}_per_s"] = round(count / seconds, 1)
    # ghz reports OK without telling a grant from a waiting answer; waiting is rare (lease refills).
    result["granted_per_s"] = result.pop("ok_per_s", 0.0)
    latencies = {int(p["percentage"]): p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
    result["p50_ms"] = round(latencies[50], 2) if 50 in latencies else None
    result["p99_ms"] = round(latencies[99], 2) if 99 in latencies else None
    return result
