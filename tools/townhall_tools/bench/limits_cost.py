"""What the hostile-input defences and the RPC metrics add to a join, in this process (no network):
microseconds per call.

The join's own pre-servicer work, as the handler wrapper does it (core/interceptor.py): the gate
(authentication, a token the cache has seen, and the call's hold on the bounds taken and released)
with rate limits off and on (per address and per user, never refusing), with the address exempt (no
per-connection or per-address bounds, the server's pool only) and counted, and the request
deserializer raw and wrapped. The first read of the request and
the stall sweep are grpc.aio coroutine work, measured with a real server by `townhall bench`
(joins per CPU-second): they replace grpc's own read of the request, which is not extra.

The RPC metrics (started, handled, handling seconds: core/metrics.py RpcMetrics): one call through the
handler wrapper gRPC calls (`_wrap`, the exempt gate, a servicer that answers at once), driven by hand
without an event loop, with the real observer and with one that records nothing.

`python -m townhall_tools.bench.limits_cost --calls 200000`
"""

from __future__ import annotations

import argparse
import json
import timeit
from typing import Any

from townhall.core.auth import SUBSCRIBE, Authenticator, Tokens
from townhall.core.bounds import Bounds
from townhall.core.config import DEV_AUTH, LimitsConfig, ServerConfig
from townhall.core.interceptor import _Gate, _Observer, _parser, _wrap
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

    def code(self) -> None:  # no status set by the servicer: OK
        return None


class _Silent(_Observer):
    """An observer that records nothing: the wrapper's cost without metrics."""

    def start(self) -> float:
        return 0.0

    def done(self, context: Any, start: float, error: BaseException | None) -> None:
        pass


async def _answer(request: Any, context: Any) -> Any:
    return request


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
    huge = LimitsConfig(joins_user=1e9, joins_address=1e9, failures_address=1e9)
    off = LimitsConfig(enabled=False)
    everyone = ("0.0.0.0/0",)
    bounds = Bounds(ServerConfig(max_calls_per_connection=10**9, max_calls_per_address=10**9), clients=10**9)

    def gate(limits: LimitsConfig) -> _Gate:
        return _Gate(auth, Limits(limits), bounds, "townhall.v1.Admission", "Join", "user", "unary")

    variants = {
        "gate, limits off, address exempt": gate(LimitsConfig(enabled=False, exempt=everyone)),
        "gate, limits off": gate(off),
        "gate, limits on": gate(huge),
    }
    out: dict[str, float] = {}
    for name, each in variants.items():

        def run(check: Any = each.check, leave: Any = each.leave) -> None:
            for i in range(calls):
                held = check(contexts[i % users])
                if held is not None:
                    leave(held)

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
    for name, observer in {
        "wrapper, metrics": _Observer("townhall.v1.Admission", "Join", "unary"),
        "wrapper, no metrics": _Silent("townhall.v1.Admission", "Join", "unary"),
    }.items():
        call = _wrap(_answer, observer, variants["gate, limits off, address exempt"], None, None)

        def through(call: Any = call) -> None:
            for i in range(calls):
                coroutine = call(None, contexts[i % users])
                try:  # noqa: SIM105 - contextlib.suppress would add its own cost to each call
                    coroutine.send(None)
                except StopIteration:
                    pass

        out[name] = min(timeit.repeat(through, number=1, repeat=repeat)) / calls * 1e6
    out["added by per-connection and per-address bounds"] = (
        out["gate, limits off"] - out["gate, limits off, address exempt"]
    )
    out["added by rate limits"] = out["gate, limits on"] - out["gate, limits off"]
    out["added by the deserializer wrapper"] = out["deserializer, wrapped"] - out["deserializer, raw"]
    out["added by the RPC metrics"] = out["wrapper, metrics"] - out["wrapper, no metrics"]
    return out


def main() -> None:
    """Prints the figures (and writes them as JSON with --json)."""
    parser = argparse.ArgumentParser(prog="python -m townhall_tools.bench.limits_cost", description=__doc__)
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
