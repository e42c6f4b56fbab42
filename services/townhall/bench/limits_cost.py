"""What the hostile-input defences add to a join, in this process (no network): microseconds per call.

The join's own pre-servicer work, as the handler wrapper does it (core/interceptor.py): the checker
(authentication, a token the cache has seen) with rate limits off and on (per address and per user,
never refusing), and the request deserializer raw and wrapped. The first read of the request and
the stall sweep are grpc.aio coroutine work, measured with a real server by `townhall bench`
(joins per CPU-second): they replace grpc's own read of the request, which is not extra.

`python -m townhall.bench.limits_cost --calls 200000`
"""

from __future__ import annotations

import argparse
import json
import timeit
from typing import Any

from townhall.core.auth import SUBSCRIBE, Authenticator, Tokens
from townhall.core.config import DEV_AUTH, LimitsConfig
from townhall.core.interceptor import _checker, _parser
from townhall.core.limits import Limits
from townhall.v1.admission_pb2 import JoinRequest


class _Context:
    """The two things the checker asks of a call's context."""

    def __init__(self, peer: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self._peer = peer
        self._metadata = metadata

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def measure(calls: int = 200_000, users: int = 10_000, repeat: int = 5) -> dict[str, float]:
    """Microseconds per call (best of `repeat`) for each variant, and the differences."""
    auth = Authenticator(DEV_AUTH)
    tokens = Tokens(DEV_AUTH)
    contexts = [
        _Context(
            f"ipv4:10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:{40000 + i % 1000}",
            tokens.metadata(i + 1, (SUBSCRIBE,)),
        )
        for i in range(users)
    ]
    for context in contexts:
        auth.principal(context.invocation_metadata())  # warm the token cache: a re-join
    huge = LimitsConfig(joins_user=1e9, joins_address=1e9)
    variants = {
        "checker, limits off": _checker(
            auth, Limits(LimitsConfig(enabled=False)), "townhall.v1.Admission", "Join", "user", "unary"
        ),
        "checker, limits on": _checker(auth, Limits(huge), "townhall.v1.Admission", "Join", "user", "unary"),
    }
    out: dict[str, float] = {}
    for name, check in variants.items():

        def run(check: Any = check) -> None:
            for i in range(calls):
                check(contexts[i % users])

        out[name] = min(timeit.repeat(run, number=1, repeat=repeat)) / calls * 1e6
    data = JoinRequest(room_id="room-0123456789").SerializeToString()
    parse = _parser(JoinRequest.FromString)
    assert parse is not None
    raw = JoinRequest.FromString
    out["deserializer, raw"] = (
        min(timeit.repeat(lambda: [raw(data) for _ in range(calls)], number=1, repeat=repeat)) / calls * 1e6
    )
    out["deserializer, wrapped"] = (
        min(timeit.repeat(lambda: [parse(data) for _ in range(calls)], number=1, repeat=repeat)) / calls * 1e6
    )
    out["added by rate limits"] = out["checker, limits on"] - out["checker, limits off"]
    out["added by the deserializer wrapper"] = out["deserializer, wrapped"] - out["deserializer, raw"]
    return out


def main() -> None:
    """Prints the figures (and writes them as JSON with --json)."""
    parser = argparse.ArgumentParser(prog="python -m townhall.bench.limits_cost", description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    figures = measure(args.calls)
    for name, value in figures.items():
        print(f"{name:36s} {value:7.2f} us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
