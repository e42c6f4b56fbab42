"""Join load from ghz (a compiled gRPC load generator): open loop at a fixed rate, about 4x cheaper per call.

ghz is built by `make ghz` (deploy/tools/install-ghz.sh) into .cache/bin; `make bench` builds it. With
`--async` and `--rps` it starts calls on schedule without waiting for answers (open loop).
One ghz process per room class; its JSON report gives status codes and latency percentiles.

Every call carries a user token. ghz 0.93 (the version the Go module proxy serves) sends one metadata
object for all calls and cannot pick from an array, so the pool of pre-minted tokens is written into
its metadata template, which picks one at random per call. ghz parses that template on every call:
measured here, 0.3 ms of ghz CPU per call with a single token, 1 ms with 256 (linear in the pool), so
the pool is small (POOL_USERS). A storm from ghz is therefore a storm of retries by few users; the
Python generator (joingen.py) sends a new user with its own token on every call.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from townhall.core.auth import SUBSCRIBE, Tokens
from townhall.core.config import AuthConfig, TlsConfig

PROTO_ROOT = Path(__file__).resolve().parents[3] / "proto"
LOCAL = Path(".cache/bin/ghz")
_CODES = {"OK": "ok", "ResourceExhausted": "shed", "Canceled": "cancelled", "Unavailable": "unavailable"}
# Users (tokens) one ghz process calls as; see the module docstring for why so few.
POOL_USERS = 64


def find() -> str | None:
    """The ghz binary (.cache/bin first, then PATH), if built."""
    if LOCAL.exists():
        return str(LOCAL.resolve())
    return shutil.which("ghz")


def token_template(tokens: list[str]) -> str:
    """A ghz metadata template whose every call carries one of `tokens` (same length), chosen at random.

    Go's text/template has no arithmetic: the start of token r in the concatenated pool is the length of
    r copies of a token-long string (printf repeats an argument by index), its end one token further.
    """
    width = len(tokens[0])
    assert all(len(t) == width for t in tokens), "tokens of one pool have the same length"
    repeat = "%[1]s" * width
    pick = f'{{{{$r := slice "{"r" * len(tokens)}" 0 (randomInt 0 {len(tokens)})}}}}'
    start = f'(len (printf "{repeat}" $r))'
    end = f'(len (printf "{repeat}%[2]s" $r "{"w" * width}"))'
    return '{"authorization":"Bearer ' + pick + '{{slice "' + "".join(tokens) + f'" {start} {end}}}}}"}}'


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
) -> subprocess.Popen[bytes]:
    """A ghz process offering `rate` joins/s round-robin over `rooms`, each from one of POOL_USERS users."""
    data = [{"room_id": r} for r in rooms]
    # Ids of one width (so are the tokens), different for every run and process.
    first = 10**15 + (time.time_ns() // 1000) % 10**14
    tokens = Tokens(auth, ttl_s=seconds + 600)
    pool = [tokens.mint(first + i, (SUBSCRIBE,)) for i in range(POOL_USERS)]
    metadata = out.with_suffix(".metadata.json")
    metadata.write_text(token_template(pool))
    if tls.enabled:
        transport = ["--cacert", tls.ca, "--cert", tls.cert, "--key", tls.key]
        transport += ["--cname", tls.server_name] if tls.server_name else []
    else:
        transport = ["--insecure"]
    argv = [
        binary, *transport, "--proto", str(PROTO_ROOT / "townhall/v1/admission.proto"),
        "--import-paths", str(PROTO_ROOT), "--call", "townhall.v1.Admission.Join",
        "-d", json.dumps(data if len(data) > 1 else data[0]), "-M", str(metadata),
        "--async", "--rps", str(int(rate)), "-c", "50", "--connections", "4",
        "-z", f"{seconds}s", "--skipFirst", str(skip), "-t", "10s", "-O", "json", "-o", str(out), address,
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def figures(out: Path, seconds: float) -> dict[str, Any]:
    """Rates by outcome and latency percentiles from a ghz JSON report."""
    report = json.loads(out.read_text())
    codes: dict[str, int] = report.get("statusCodeDistribution") or {}
    result: dict[str, Any] = {"sent_per_s": round(report.get("count", 0) / seconds, 1), "unsent": 0}
    result["users"] = POOL_USERS  # distinct callers: the token pool (see the module docstring)
    for code, count in codes.items():
        result[f"{_CODES.get(code, code)}_per_s"] = round(count / seconds, 1)
    # ghz reports OK without telling a grant from a waiting answer; waiting is rare (lease refills).
    result["granted_per_s"] = result.pop("ok_per_s", 0.0)
    latencies = {int(p["percentage"]): p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
    result["p50_ms"] = round(latencies[50], 2) if 50 in latencies else None
    result["p99_ms"] = round(latencies[99], 2) if 99 in latencies else None
    return result
